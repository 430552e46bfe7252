#!/usr/bin/env python3
"""Makes the TorchScript models the project ships: the Fashion-MNIST example
model (trained on the real data set) and tiny models for fast unit tests.

Run with the project's Python (scripts/torch_env.sh: torch, torchvision;
dataset-fashion-mnist):  $ZEROQ_PYTHON scripts/make_models.py [--out DIR]
Outputs are deterministic for a given torch build and thread count. The
committed files were made with torch 1.13 and are kept as they are: they also
show that archives saved by an older PyTorch load and quantize. Models scripted
by torch 2.15 are made by make_output_models.py (committed) and
make_compat_models.py (at test time).
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fashion_mnist import load_fashion_mnist

def conv_bn(cin, cout, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(x + y)


class FashionNet(nn.Module):
    """The example model: 6 quantizable layers, a residual block, 1x28x28 in."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16)
        self.down1 = conv_bn(16, 32, stride=2)
        self.block = ResidualBlock(32)
        self.down2 = conv_bn(32, 64, stride=2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.down2(self.block(self.down1(self.stem(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class TinyNoBnAfterConv(nn.Module):
    """A conv with no BN after it comes first: pairing BNs with convs by
    module order (the reference code's bug) gets every pair wrong here."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 8, 3, 1, 1)  # no BN follows
        self.conv1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.pre(x))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu6(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MiniBasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, same module names, small widths."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class MiniResNet(nn.Module):
    """torchvision ResNet layout (stem, maxpool, layer1..4, fc) with widths
    8..64 and `blocks` BasicBlocks per stage."""

    def __init__(self, blocks=1, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [8, 16, 32, 64]
        cin = 8
        stages = []
        for i, w in enumerate(widths):
            layers = []
            for b in range(blocks):
                layers.append(MiniBasicBlock(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, y):
        return self.bn(self.conv(x + y)).mean()


def settle_bn_stats(model, shape, steps=8, seed=0):
    """Gives BN layers realistic running statistics without data: a few
    training-mode forwards on random batches with a cumulative average."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
            with torch.no_grad():
                # Non-trivial affine parameters, so quantization error shows.
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, generator=g) * 1.5 + 0.3)
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model


def save_scripted(model, path):
    model.eval()
    scripted = torch.jit.script(model)
    scripted.save(path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, "
          f"{sum(p.numel() for p in model.parameters())} parameters)")


def evaluate(model, x, y, batch=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x)


def train_fashion(epochs, threads):
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    model = FashionNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=4e-3, total_steps=epochs * ((len(xtr) + 127) // 128))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        t0 = time.time()
        for i in range(0, len(xtr), 128):
            idx = perm[i:i + 128]
            xb = xtr[idx]
            # Light augmentation: horizontal flips.
            flip = torch.rand(len(idx)) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, xte, yte)
        print(f"epoch {epoch + 1}/{epochs}: test top-1 {acc:.2f}% "
              f"({time.time() - t0:.1f} s, {threads} threads)")
    return model


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "models"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-fashion", action="store_true",
                    help="only the tiny test models")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)

    torch.manual_seed(1)
    save_scripted(settle_bn_stats(TinyNoBnAfterConv(), (8, 3, 16, 16)), out("tiny_nobn_after_conv.pt"))
    save_scripted(settle_bn_stats(MiniResNet(blocks=1), (8, 3, 32, 32)), out("mini_resnet.pt"))
    # 2 blocks per stage: 21 quantizable layers, for sweep benchmarks.
    save_scripted(settle_bn_stats(MiniResNet(blocks=2), (8, 3, 32, 32)), out("mini_resnet_b2.pt"))
    from torchvision.models import mobilenet_v2
    from torchvision.models.shufflenetv2 import ShuffleNetV2
    from torchvision.models.densenet import DenseNet
    mbv2 = mobilenet_v2(width_mult=0.25, num_classes=10,
                        inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]])
    save_scripted(settle_bn_stats(mbv2, (8, 3, 32, 32)), out("mini_mobilenet_v2.pt"))
    shuf = ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=10)
    save_scripted(settle_bn_stats(shuf, (8, 3, 32, 32)), out("mini_shufflenet_v2.pt"))
    dense = DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16,
                     num_classes=10)
    save_scripted(settle_bn_stats(dense, (8, 3, 32, 32)), out("mini_densenet.pt"))
    save_scripted(NoBatchNorm(), out("no_batchnorm.pt"))
    save_scripted(TwoInputs(), out("two_inputs.pt"))

    if not args.skip_fashion:
        model = train_fashion(args.epochs, args.threads)
        save_scripted(model, out("fashion_cnn.pt"))


if __name__ == "__main__":
    main()
