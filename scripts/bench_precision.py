#!/usr/bin/env python
"""Mixed precision on this CPU: does bf16 autocast train to fp32's accuracy, and at what step time?

    python scripts/bench_precision.py [--root FASHION_MNIST_DIR] [--seeds 3] [--workers 2]

Fashion-MNIST, RigL at density 5% (updates every 100 steps), LeNet-5-Caffe for `--epochs` epochs
and ResNet-56 (option-A shortcuts, on the 1x28x28 images) for `--resnet-batches` batches of one
epoch, each in fp32 and bf16 over `--seeds` seeds. Runs go to `--workers` processes of one torch
thread each, the variants interleaved (fp32 s0, bf16 s0, fp32 s1, ...). Prints one Markdown table:
test accuracy (mean and standard deviation over the seeds) and the median milliseconds per step
(results.json's throughput), min and median over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(args: list[str], runs: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "sparse_bench", *args, "logger=none", "progress=false", "device=cpu", "threads=1",
           f"paths.runs={runs}", "resume=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    (path,) = runs.glob("*/results.json")
    return json.loads(path.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--resnet-batches", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["LeNet-5-Caffe"], choices=["LeNet-5-Caffe", "ResNet-56"],
                    help="ResNet-56 in bf16 is very slow on a CPU without bf16 arithmetic (BENCHMARKS.md)")
    a = ap.parse_args()
    common = ["dataset=fashion_mnist", f"dataset.root={a.root}", "method=rigl", "method.update_every=100",
              "density=0.05", "eval.train_samples=0"]
    models = {"LeNet-5-Caffe": ["model=lenet5_caffe", f"schedule.epochs={a.epochs}"],
              "ResNet-56": ["model=resnet56", "schedule.epochs=1", f"limit_train_batches={a.resnet_batches}"]}
    models = {m: models[m] for m in a.models}
    jobs = [(m, p, s) for m in models for s in range(a.seeds) for p in ("fp32", "bf16")]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(a.workers) as pool:
        futures = {job: pool.submit(one_run, [*common, *models[job[0]], f"precision={job[1]}", f"seed={job[2]}"],
                                    Path(tmp) / "-".join(map(str, job))) for job in jobs}
        results = {job: f.result() for job, f in futures.items()}
    print(f"# bf16 autocast against fp32 on {os.cpu_count()} CPUs ({a.workers} runs at a time, one thread each), "
          f"{a.seeds} seeds")
    print("| model | precision | test acc (mean +- sd) | ms per step (min / median over seeds) |")
    print("|---|---|---:|---:|")
    for m in models:
        for p in ("fp32", "bf16"):
            rs = [results[(m, p, s)] for s in range(a.seeds)]
            acc = [r["final"]["test/acc"] for r in rs]
            ms = [r["throughput"]["ms_per_step"] for r in rs]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            print(f"| {m} | {p} | {statistics.mean(acc):.4f} +- {sd:.4f} "
                  f"| {min(ms):.1f} / {statistics.median(ms):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
