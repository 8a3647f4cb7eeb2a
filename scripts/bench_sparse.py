#!/usr/bin/env python
"""Sparse execution benchmarks: dense vs masked vs sparse, per layer and per training step.

    python scripts/bench_sparse.py layers   # 768->3072 @ B2048, 4096x4096 @ B128; + torch CSR, SparseProp
    python scripts/bench_sparse.py models   # LeNet-300-100, LeNet-5-Caffe, MLP 784-4096-4096-10, and
        # GSE's ResNet-56, VGG-16-small, ViT-CIFAR (batch 128, 3x32x32), ResNet-50 (batch 8, 224x224)
    python scripts/bench_sparse.py gse      # GSE grow step and sparse train step, widths 1k-65k
    python scripts/bench_sparse.py update   # one SM / RigL / SET mask update on VGG16-D (masked)
    python scripts/bench_sparse.py layers --device cuda   # where a GPU is lent (torch's CSR ops there)

Every table interleaves its variants (A B C A B C ... for --rounds rounds of --steps steps) and
prints the minimum and the median time per step over the rounds, so a machine shared with other
jobs disturbs the ratios less; `--threads` sets torch's (and the kernels') thread count (1 by
default). Memory: "resident" is the bytes of everything the variant keeps between steps
(parameters, buffers, optimizer state, masks); "peak" is the peak of live bytes allocated by
torch ops during one step (tracked op by op, as scripts/bench_grow_step.py does).

SparseProp (IST-DASLab, pip `sparseprop`) is measured when it is installed, and skipped with a
note when it is not; it is a comparison only, not a dependency.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grow_step import LiveBytes, sample_active, sync  # noqa: E402

from sparse_bench.models import build_model  # noqa: E402
from sparse_bench.sparsity.execution import Execution, kernels  # noqa: E402
from sparse_bench.sparsity.execution.layers import SparseLinear  # noqa: E402
from sparse_bench.sparsity.methods import MethodContext, build_method, call_hook  # noqa: E402
from sparse_bench.sparsity.structure import Structure  # noqa: E402
from sparse_bench.train.trainer import hooked_step  # noqa: E402

DENSITIES = (0.01, 0.02, 0.05, 0.10)
DEVICE = torch.device("cpu")


def machine() -> str:
    if DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def interleaved(fns: dict, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    """(min, median) seconds per call of each function, timed A B C A B C ..."""
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            sync(DEVICE)
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            sync(DEVICE)
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def peak_bytes(f) -> int:
    if DEVICE.type == "cuda":  # the allocator's own peak, above what was allocated before
        sync(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        f()
        sync(DEVICE)
        return torch.cuda.max_memory_allocated(DEVICE) - base
    with LiveBytes() as mode:
        f()
    return mode.peak


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def ms(t: float) -> str:
    return f"{t * 1e3:.2f}"


def try_sparseprop(threads: int):
    if DEVICE.type != "cpu":
        return None
    try:
        import sparseprop
        from sparseprop.modules import SparseLinear as SPLinear
    except ImportError:
        return None
    sparseprop.set_num_threads(threads)
    return SPLinear


# --- single layers -----------------------------------------------------------------------------
class FeatureMajorCSR(nn.Module):
    """A sparse Linear on the feature-major CSR kernels (sb_spmm / sb_sddmm, what convolutions'
    patch matrices run): its input transposed into memory first, as every 2-d Linear ran before
    the Linear kernels."""

    def __init__(self, layer: SparseLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer._matmul(x.t().unsqueeze(0))[0].t()


def table_layers(a):
    sp_cls = try_sparseprop(a.threads)
    print(f"# single layers: forward + backward (input and weight gradients), {machine()}")
    if sp_cls is None:
        print("# SparseProp not installed (pip install sparseprop) or not on this device: its column is skipped")
    print("# feature-major CSR: the sparse layer on the kernels for patch matrices (its input transposed first);"
          " row pointers: a fan_in mask read by its row pointers (the condensed path off)")
    print("| layer | batch | density | dense ms (min/med) | sparse ms (min/med) | feature-major CSR ms (min/med) "
          "| row pointers ms (min/med) | torch CSR ms | SparseProp ms | sparse vs dense | sparse vs feature-major CSR "
          "| sparse vs row pointers | sparse vs SparseProp | dense MiB resident/peak | sparse MiB resident/peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fan_in, fan_out, batch in (tuple(int(v) for v in spec.split("x")) for spec in a.layers):
        for d in a.densities:
            torch.manual_seed(0)
            dense = nn.Linear(fan_in, fan_out).to(DEVICE)
            if a.mask == "fan_in":  # the same count in every row (structure=fan_in)
                mask = Structure("fan_in").random_masks([(fan_out, fan_in)], [int(round(d * fan_in * fan_out))],
                                                        torch.Generator().manual_seed(0))[0].to(DEVICE)
            else:
                mask = torch.zeros(fan_out * fan_in, dtype=torch.bool)
                mask[torch.randperm(fan_out * fan_in)[: int(round(d * fan_in * fan_out))]] = True
                mask = mask.view(fan_out, fan_in).to(DEVICE)
            with torch.no_grad():
                dense.weight.mul_(mask)
            sparse = SparseLinear.from_dense(dense, mask)
            sparse.bias = nn.Parameter(dense.bias.detach().clone())
            x = torch.randn(batch, fan_in, device=DEVICE)
            g = torch.randn(batch, fan_out, device=DEVICE)

            # the functions below are timed within this iteration: B023's late binding cannot bite, and
            # default arguments would change the timed functions' signatures
            def step(layer):
                xi = x.detach().requires_grad_(True)  # noqa: B023 (called in this iteration only)
                layer(xi).backward(g)  # noqa: B023 (called in this iteration only)
                for p in layer.parameters():
                    p.grad = None

            def torch_csr():
                os.environ["SPARSE_BENCH_KERNELS"] = "torch"
                try:
                    step(sparse)  # noqa: B023 (called in this iteration only)
                finally:
                    os.environ["SPARSE_BENCH_KERNELS"] = a.kernels

            fns = {"dense": lambda dense=dense: step(dense), "sparse": lambda sparse=sparse: step(sparse)}
            if DEVICE.type == "cpu":  # on CUDA the sparse step is torch's CSR ops already
                fns["csr"] = torch_csr
            if DEVICE.type == "cpu":
                fm_layer = FeatureMajorCSR(sparse)
                fns["feature_major"] = lambda fm_layer=fm_layer: step(fm_layer)
            if a.mask == "fan_in" and DEVICE.type == "cpu":
                # the same mask read by its row pointers: the layer's condensed path switched off
                by_rows = SparseLinear.from_dense(dense, mask)
                by_rows.bias, by_rows._k = sparse.bias, (0, None)
                fns["row_pointers"] = lambda by_rows=by_rows: step(by_rows)
            if sp_cls is not None:
                spl = sp_cls.from_dense(dense)
                fns["sparseprop"] = lambda spl=spl: step(spl)
            t = interleaved(fns, a.rounds, a.steps)
            res_d = sum(p.numel() * p.element_size() for p in dense.parameters())
            res_s = sum(p.numel() * p.element_size() for p in [*sparse.parameters(), *sparse.buffers()])
            pk_d, pk_s = peak_bytes(lambda dense=dense: step(dense)), peak_bytes(lambda sparse=sparse: step(sparse))
            spt = t.get("sparseprop")
            sp_txt = f"{ms(spt[0])}" if spt else "-"
            vs_sp = f"{spt[0] / t['sparse'][0]:.2f}x" if spt else "-"
            others = {}
            for key in ("feature_major", "row_pointers"):
                o = t.get(key)
                others[key] = (f"{ms(o[0])}/{ms(o[1])}", f"{o[0] / t['sparse'][0]:.2f}x") if o else ("-", "-")
            fm, rp = others["feature_major"], others["row_pointers"]
            print(f"| {fan_in}->{fan_out} | {batch} | {d:.0%} | {ms(t['dense'][0])}/{ms(t['dense'][1])} "
                  f"| {ms(t['sparse'][0])}/{ms(t['sparse'][1])} | {fm[0]} | {rp[0]} "
                  f"| {ms(t.get('csr', t['sparse'])[0])} "
                  f"| {sp_txt} | {t['dense'][0] / t['sparse'][0]:.1f}x | {fm[1]} | {rp[1]} | {vs_sp} "
                  f"| {mib(res_d)}/{mib(pk_d)} | {mib(res_s)}/{mib(pk_s)} |", flush=True)


# --- whole training steps -------------------------------------------------------------------------
MODELS = {
    "lenet300_100": ({"name": "lenet300_100", "in_features": 784}, (1, 28, 28), 100),
    "lenet5_caffe": ({"name": "lenet5_caffe"}, (1, 28, 28), 100),
    "mlp4096": ({"name": "mlp", "hidden": [4096, 4096]}, (1, 28, 28), 128),
    # GSE's CIFAR models (conf/model/*.yaml) at GSE's batch 128
    "resnet56": ({"name": "resnet56"}, (3, 32, 32), 128),
    "vgg16_small": ({"name": "vgg16_small"}, (3, 32, 32), 128),
    "vit_cifar": ({"name": "vit_cifar"}, (3, 32, 32), 128),
    "resnet50": ({"name": "resnet50"}, (3, 224, 224), 8),
}


def build_variant(model_name: str, variant: str, density: float, method: str, structure: str = "unstructured"):
    cfg, shape, batch = MODELS[model_name]
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(cfg), shape, 10).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, *shape, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    from sparse_bench.confdir import conf_dir

    mcfg = OmegaConf.load(conf_dir() / "method" / f"{'dense' if variant == 'dense' else method}.yaml")
    # per-step cost only: uniform layer densities, no mask update inside the timed steps (keys the
    # method has; its schema refuses others)
    for key, value in (("init", "uniform"), ("update_every", 10**9)):
        if key in mcfg:
            mcfg[key] = value
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=1, steps_per_epoch=10**6,
                        device=DEVICE, generator=torch.Generator().manual_seed(1),
                        loss_fn=nn.CrossEntropyLoss(), batches=lambda n, key=0: [(x, y)],
                        structure=Structure("unstructured" if variant == "dense" else structure))
    inner = build_method(mcfg, ctx)
    m = Execution(inner, "masked" if variant == "dense" else variant, opt, model, batches=lambda n, key=0: [(x, y)])
    call_hook(inner, [m], "setup")
    state = {"i": 0}

    def step():
        i = state["i"]
        hooked_step(inner, opt, i, lambda: nn.functional.cross_entropy(model(x), y), [m])
        call_hook(inner, [m], "on_step_end", i + 1)
        state["i"] = i + 1

    def resident() -> int:
        seen, total = set(), 0
        tensors = [*model.parameters(), *model.buffers()]
        for st in opt.state.values():
            tensors += [v for v in st.values() if torch.is_tensor(v)]
        if inner.masks is not None:
            tensors += inner.masks.held_tensors()  # masks, their float copies, inactive weights' momentum
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    return step, resident, m


def table_models(a):
    print(f"# training steps (forward, backward, SGD+Nesterov, mask upkeep; method={a.method}, "
          f"structure={a.structure}), {machine()}")
    print("| model | density | dense ms | masked ms (min/med) | sparse ms (min/med) | auto ms | sparse vs masked "
          "| auto's choice | MiB resident dense/masked/sparse | MiB peak dense/masked/sparse |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    if a.structure == "fan_in":
        print("# structure=fan_in: 'row pointers' is the sparse variant with its layers' condensed path off")
    for model_name in a.models:
        for d in a.densities:
            built = {v: build_variant(model_name, v, d, a.method, a.structure)
                     for v in ("dense", "masked", "sparse", "auto")}
            fns = {v: b[0] for v, b in built.items()}
            if a.structure == "fan_in":
                step, _, m = build_variant(model_name, "sparse", d, a.method, a.structure)
                for layer in m.method.masks.layers:
                    if layer is not None:
                        layer._k = (0, None)  # the same masks read by their row pointers
                fns["row pointers"] = step
            t = interleaved(fns, a.rounds, a.steps)
            if "row pointers" in t:
                c = t["row pointers"]
                print(f"# {model_name} {d:.0%}: row pointers {ms(c[0])}/{ms(c[1])} ms, condensed "
                      f"{ms(t['sparse'][0])}/{ms(t['sparse'][1])} ms: {c[0] / t['sparse'][0]:.2f}x", flush=True)
            plan = built["auto"][2].plan
            n_sparse = sum(v == "sparse" for v in plan.values())
            masked = [k.rsplit(".", 1)[0] for k, v in plan.items() if v != "sparse"]
            choice = ("masked: " + ", ".join(masked[:6]) + (", ..." if len(masked) > 6 else "")) if masked else "all"
            res = [built[v][1]() for v in ("dense", "masked", "sparse")]
            pk = [peak_bytes(built[v][0]) for v in ("dense", "masked", "sparse")]
            print(f"| {model_name} | {d:.0%} | {ms(t['dense'][0])} | {ms(t['masked'][0])}/{ms(t['masked'][1])} "
                  f"| {ms(t['sparse'][0])}/{ms(t['sparse'][1])} | {ms(t['auto'][0])} "
                  f"| {t['masked'][0] / t['sparse'][0]:.2f}x | {n_sparse}/{len(plan)} sparse ({choice}) "
                  f"| {'/'.join(mib(r) for r in res)} | {'/'.join(mib(p) for p in pk)} |", flush=True)


# --- GSE at growing width -------------------------------------------------------------------------
def table_gse(a):
    """One n x n sparse layer at a fixed number of active weights: GSE's grow step (candidate
    gradients from inputs and output gradients) and a sparse training step, as n grows."""
    from sparse_bench.sparsity.candidate_grad import candidate_gradients

    print(f"# GSE at fixed |A| = {a.active:,} active weights, batch {a.batch}, {machine()}")
    print("| width n | density | grow step ms | sparse train step ms (fwd+bwd+SGD) | resident MiB | "
          "peak MiB (train step) | dense weight would be MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in a.widths:
        gen = torch.Generator().manual_seed(0)
        lin = sample_active(n, min(a.active, n * n), gen)
        layer = SparseLinear(n, n, nn.Parameter(torch.zeros(n)))
        layer.set_active(lin, torch.randn(lin.numel(), generator=gen) * 0.01)
        opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(a.batch, n, generator=gen)
        g = torch.randn(a.batch, n, generator=gen)
        k = math.ceil(0.2 * lin.numel())

        # train and grow are timed within this iteration: B023's late binding cannot bite, and default
        # arguments would change the timed functions' signatures
        def train():
            xi = x.detach().requires_grad_(True)  # noqa: B023 (called in this iteration only)
            layer(xi).backward(g)  # noqa: B023 (called in this iteration only)
            opt.step()  # noqa: B023 (called in this iteration only)
            opt.zero_grad(set_to_none=True)  # noqa: B023 (called in this iteration only)

        def grow():
            o = torch.randint(n, (lin.numel(),), generator=gen)  # noqa: B023 (called in this iteration only)
            j = torch.randint(n, (lin.numel(),), generator=gen)  # noqa: B023 (called in this iteration only)
            cand = o * n + j  # noqa: B023 (called in this iteration only)
            act = layer.active_linear()  # noqa: B023 (called in this iteration only)
            pos = torch.searchsorted(act, cand).clamp_max(act.numel() - 1)
            cand = torch.unique(cand[act[pos] != cand])
            sc = candidate_gradients(layer, x, g, cand // n, cand % n).abs()  # noqa: B023 (called in this iteration only)
            return torch.topk(sc, min(k, sc.numel()), sorted=False).indices  # noqa: B023 (called in this iteration only)

        t = interleaved({"grow": grow, "train": train}, a.rounds, 1)
        res = sum(p.numel() * p.element_size() for p in [*layer.parameters(), *layer.buffers()])
        res += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        print(f"| {n:,} | {lin.numel() / n / n:.4%} | {ms(t['grow'][0])} | {ms(t['train'][0])} | {mib(res)} "
              f"| {mib(peak_bytes(train))} | {mib(4 * n * n)} |", flush=True)


# --- mask updates on VGG16-D ------------------------------------------------------------------------
def table_update(a):
    """One mask update (the method's own `update`) on VGG16-D, masked execution; host syncs are
    the ops that need the host to wait for a device (scalar reads, nonzero, copies to the CPU),
    counted with torch.profiler on a separate run."""
    from torch.profiler import ProfilerActivity, profile

    from sparse_bench.confdir import conf_dir

    print(f"# one mask update on VGG16-D (CIFAR-10 shape, density {a.update_density}, masked), {machine()}")
    print("| method | update s (min/med of n) | host syncs | topk calls |")
    print("|---|---:|---:|---:|")
    for method in a.update_methods:
        torch.manual_seed(0)
        model = build_model(OmegaConf.create({"name": "vgg16_d"}), (3, 32, 32), 10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(8, 3, 32, 32)
        y = torch.randint(0, 10, (8,))
        cfg = OmegaConf.load(conf_dir() / "method" / f"{method}.yaml")
        ctx = MethodContext(model=model, optimizer=opt, density=a.update_density, epochs=2, steps_per_epoch=1000,
                            device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                            loss_fn=nn.CrossEntropyLoss(),
                            batches=lambda n, key=0: [(x, y)])  # noqa: B023 (used by m in this iteration only)
        m = build_method(cfg, ctx)
        m.setup()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        m.after_optimizer_step(0)
        times = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            m.update(100)
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            m.update(100)
        ev = {e.key: e.count for e in prof.key_averages()}
        syncs = ev.get("aten::_local_scalar_dense", 0) + ev.get("aten::nonzero", 0)
        print(f"| {method} | {min(times):.3f}/{statistics.median(times):.3f} (n={len(times)}) | {syncs} "
              f"| {ev.get('aten::topk', 0)} |", flush=True)


# --- DeepR's per-step rewiring ----------------------------------------------------------------------
def table_deepr(a):
    """DeepR rewires after every optimizer step; how the regrown positions are drawn decides its
    cost: one sort of each layer's random scores (sync-free, used on accelerators) against a
    top-k of the dead count (used on the CPU). Both variants step the same method on the same
    weights, interleaved A B A B."""
    from sparse_bench.confdir import conf_dir

    print(f"# DeepR's rewiring after one optimizer step (masked, density {a.update_density}), {machine()}")
    print("| model | weights | sort draw s (min/med) | top-k draw s (min/med) | ratio (min) |")
    print("|---|---:|---:|---:|---:|")
    for name, shape in (("vgg16_d", (3, 32, 32)), ("resnet50", (3, 224, 224))):
        torch.manual_seed(0)
        model = build_model(OmegaConf.create({"name": name}), shape, 10 if name == "vgg16_d" else 1000)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cfg = OmegaConf.load(conf_dir() / "method" / "deepr.yaml")
        cfg.temperature = 1e-3  # some connections die every step
        ctx = MethodContext(model=model, optimizer=opt, density=a.update_density, epochs=2, steps_per_epoch=1000,
                            device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                            loss_fn=nn.CrossEntropyLoss())
        m = build_method(cfg, ctx)
        m.setup()
        times = {True: [], False: []}
        for r in range(a.rounds):
            for sort_draw in (True, False):
                m.sort_draw = sort_draw
                t0 = time.perf_counter()
                m.after_optimizer_step(r)
                times[sort_draw].append(time.perf_counter() - t0)
        srt, top = times[True], times[False]
        print(f"| {name} | {sum(m.masks.numels):,} | {min(srt):.3f}/{statistics.median(srt):.3f} | "
              f"{min(top):.3f}/{statistics.median(top):.3f} | {min(srt) / min(top):.1f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=["layers", "models", "gse", "update", "deepr"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (layers and models tables)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    ap.add_argument("--mask", choices=["random", "fan_in"], default="random",
                    help="layers table: positions uniformly at random, or the same count in every row "
                         "(structure=fan_in: condensed, beside the same mask read by its row pointers)")
    ap.add_argument("--layers", nargs="+", default=["768x3072x2048", "4096x4096x128"],
                    help="layers table: fan_in x fan_out x batch")
    ap.add_argument("--models", nargs="+", default=["lenet300_100", "lenet5_caffe", "mlp4096"],
                    help=f"of {', '.join(MODELS)} (default: the three small ones)")
    ap.add_argument("--method", default="static")
    ap.add_argument("--structure", choices=["unstructured", "fan_in"], default="unstructured",
                    help="models table: the masks' structure (fan_in: condensed, beside row pointers)")
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--active", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--update-methods", nargs="+", default=["sparse_momentum", "rigl", "set"])
    ap.add_argument("--update-density", type=float, default=0.05)
    a = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda" and a.table not in ("layers", "models"):
        raise SystemExit("--device cuda is for the layers and models tables")
    torch.set_num_threads(a.threads)
    a.kernels = os.environ.get("SPARSE_BENCH_KERNELS", "auto")
    print(f"# kernels: {kernels.backend()}")
    {"layers": table_layers, "models": table_models, "gse": table_gse, "update": table_update,
     "deepr": table_deepr}[a.table](a)


if __name__ == "__main__":
    main()
