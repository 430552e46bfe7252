"""Fashion-MNIST from Debian's dataset-fashion-mnist package, normalised the
way the example model was trained (mean 0.2860, std 0.3530)."""
import gzip
import os
import struct

import numpy as np
import torch

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530


def _load_idx(path):
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


def load_fashion_mnist(split):
    """Returns (images [N,1,28,28] float normalised, labels [N] int64)."""
    prefix = "train" if split == "train" else "t10k"
    images = _load_idx(os.path.join(FMNIST_DIR, f"{prefix}-images-idx3-ubyte.gz"))
    labels = _load_idx(os.path.join(FMNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - FMNIST_MEAN) / FMNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))
