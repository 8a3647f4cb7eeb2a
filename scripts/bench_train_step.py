#!/usr/bin/env python
"""Per-step cost of the masked path against dense: ms/step per method and the grouped mask apply.

    python scripts/bench_train_step.py --rounds 10 --steps 50
    python scripts/bench_train_step.py --device cuda --models lenet300_100 lenet5_caffe

For each model it times full training steps (forward, backward, method hooks, optimizer step)
for each method at the given density (execution=masked), on synthetic data of the model's input
shape already on the device, and times `MaskSet.apply_()` (one `_foreach_mul_`) alone. The
methods are interleaved: every round times `--steps` steps of each in turn (A B C A B C ...), so
a disturbance of the shared machine hits all of them; the table gives min and median over the
rounds and the ratio of minima against dense, measured in the same run. One thread by default.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from bench_grow_step import sync
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.confdir import conf_dir
from sparse_bench.models import build_model
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.train.trainer import hooked_step


def build(model_name: str, method: str, density: float, steps: int, batch: int, device):
    """A model, optimizer and method ready to step, and the step function."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": model_name}), (1, 28, 28), 10).to(device)  # the YAML defaults
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg = OmegaConf.load(conf_dir() / "method" / f"{method}.yaml")
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=1, steps_per_epoch=10**6,
                        device=device, generator=torch.Generator().manual_seed(1), loss_fn=nn.CrossEntropyLoss())
    m = build_method(cfg, ctx)
    m.setup()
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(i):
        hooked_step(m, opt, i, lambda: nn.functional.cross_entropy(model(x), y))

    for i in range(10):  # warm-up
        step(i)
    return m, step


def timed(fn, n: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    sync(device)
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["lenet300_100", "lenet5_caffe"])
    ap.add_argument("--methods", nargs="+", default=["dense", "static", "sparse_momentum", "rigl", "set"])
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50, help="steps per method per round")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {a.batch}, density {a.density}, {a.rounds} interleaved rounds of {a.steps} steps")
    print("| model | method | ms / step (min/median, n) | vs dense (min) | mask apply, ms (min) |")
    print("|---|---|---|---|---|")
    methods = ["dense"] + [m for m in a.methods if m != "dense"]
    for model_name in a.models:
        built = {meth: build(model_name, meth, a.density, a.steps, a.batch, device) for meth in methods}
        times = {meth: [] for meth in methods}
        applies = {meth: [] for meth in methods}
        for _ in range(a.rounds):
            for meth, (m, step) in built.items():
                times[meth].append(timed(step, a.steps, device))
                if m.masks is not None:
                    applies[meth].append(timed(lambda i, m=m: m.masks.apply_(), a.steps, device))
        dense = min(times["dense"])
        for meth in methods:
            t = times[meth]
            apply_txt = f"{min(applies[meth]) * 1e3:.3f}" if applies[meth] else "-"
            print(f"| {model_name} | {meth} | {min(t) * 1e3:.2f}/{statistics.median(t) * 1e3:.2f} (n={len(t)}) | "
                  f"{min(t) / dense:.2f}x | {apply_txt} |")


if __name__ == "__main__":
    main()
