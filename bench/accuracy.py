#!/usr/bin/env python3
"""Top-1 of the Fashion-MNIST example model before and after ZeroQ, on the
10k test images, through the real zeroq-quantize binary.

  $ZEROQ_PYTHON bench/accuracy.py [--seeds 0,1,2] [--threads 2]

Reports (medians over seeds; each seed distills its own data once and every
configuration of that seed reuses it):
  float; W8A8 (distilled); W4A8 calibrated on distilled data, on N(0,1)
  noise, and on 64 real training images; mixed precision MP3/4/5/6 (weights
  as large as uniform 3/4/5/6-bit, activations 8-bit, widths {2,4,8}, the
  sensitivity table computed once and re-planned) against uniform W3/4/5/6A8;
  MP3/8 and MP4/8 with widths {2,3,4,5,6,8} ("w2-8").
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import torch  # noqa: E402
from eval_fashion_mnist import top1  # noqa: E402
from fashion_mnist import load_fashion_mnist  # noqa: E402

MODEL = os.path.join(ROOT, "tests", "models", "fashion_cnn.pt")


def slug(name):
    return name.replace("/", "_").replace(" ", "_")


def quantize(binary, out, threads, *flags):
    os.makedirs(out, exist_ok=True)
    cmd = [binary, f"--model={MODEL}", "--input_shape=1,28,28",
           f"--threads={threads}", "--progress=none", f"--out={out}", "--json", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")
    report = json.loads(proc.stdout)
    return os.path.join(out, "model.zeroq.pt"), report


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "core", "tools", "zeroq-quantize"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    xte, yte = load_fashion_mnist("test")
    xtr, _ = load_fashion_mnist("train")

    def acc(path):
        m = torch.jit.load(path)
        m.eval()
        return top1(m, xte, yte)

    results = {}  # name -> list of top-1 per seed
    sizes = {}
    work = tempfile.mkdtemp(prefix="zeroq-accuracy-")
    float_top1 = acc(MODEL)
    for seed in seeds:
        d = os.path.join(work, f"s{seed}")
        def run(name, *flags):
            path, rep = quantize(args.binary, os.path.join(d, slug(name)), args.threads, *flags)
            results.setdefault(name, []).append(acc(path))
            sizes[name] = rep["weight_bytes"]
            return rep
        rep = run("W8A8 distilled", f"--seed={seed}")
        distilled = os.path.join(d, slug("W8A8 distilled"), "distilled.pt")
        g = torch.Generator().manual_seed(seed)
        real = os.path.join(d, "real64.pt")
        torch.save(xtr[torch.randperm(len(xtr), generator=g)[:64]].clone(), real)
        run("W4A8 distilled", "--weight_bits=4", f"--calibration={distilled}")
        run("W4A8 gaussian", "--weight_bits=4", "--calibration=gaussian", f"--seed={seed}")
        run("W4A8 real x64", "--weight_bits=4", f"--calibration={real}")
        mp4 = run("MP4/8", "--budget=MP4", f"--calibration={distilled}")
        report = os.path.join(d, "MP4_8", "report.json")
        with open(report, "w") as f:
            json.dump(mp4, f)
        for b in (3, 5, 6):
            run(f"MP{b}/8", f"--budget=MP{b}", f"--calibration={distilled}",
                f"--sensitivity_from={report}")
        # Finer candidate widths than the paper's {2,4,8}.
        for b in (3, 4):
            run(f"MP{b}/8 w2-8", f"--budget=MP{b}", "--candidate_bits=2,3,4,5,6,8",
                f"--calibration={distilled}")
        for b in (3, 5, 6):
            run(f"W{b}A8 distilled", f"--weight_bits={b}", f"--calibration={distilled}")
        print(f"seed {seed} done", file=sys.stderr, flush=True)

    print(f"Fashion-MNIST example model, 10k test images; zeroq-quantize with "
          f"{args.threads} threads; seeds {args.seeds}; distillation: reference "
          f"defaults (batch 32, 500 iterations)")
    print(f"{'configuration':<22} {'weight KiB':>10} {'top-1 median':>13}   per seed")
    print(f"{'float':<22} {sizes['W8A8 distilled'] * 4 / 1024:>10.2f} {float_top1:>13.2f}")
    order = ["W8A8 distilled", "W4A8 distilled", "W4A8 gaussian", "W4A8 real x64",
             "W3A8 distilled", "MP3/8", "MP3/8 w2-8", "MP4/8", "MP4/8 w2-8", "W5A8 distilled", "MP5/8",
             "W6A8 distilled", "MP6/8"]
    for name in order:
        v = results[name]
        print(f"{name:<22} {sizes[name] / 1024:>10.2f} {statistics.median(v):>13.2f}   "
              + " ".join(f"{x:.2f}" for x in v))
    print(f"(artifacts in {work})")


if __name__ == "__main__":
    main()
