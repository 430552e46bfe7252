#!/usr/bin/env python3
"""Makes the compatibility-test models: TorchScript archives scripted by the
Python torch the project builds against (2.15, with torchvision 0.29), for
tests/compat_test.py. They are too big to commit, so the test generates them.

    $ZEROQ_PYTHON scripts/make_compat_models.py OUTDIR [--only NAME,...]

Writes OUTDIR/<name>.pt and OUTDIR/manifest.json (name, file, input shape,
output kind and structure, source, the torch that scripted it).

- torchvision classifiers with random weights (fixed seed), 10 classes, at
  3x64x64: ResNet-18, MobileNetV2, MobileNetV3-Small, EfficientNet-B0,
  ShuffleNetV2 x0.5, DenseNet-121, RegNetY-400MF and GoogLeNet with its
  auxiliary classifiers (scripted, its forward returns the NamedTuple
  GoogLeNetOutputs; in eval mode the two auxiliary fields are None).
- small BN networks whose forward returns a tuple (logits, features), a
  NamedTuple (logits, embedding) or a Dict[str, Tensor]; each has a layer
  that feeds only an output other than the first (manifest: side_layers).
- the repository's own models (tests/models/*.pt, made by
  scripts/make_models.py with an older torch), re-scripted with this torch:
  each architecture is rebuilt from make_models.py's classes (or the same
  torchvision constructors), the committed weights and BN statistics are
  loaded into it (strict), and the output is checked to equal the committed
  model's before the new archive is saved.

BatchNorm statistics of the random-weight models come from a few train-mode
forwards on random inputs (make_models.settle_bn_stats: cumulative averages,
BN affine parameters drawn from U(0.5, 1.5) and U(-0.2, 0.2)), so they are
not the trivial 0/1. Takes about 15 s on one thread.
"""
import argparse
import json
import os
import sys
import time
import warnings
from typing import Dict, NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.models as tvm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_models  # noqa: E402  (its classes and settle_bn_stats; nothing runs on import)

REPO_MODELS = os.path.join(HERE, "..", "tests", "models")
SMALL = [3, 64, 64]
# Train-mode passes that set the BN running statistics: batch, passes.
SETTLE_BATCH = 8
SETTLE_STEPS = 3


def conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TupleNet(nn.Module):
    """forward -> (logits, features): a tuple of two tensors; the 1x1 conv
    `side` feeds only the second."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.down = conv_bn_relu(16, 32, 2)
        self.mid = conv_bn_relu(32, 32)
        self.fc = nn.Linear(32, num_classes)
        self.side = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        f = self.mid(self.down(self.stem(x)))
        logits = self.fc(F.adaptive_avg_pool2d(f, 1).flatten(1))
        return logits, self.side(f)


class NetOutputs(NamedTuple):
    logits: torch.Tensor
    embedding: torch.Tensor


class NamedTupleNet(nn.Module):
    """forward -> NetOutputs(logits, embedding): a NamedTuple of tensors; the
    linear layer `proj` feeds only the embedding."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.block = conv_bn_relu(16, 32, 2)
        self.fc = nn.Linear(32, num_classes)
        self.proj = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> NetOutputs:
        p = F.adaptive_avg_pool2d(self.block(self.stem(x)), 1).flatten(1)
        return NetOutputs(self.fc(p), self.proj(p))


class DictNet(nn.Module):
    """forward -> {"logits", "embedding", "side"}: a Dict[str, Tensor]; the
    linear layer `side` feeds only "side" (the last key in insertion and in
    sorted order)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.block = make_models.ResidualBlock(16)
        self.down = conv_bn_relu(16, 32, 2)
        self.head = nn.Linear(32, num_classes)
        self.side = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        e = F.adaptive_avg_pool2d(self.down(self.block(self.stem(x))), 1).flatten(1)
        return {"logits": self.head(e), "embedding": e, "side": self.side(e)}


# Layers of the structured-output models that feed only an output other than
# the first: a sensitivity measured on every output tensor sees them.
SIDE_LAYERS = {"tuple_net": ["side"], "namedtuple_net": ["proj"], "dict_net": ["side"]}

# name -> constructor of the random-weight models (all at SMALL).
RANDOM_MODELS = {
    "resnet18": lambda: tvm.resnet18(num_classes=10),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=10),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(num_classes=10),
    "shufflenet_v2_x0_5": lambda: tvm.shufflenet_v2_x0_5(num_classes=10),
    "densenet121": lambda: tvm.densenet121(num_classes=10),
    "regnet_y_400mf": lambda: tvm.regnet_y_400mf(num_classes=10),
    "googlenet": lambda: tvm.googlenet(num_classes=10, aux_logits=True, init_weights=True),
    "tuple_net": TupleNet,
    "namedtuple_net": NamedTupleNet,
    "dict_net": DictNet,
}


def repo_architectures():
    """The committed models' architectures, as scripts/make_models.py builds
    them: file name -> (constructor, input shape)."""
    from torchvision.models.densenet import DenseNet
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    return {
        "fashion_cnn": (make_models.FashionNet, [1, 28, 28]),
        "tiny_nobn_after_conv": (make_models.TinyNoBnAfterConv, [3, 16, 16]),
        "mini_resnet": (lambda: make_models.MiniResNet(blocks=1), [3, 32, 32]),
        "mini_resnet_b2": (lambda: make_models.MiniResNet(blocks=2), [3, 32, 32]),
        "mini_mobilenet_v2": (lambda: tvm.mobilenet_v2(
            width_mult=0.25, num_classes=10,
            inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]]),
            [3, 32, 32]),
        "mini_shufflenet_v2": (lambda: ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128],
                                                    num_classes=10), [3, 32, 32]),
        "mini_densenet": (lambda: DenseNet(growth_rate=8, block_config=(2, 2, 2),
                                           num_init_features=16, num_classes=10),
                          [3, 32, 32]),
    }


def output_structure(y):
    """The kind and structure of a forward's output: ("tensor", None),
    ("tuple", n), ("namedtuple", [fields]) or ("dict", [keys])."""
    if isinstance(y, torch.Tensor):
        return "tensor", None
    if isinstance(y, dict):
        return "dict", sorted(y.keys())
    if isinstance(y, tuple) and hasattr(y, "_fields"):
        return "namedtuple", list(y._fields)
    if isinstance(y, tuple):
        return "tuple", len(y)
    raise TypeError(f"unexpected output type {type(y).__name__}")


def tensors_of(y):
    """Every tensor of an output, in a fixed order (dicts by key); None skipped."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for k in sorted(y) for t in tensors_of(y[k])]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in tensors_of(v)]
    return []


def save(scripted, out_dir, name, shape, source, manifest):
    path = os.path.join(out_dir, name + ".pt")
    scripted.save(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = scripted(torch.zeros([2] + shape))
    kind, structure = output_structure(y)
    manifest.append({
        "name": name, "file": name + ".pt", "input_shape": shape,
        "output_kind": kind, "output_structure": structure,
        "output_shapes": [list(t.shape[1:]) for t in tensors_of(y)],
        "source": source, "scripted_with": torch.__version__.split("+")[0],
        "side_layers": SIDE_LAYERS.get(name, []),
        "schema": str(scripted.forward.schema),
    })
    print(f"  {name:26s} {kind:10s} {os.path.getsize(path) / 2**20:6.1f} MiB  {source}",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    os.makedirs(args.out_dir, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # jit deprecation notes
    t0 = time.time()
    manifest = []
    print(f"scripting with torch {torch.__version__}, torchvision {torchvision.__version__}")

    for i, (name, make) in enumerate(RANDOM_MODELS.items()):
        if only and name not in only:
            continue
        torch.manual_seed(1000 + i)
        model = make_models.settle_bn_stats(make(), [SETTLE_BATCH] + SMALL,
                                            steps=SETTLE_STEPS, seed=i)
        source = ("torchvision " + torchvision.__version__.split("+")[0]
                  if name in tvm.list_models() else "random BN CNN")
        save(torch.jit.script(model), args.out_dir, name, SMALL, source, manifest)

    for name, (make, shape) in repo_architectures().items():
        compat_name = "repo_" + name
        if only and compat_name not in only:
            continue
        committed = torch.jit.load(os.path.join(REPO_MODELS, name + ".pt"))
        model = make().eval()
        model.load_state_dict(committed.state_dict(), strict=True)
        scripted = torch.jit.script(model)
        x = torch.randn([4] + shape, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            want, got = committed(x), scripted(x)
        if not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
            sys.exit(f"{name}: the re-scripted model differs from the committed one "
                     f"by {(want - got).abs().max().item():g}")
        save(scripted, args.out_dir, compat_name, shape,
             f"tests/models/{name}.pt re-scripted", manifest)

    with open(os.path.join(args.out_dir, "manifest.json"), "w") as f:
        json.dump({"torch": torch.__version__, "torchvision": torchvision.__version__,
                   "models": manifest}, f, indent=1)
    print(f"{len(manifest)} models in {args.out_dir} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
