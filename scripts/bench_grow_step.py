#!/usr/bin/env python
"""One grow step of GSE against RigL's dense-gradient grow, for an n x n Linear layer.

    python scripts/bench_grow_step.py --device cpu --widths 1024 2048 4096 8192 16384 32768
    python scripts/bench_grow_step.py --device cuda --widths 1024 4096 16384 65536 --rigl-max-width 32768

Set-up per width n: a Linear layer n -> n (only its shape: a ``meta`` module, no weight is
allocated), a batch of B = 128 rows of layer inputs x (B, n) and output gradients delta (B, n),
and a fixed number of active connections |A| (``--active``, default 65,536 = 6.25% of 1024^2;
``--density d`` instead scales |A| = d * n^2). Both methods then grow k = ceil(alpha |A|)
connections (alpha = 0.2, the largest GSE/RigL fraction) from the same inputs:

* RigL: dense gradient G = delta^T x (n x n), |G| with the active entries set to -inf (in place),
  top-k. The active set is a dense bool mask (RigL keeps one).
* GSE (uniform): draw gamma |A| (gamma = 1) (output, input) pairs uniformly, drop the active ones
  (binary search in the sorted active indices, an always-sparse representation) and duplicates,
  compute the gradient of the candidates only (``candidate_grad.candidate_gradients``, blocks of
  ``--chunk-size`` elements), top-k of |g|.
* GSE (GraBo): as uniform, but first the unit statistics f = sum_r |x_r|, g = sum_r |delta_r|
  (O(B n)) and multinomial draws from them.

Time: best of ``--repeats`` runs after one warm-up (the least disturbed by other load). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it; on CPU
the peak of live bytes in tensors that torch ops allocate during the step, tracked op by op
with a dispatch mode (tensors created before the step, i.e. x, delta, the active set and
RigL's mask, are not counted; kernel-internal scratch space is not seen).
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_bench.sparsity.candidate_grad import DEFAULT_CHUNK, candidate_gradients


class LiveBytes(TorchDispatchMode):
    """Peak of live bytes in storages allocated by torch ops inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.refs: dict[int, list] = {}  # storage data_ptr -> [nbytes, live tensors]

    def _release(self, ptr: int) -> None:
        entry = self.refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = set()  # storages of the inputs: an output sharing one is a view or in-place result
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor):
                    seen.add(t.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        for o in (out if isinstance(out, (list, tuple)) else [out]):
            if not isinstance(o, torch.Tensor):
                continue
            st = o.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0 or (ptr in seen and ptr not in self.refs):
                continue  # empty, or a view of a tensor made before the step
            if ptr in self.refs:
                self.refs[ptr][1] += 1
            else:
                self.refs[ptr] = [st.nbytes(), 1]
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
            weakref.finalize(o, self._release, ptr)
        return out


def sample_active(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` distinct linear indices in [0, n^2), sorted, without an n^2 permutation."""
    idx = torch.zeros(0, dtype=torch.long)
    while idx.numel() < count:
        extra = torch.randint(n * n, (2 * (count - idx.numel()) + 16,), generator=gen)
        idx = torch.unique(torch.cat([idx, extra]))
    keep = torch.randperm(idx.numel(), generator=gen)[:count]
    return torch.sort(idx[keep]).values


def rigl_grow(x, delta, mask, k):
    grad = delta.t() @ x  # the dense gradient, n x n
    grad.abs_()
    grad.masked_fill_(mask, float("-inf"))
    return torch.topk(grad.view(-1), k, sorted=False).indices


def gse_grow(layer, x, delta, active, k, n_cand, chunk, gen, guided):
    n_out, fan_in = layer.weight.shape
    dev = x.device
    if guided:
        p_out = delta.abs().sum(0).cpu().double()
        p_in = x.abs().sum(0).cpu().double()
        o = torch.multinomial(p_out, n_cand, replacement=True, generator=gen)
        j = torch.multinomial(p_in, n_cand, replacement=True, generator=gen)
    else:
        o = torch.randint(n_out, (n_cand,), generator=gen)
        j = torch.randint(fan_in, (n_cand,), generator=gen)
    lin = (o * fan_in + j).to(dev)
    pos = torch.searchsorted(active, lin).clamp_(max=active.numel() - 1)
    lin = torch.unique(lin[active[pos] != lin])
    g = candidate_gradients(layer, x, delta, lin // fan_in, lin % fan_in, chunk)
    top = torch.topk(g.abs(), min(k, lin.numel()), sorted=False).indices
    return lin[top]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        rec = LiveBytes()
        with rec:
            fn()
        peak = rec.peak
    return min(times), peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--rigl-max-width", type=int, default=16384, help="skip RigL above this width")
    ap.add_argument("--active", type=int, default=65536, help="fixed number of active connections |A|")
    ap.add_argument("--density", type=float, default=None, help="instead of --active: |A| = density * n^2")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# torch {torch.__version__} | {platform.processor() or platform.machine()} | device {device} | "
          f"threads {torch.get_num_threads()} | batch {args.batch} | alpha {args.alpha} | gamma {args.gamma} | "
          f"chunk {args.chunk_size}")
    print("| width n | active abs(A) | density | RigL time (ms) | RigL peak (MiB) | GSE uniform time (ms) | "
          "GSE uniform peak (MiB) | GSE GraBo time (ms) | GSE GraBo peak (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.widths:
        gen = torch.Generator().manual_seed(args.seed)
        count = int(round(args.density * n * n)) if args.density is not None else args.active
        count = min(count, n * n)
        active = sample_active(n, count, gen).to(device)
        x = torch.randn(args.batch, n, generator=gen).to(device)
        delta = torch.randn(args.batch, n, generator=gen).to(device)
        k = math.ceil(args.alpha * count)
        n_cand = int(round(args.gamma * count))
        layer = nn.Linear(n, n, bias=False, device="meta")
        row = [f"{n}", f"{count}", f"{count / (n * n):.3g}"]
        if n <= args.rigl_max_width:
            mask = torch.zeros(n * n, dtype=torch.bool, device=device)
            mask[active] = True
            mask = mask.view(n, n)
            t, peak = measure(lambda x=x, delta=delta, mask=mask, k=k: rigl_grow(x, delta, mask, k),
                              device, args.repeats)
            row += [f"{t * 1e3:.1f}", f"{peak / 2**20:.1f}"]
            del mask
        else:
            row += ["-", "-"]
        for guided in (False, True):
            g2 = torch.Generator().manual_seed(args.seed + 1)
            t, peak = measure(
                lambda layer=layer, x=x, delta=delta, active=active, k=k, n_cand=n_cand, g2=g2, guided=guided:
                gse_grow(layer, x, delta, active, k, n_cand, args.chunk_size, g2, guided),
                device, args.repeats)
            row += [f"{t * 1e3:.1f}", f"{peak / 2**20:.1f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
