#!/usr/bin/env python
"""Where one training step of a model spends its time, masked and sparse (torch.profiler).

    python scripts/profile_sparse.py                       # resnet56, vgg16_small, vit_cifar at 2%
    python scripts/profile_sparse.py --models resnet56 --density 0.05 --top 15

Each variant is built as ``bench_sparse.py models`` builds it (batch 128, 3x32x32, static masks at
a uniform density, SGD with Nesterov), warmed up for one step, then one step is profiled on one
thread. Printed per variant: the step's wall time, and the operators by self CPU time (the sparse
layers' C kernels run inside their autograd functions, ``_SparseProduct``, ``_SparseConvDirect`` and
their backward nodes, and show under those names), grouped into what the issue asks about:
the prunable layers' arithmetic, layout changes (permute/contiguous/copy/pad), unfolding and folding
(im2col/col2im), normalisation and activations, the optimizer, and the rest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparse import build_variant, machine  # noqa: E402

# operator name fragments -> group (first match wins)
GROUPS = (
    ("prunable layers: sparse kernels", ("_SparseProduct", "_SparseConvDirect")),
    ("prunable layers: dense conv/matmul", ("convolution", "conv2d", "mkldnn", "addmm", "aten::mm", "bmm",
                                            "matmul", "linear")),
    ("unfold / fold (im2col, col2im)", ("im2col", "col2im", "unfold", "fold")),
    ("layout: permute / contiguous / copy / pad", ("permute", "contiguous", "copy_", "clone", "pad",
                                                   "constant_pad", "transpose", "reshape", "view", "as_strided",
                                                   "empty_strided")),
    ("batch norm / layer norm", ("batch_norm", "layer_norm", "native_batch_norm")),
    ("activations / pooling / softmax", ("relu", "gelu", "threshold", "pool", "softmax", "dropout")),
    ("elementwise (add, mul, masks)", ("aten::add", "aten::mul", "aten::sub", "aten::div", "_foreach", "where",
                                       "aten::fill_", "aten::zero_", "aten::zeros")),
    ("optimizer step", ("Optimizer.step", "sgd", "_foreach_add", "_foreach_mul")),
    ("reductions (sum, loss)", ("aten::sum", "cross_entropy", "nll_loss", "log_softmax")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other"


def profile_step(step) -> tuple[float, list]:
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: structures, offsets, allocator
    t0 = time.perf_counter()
    step()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    return wall, events


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56", "vgg16_small", "vit_cifar"])
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--variants", nargs="+", default=["masked", "sparse"])
    ap.add_argument("--method", default="static")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# one training step profiled, density {a.density:.0%}, method={a.method}, {machine()}")
    for model_name in a.models:
        for variant in a.variants:
            step, _, _ = build_variant(model_name, variant, a.density, a.method)
            wall, events = profile_step(step)
            total = sum(t for _, t, _ in events)
            groups: dict[str, float] = {}
            for name, t, _ in events:
                groups[group_of(name)] = groups.get(group_of(name), 0.0) + t
            print(f"\n## {model_name}, {variant}: {wall * 1e3:,.0f} ms a step (unprofiled), "
                  f"{total:,.0f} ms of operator self time (profiled)\n")
            print("| group | ms | share |\n|---|---:|---:|")
            for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
                print(f"| {g} | {t:,.1f} | {t / total:.0%} |")
            print("\n| top operators (self) | ms | calls |\n|---|---:|---:|")
            for name, t, n in sorted(events, key=lambda e: -e[1])[:a.top]:
                print(f"| `{name}` | {t:,.1f} | {n} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
