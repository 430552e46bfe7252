#!/usr/bin/env python3
"""Trains the two extra Fashion-MNIST models with BatchNorm layers used for
accuracy work, besides the example model fashion_cnn.pt (make_models.py):

  fashion_resnet.pt        ResNet-style: basic residual blocks (conv-BN-ReLU-
                           conv-BN + identity / 1x1-projection shortcut), three
                           stages of widths 16/32/64, global average pool, linear.
  fashion_mobilenet_v2.pt  MobileNetV2-style: inverted residual blocks (1x1
                           expand conv-BN-ReLU6, 3x3 depthwise conv-BN-ReLU6, 1x1
                           project conv-BN, residual when shapes match).

Both take 1x28x28 images normalised as in fashion_mnist.py and return logits.
Run with the project's Python (scripts/torch_env.sh):

  $ZEROQ_PYTHON scripts/train_fashion_models.py [--epochs N] [--threads 2]
      [--models resnet,mobilenet_v2] [--out DIR]

Training is seeded (torch.manual_seed per model); results are deterministic
for a given torch build and thread count, as far as torch's CPU kernels are.
Each model is scripted with torch.jit.script, saved, loaded back with
torch.jit.load and re-evaluated on the 10k test images.
"""
import argparse
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashion_mnist import load_fashion_mnist, FMNIST_MEAN, FMNIST_STD
from make_models import conv_bn, evaluate, save_scripted

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the identity, or a 1x1 conv-BN
    projection when the stride or the width changes; then ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class FashionResNet(nn.Module):
    """Stem conv-BN-ReLU (16, 28x28), stages of `blocks` BasicBlocks at
    widths 16 (28x28), 32 (14x14), 64 (7x7), global average pool, linear."""

    def __init__(self, widths=(16, 32, 64), blocks=(1, 1, 1), num_classes=10):
        super().__init__()
        self.stem = conv_bn(1, widths[0])
        layers = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand conv-BN-ReLU6 (skipped when expand is 1),
    3x3 depthwise conv-BN-ReLU6, 1x1 project conv-BN (linear bottleneck);
    the input is added when stride is 1 and the widths match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class FashionMobileNetV2(nn.Module):
    """Stem conv-BN-ReLU6 (16, stride 2: 14x14), inverted residual blocks
    (expand t, width c, repeats n, first stride s): 16, 24 at 14x14, 32, 64
    at 7x7, a 1x1 conv-BN-ReLU6 head (256), global average pool, dropout,
    linear. (The stride-2 stem keeps CPU training time down.)"""

    # t, c, n, s
    SETTING = [[1, 16, 1, 1], [4, 24, 2, 1], [4, 32, 3, 2], [4, 64, 2, 1]]

    def __init__(self, num_classes=10, last=256):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        blocks = []
        cin = 16
        for t, c, n, s in self.SETTING:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False),
                                  nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(F.adaptive_avg_pool2d(x, 1).flatten(1)))


MODELS = {
    "resnet": (FashionResNet, "fashion_resnet.pt"),
    "mobilenet_v2": (FashionMobileNetV2, "fashion_mobilenet_v2.pt"),
}

BACKGROUND = (0.0 - FMNIST_MEAN) / FMNIST_STD  # a black pixel, normalised


def augment(xb, pad=2):
    """Random crop with `pad` pixels of black padding, and horizontal flips,
    per image (drawn from torch's global generator)."""
    n, _, h, w = xb.shape
    xp = F.pad(xb, (pad, pad, pad, pad), value=BACKGROUND)
    oy = torch.randint(0, 2 * pad + 1, (n,))
    ox = torch.randint(0, 2 * pad + 1, (n,))
    rows = oy[:, None] + torch.arange(h)[None, :]
    cols = ox[:, None] + torch.arange(w)[None, :]
    flip = torch.rand(n) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = xp[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]]
    return out.unsqueeze(1)


def count_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def count_layers(model):
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def train(name, epochs, threads, data, batch=128, max_lr=4e-3, seed=0):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    xtr, ytr, xte, yte = data
    cls, _ = MODELS[name]
    model = cls()
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{count_layers(model)} conv/linear layers, {count_bn(model)} BatchNorm2d",
          flush=True)
    steps = (len(xtr) + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=epochs * steps, pct_start=0.25)
    t_start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        t0 = time.time()
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(augment(xtr[idx])), ytr[idx],
                                   label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, xte, yte)
        print(f"{name} epoch {epoch + 1}/{epochs}: test top-1 {acc:.2f}% "
              f"({time.time() - t0:.1f} s, {threads} threads)", flush=True)
    print(f"{name}: trained in {time.time() - t_start:.0f} s", flush=True)
    return model, acc


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "models"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet,mobilenet_v2",
                    help="comma-separated: " + ", ".join(MODELS))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    for name in args.models.split(","):
        model, acc = train(name, args.epochs, args.threads, (xtr, ytr, xte, yte))
        path = os.path.join(args.out, MODELS[name][1])
        save_scripted(model, path)
        loaded = torch.jit.load(path)
        loaded.eval()
        acc2 = evaluate(loaded, xte, yte)
        print(f"{name}: eager {acc:.2f}%, reloaded TorchScript {acc2:.2f}% ({path})",
              flush=True)
        if abs(acc - acc2) > 0.02:
            raise SystemExit(f"{path}: reloaded accuracy differs")


if __name__ == "__main__":
    main()
