#!/usr/bin/env python3
"""Makes the tiny test models whose forward returns several tensors.

    $ZEROQ_VENV/bin/python scripts/make_output_models.py tests/models

Scripted with the pinned torch (2.15): small untrained BN CNNs on 1x16x16
inputs whose BN statistics are set by a few train-mode passes on random
inputs, and whose forward returns
  - a tuple (logits, aux logits, pooled features): tuple_outputs.pt
  - a NamedTuple (logits, aux, Optional aux2 = None, like torchvision's
    GoogLeNetOutputs in eval mode):         namedtuple_outputs.pt
  - a Dict[str, Tensor]:                    dict_outputs.pt
Each file is a few KB; the core tests quantize them and check that the
export returns the same structure.
"""
import os
import sys
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn


class Outputs(NamedTuple):
    logits: torch.Tensor
    aux: torch.Tensor
    aux2: Optional[torch.Tensor]


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        self.aux = nn.Linear(16, 4)

    def features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class TupleNet(Body):
    def forward(self, x):
        f = self.features(x)
        return self.fc(f), self.aux(f), f


class NamedTupleNet(Body):
    def forward(self, x) -> Outputs:
        f = self.features(x)
        return Outputs(self.fc(f), self.aux(f), None)


class DictNet(Body):
    def forward(self, x) -> Dict[str, torch.Tensor]:
        f = self.features(x)
        return {"logits": self.fc(f), "aux": self.aux(f)}


def make(cls, seed):
    torch.manual_seed(seed)
    m = cls()
    m.train()
    with torch.no_grad():
        for _ in range(4):
            m(torch.randn(16, 1, 16, 16) * 1.5 + 0.3)
    m.eval()
    return torch.jit.script(m)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/models"
    os.makedirs(out, exist_ok=True)
    for name, cls, seed in [("tuple_outputs", TupleNet, 1),
                            ("namedtuple_outputs", NamedTupleNet, 2),
                            ("dict_outputs", DictNet, 3)]:
        path = os.path.join(out, name + ".pt")
        make(cls, seed).save(path)
        print(f"{path}: {os.path.getsize(path)} bytes, torch {torch.__version__}")


if __name__ == "__main__":
    main()
