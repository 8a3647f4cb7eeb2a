#!/usr/bin/env python
"""Per-step cost of the trainer's sparse path: steps/s per method and the grouped mask apply.

    python scripts/bench_train_step.py --device cpu --steps 200
    python scripts/bench_train_step.py --device cuda --models lenet300_100 lenet5_caffe

For each model it times full training steps (forward, backward, method hooks, optimizer step)
for dense, static and sparse_momentum at the given density, on synthetic data of the model's
input shape already on the device, and times `MaskSet.apply_()` (one `_foreach_mul_`) alone.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.cli import conf_dir
from sparse_bench.models import build_model
from sparse_bench.sparsity.methods import MethodContext, build_method


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(model_name: str, method: str, density: float, steps: int, batch: int, device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": model_name}), (1, 28, 28), 10).to(device)  # the YAML defaults
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg = OmegaConf.load(conf_dir() / "method" / f"{method}.yaml")
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=1, steps_per_epoch=steps,
                        device=device, generator=torch.Generator().manual_seed(1), loss_fn=nn.CrossEntropyLoss())
    m = build_method(cfg, ctx)
    m.setup()
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step(i):
        m.before_forward(i)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.before_optimizer_step(i)
        opt.step()
        m.after_optimizer_step(i)

    for i in range(10):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    per_step = (time.perf_counter() - t0) / steps
    apply_t = float("nan")
    if m.masks is not None:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            m.masks.apply_()
        sync(device)
        apply_t = (time.perf_counter() - t0) / steps
    return per_step, apply_t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=["lenet300_100", "lenet5_caffe"])
    ap.add_argument("--methods", nargs="+", default=["dense", "static", "sparse_momentum"])
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    a = ap.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {a.batch}, density {a.density}")
    print("| model | method | ms / step | steps / s | mask apply, ms |")
    print("|---|---|---|---|---|")
    for model_name in a.models:
        for method in a.methods:
            per_step, apply_t = bench(model_name, method, a.density, a.steps, a.batch, device)
            apply_txt = "-" if apply_t != apply_t else f"{apply_t * 1e3:.3f}"
            print(f"| {model_name} | {method} | {per_step * 1e3:.2f} | {1 / per_step:.0f} | {apply_txt} |")


if __name__ == "__main__":
    main()
