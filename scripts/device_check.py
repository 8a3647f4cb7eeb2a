#!/usr/bin/env python
"""The GPU check (run by scripts/device_check.sh): one Markdown report of what only a GPU shows.

Sections, each under its own time budget (a section that runs out, or fails, says so in the
report and the next one runs):

1. the machine (GPU, torch, CUDA);
2. the CUDA tests (``pytest -m cuda``);
3. ResNet-50 on synthetic ImageNet-shaped batches: fp32, bf16, and bf16 + channels_last +
   torch.compile, each dense, masked (static, 10%) and RigL with its mask updates: images/s;
4. GSE on ResNet-56, CIFAR-100-shaped batches of 128: one epoch-equivalent of steps (391) with
   mask updates, ms per step;
5. ``bench_sparse.py --device cuda layers`` (torch's CSR kernels beside dense and masked);
5b. where a RigL mask update's time goes, eager and compiled (``rigl_steps``): per-step times of
   ResNet-50 in bf16 + channels_last around its updates (the update step's training part, the
   update itself, the step after it, the other steps) and how many graphs dynamo compiled;
6. 2:4 semi-structured linear layers (``structure=nm``, n=2, m=4) beside dense bf16: forward and
   training-step milliseconds, and their largest difference from the masked dense product;
7. the ImageNet decoders (``dataset.decoder``) on a generated JPEG folder: images/s.

``--smoke`` runs every section at toy sizes on whatever device there is (the test suite runs it
on the CPU, so the script cannot rot between GPU sessions).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from sparse_bench.confdir import conf_dir  # noqa: E402
from sparse_bench.models import build_model  # noqa: E402
from sparse_bench.sparsity.methods import MethodContext, build_method  # noqa: E402
from sparse_bench.sparsity.structure import Structure  # noqa: E402
from sparse_bench.train.precision import Amp  # noqa: E402
from sparse_bench.train.trainer import hooked_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines += list(lines)
        self.path.write_text("\n".join(self.lines) + "\n")  # written as it goes: a killed run keeps its part
        print("\n".join(lines), flush=True)


def _trainer(method: str, precision: str, channels_last: bool, compiled: bool, shape: tuple, classes: int,
             batch: int, total_steps: int, device: torch.device, model_cfg: dict, density: float = 0.1,
             update_every: int = 10, smoke: bool = False):
    """A model with `method` (updates to the end) on one synthetic batch, SGD with Nesterov:
    returns a function running training step `step` (forward, backward, optimizer) and the method
    (whose ``on_step_end`` makes the mask updates)."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(model_cfg), shape, classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5, foreach=True)
    x = torch.randn(batch, *shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    cfg = OmegaConf.load(conf_dir() / "method" / f"{method}.yaml")
    for key, value in (("update_every", update_every), ("end", {"unit": "fraction", "value": 1.0})):
        if key in cfg:
            cfg[key] = value
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=1, steps_per_epoch=total_steps + 1,
                        device=device, generator=torch.Generator().manual_seed(1), loss_fn=nn.CrossEntropyLoss(),
                        batches=lambda n, key=0: [(x, y)] * n)
    m = build_method(cfg, ctx)
    m.setup()
    amp = Amp(precision, device)
    # --smoke: dynamo with the eager backend (the same capture, none of inductor's code generation)
    forward_model = torch.compile(model, backend="eager" if smoke else "inductor") if compiled else model

    def train_step(step: int) -> None:
        hooked_step(m, opt, step, lambda: nn.functional.cross_entropy(forward_model(x), y), amp=amp)

    return train_step, m


def train_rate(model_name: str, method: str, precision: str, channels_last: bool, compiled: bool,
               shape: tuple, classes: int, batch: int, steps: int, warmup: int, device: torch.device,
               density: float = 0.1, update_every: int = 10, model_cfg: dict | None = None,
               smoke: bool = False) -> float:
    """Images per second of `steps` training steps (after `warmup`), mask updates included."""
    train_step, m = _trainer(method, precision, channels_last, compiled, shape, classes, batch, steps + warmup,
                             device, model_cfg or {"name": model_name}, density, update_every, smoke)
    t0 = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        train_step(step)
        m.on_step_end(step + 1)
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


SECTIONS = ("tests", "resnet50", "gse", "layers", "rigl_steps", "two_four", "decoders")


def rigl_step_times(compiled: bool, device: torch.device, smoke: bool) -> str:
    """One table row: median ms of RigL's training steps away from updates, of the update steps'
    training part, of the updates (``on_step_end``), of the steps right after them, and the graphs
    dynamo compiled (more than at the start: the updates made it compile again)."""
    import statistics

    from torch._dynamo.utils import counters

    shape, classes, batch, every, steps = ((1, 8, 8), 10, 16, 3, 10) if smoke else ((3, 224, 224), 1000, 128, 10, 45)
    model_cfg = {"name": "mlp", "hidden": [32], "dropout": 0.0} if smoke else {"name": "resnet50"}
    train_step, m = _trainer("rigl", "fp32" if smoke else "bf16", not smoke, compiled, shape, classes, batch, steps,
                             device, model_cfg, update_every=every, smoke=smoke)
    counters.clear()
    kinds: dict[str, list[float]] = {"other": [], "update step": [], "update": [], "after update": []}
    graphs_at_start, after = None, False
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(step)
        sync(device)
        t1 = time.perf_counter()
        updated = bool(m.on_step_end(step + 1))
        sync(device)
        t2 = time.perf_counter()
        if step == 1:
            graphs_at_start = counters["stats"]["unique_graphs"]
        if step >= 2:  # past compilation and the allocator's warm-up
            kinds["update step" if updated else "after update" if after else "other"].append(1e3 * (t1 - t0))
            if updated:
                kinds["update"].append(1e3 * (t2 - t1))
        after = updated
    med = {k: statistics.median(v) if v else float("nan") for k, v in kinds.items()}
    graphs = f"{graphs_at_start} -> {counters['stats']['unique_graphs']}"
    return (f"| {'compiled' if compiled else 'eager'} | {med['other']:.1f} | {med['update step']:.1f} | "
            f"{med['update']:.1f} | {med['after update']:.1f} | {graphs} |")


def section(report: Report, title: str, budget_s: float, deadline: float, key: str = "", chosen=SECTIONS):
    """A context for one section: its heading, its time left, and its failure as a line."""

    @contextlib.contextmanager
    def run():
        report.add("", f"## {title}", "")
        left = deadline - time.monotonic()
        if key not in chosen:
            report.add("skipped: not among --sections")
            yield None
            return
        if left < 10:
            report.add(f"skipped: the check's time is spent ({left:.0f} s left)")
            yield None
            return
        t0 = time.monotonic()
        try:
            yield min(budget_s, left)
        except Exception as exc:  # noqa: BLE001 - a failing section is reported, the next one runs
            report.add(f"failed: {type(exc).__name__}: {exc}", "", "```", traceback.format_exc()[-2000:], "```")
        report.add("", f"({time.monotonic() - t0:.0f} s)")

    return run()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of the report (device_check.md)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on whatever device there is")
    ap.add_argument("--minutes", type=float, default=7.5)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--resnet50-rows", default="fp32,bf16,bf16+compile", help="of fp32, bf16, bf16+compile "
                    "(bf16 with channels_last and torch.compile)")
    a = ap.parse_args()
    chosen = a.sections.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(Path(a.out) / "device_check.md")
    deadline = time.monotonic() + 60 * a.minutes
    smoke = a.smoke
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report.add("# Device check", "", f"- machine: {name}; torch {torch.__version__}, CUDA {torch.version.cuda}",
               f"- sizes: {'smoke (toy)' if smoke else 'full'}; started {time.strftime('%Y-%m-%d %H:%M:%S')}")

    with section(report, "CUDA tests (pytest -m cuda)", 150, deadline, "tests", chosen) as budget:
        if budget is not None:
            if smoke:
                report.add("not run under --smoke")
            else:
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                       "-p", "no:logging", "--tb=short", "tests"], cwd=ROOT, capture_output=True,
                                      text=True, timeout=budget)
                (Path(a.out) / "device_check_pytest.txt").write_text(proc.stdout + proc.stderr)
                report.add(f"exit {proc.returncode} (the whole output: device_check_pytest.txt)", "", "```",
                           proc.stdout[-3000:], proc.stderr[-1000:], "```")

    r50 = dict(model_name="resnet50", shape=(3, 224, 224), classes=1000, batch=128, steps=20, warmup=5)
    if smoke:
        r50 = dict(model_name="mlp", shape=(1, 8, 8), classes=10, batch=16, steps=3, warmup=1,
                   model_cfg={"name": "mlp", "hidden": [32], "dropout": 0.0})
    with section(report, "ResNet-50, synthetic ImageNet-shaped batches of 128: images/s", 240, deadline,
                 "resnet50", chosen) as budget:
        if budget is not None:
            report.add("| precision | layout / compile | dense | masked (static 10%) | RigL 10% (update every 10) "
                       "| RigL 10% (update every 100, 200 steps) |", "|---|---|---:|---:|---:|---:|")
            rows = {"fp32": ("fp32", False, False), "bf16": ("bf16", False, False),
                    "bf16+compile": ("bf16", True, True)}
            for precision, cl, comp in (rows[r] for r in a.resnet50_rows.split(",")):
                rates = []
                for method, every, steps in (("dense", 10, None), ("static", 10, None), ("rigl", 10, None),
                                             ("rigl", 100, 3 if smoke else 200)):
                    kw = {**r50, "steps": steps or r50["steps"]}
                    rates.append(train_rate(method=method, precision=precision, channels_last=cl, compiled=comp,
                                            device=device, update_every=every, smoke=smoke, **kw))
                report.add(f"| {precision} | {'channels_last + compile' if comp else 'default'} | "
                           + " | ".join(f"{r:,.0f}" for r in rates) + " |")

    with section(report, "GSE, ResNet-56 on CIFAR-100-shaped batches of 128: one epoch of steps", 90,
                 deadline, "gse", chosen) as budget:
        if budget is not None:
            steps = 4 if smoke else 391
            shape_kw = dict(model_name="resnet56", shape=(3, 32, 32), classes=100, batch=128, steps=steps, warmup=3)
            if smoke:
                shape_kw.update(model_name="mlp", shape=(1, 8, 8), classes=10, batch=16,
                                model_cfg={"name": "mlp", "hidden": [32], "dropout": 0.0})
            rate = train_rate(method="gse", precision="fp32", channels_last=False, compiled=False, device=device,
                              density=0.02, update_every=100 if not smoke else 2, **shape_kw)
            report.add(f"{steps} steps at density 2%, an update every {100 if not smoke else 2} steps: "
                       f"{rate:,.0f} images/s, {1000 * shape_kw['batch'] / rate:.1f} ms per step")

    with section(report, "bench_sparse.py layers (dense, masked, sparse)", 90, deadline, "layers", chosen) as budget:
        if budget is not None:
            args = [sys.executable, "scripts/bench_sparse.py", "layers", "--device", device.type, "--rounds",
                    "1" if smoke else "3", "--steps", "1" if smoke else "3"]
            if smoke:
                args += ["--densities", "0.05", "--layers", "64x128x32"]
            proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=budget,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            report.add(proc.stdout[-4000:] or "(no output)", *(["", "```", proc.stderr[-1500:], "```"]
                                                               if proc.returncode else []))

    with section(report, "Where RigL's mask updates cost (ResNet-50, bf16 + channels_last, an update every 10 steps)",
                 120, deadline, "rigl_steps", chosen) as budget:
        if budget is not None:
            report.add("| forward | training step ms (other steps) | training part of an update step | the update "
                       "(on_step_end) | the step after an update | graphs compiled (after 2 steps -> at the end) |",
                       "|---|---:|---:|---:|---:|---|")
            for compiled in (False, True):
                report.add(rigl_step_times(compiled, device, smoke))

    with section(report, "2:4 semi-structured linear (structure=nm, 2:4) beside dense, bf16", 60, deadline,
                 "two_four", chosen) as budget:
        if budget is not None:
            report.add(*two_four_rates(device, smoke))
    with section(report, "ImageNet decoders on a generated JPEG folder: images/s", 60, deadline,
                 "decoders", chosen) as budget:
        if budget is not None:
            report.add(*decoder_rates(device, smoke))
    report.add("", f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return 0


def _ms(fn, reps: int, device: torch.device) -> float:
    """Milliseconds per call of `fn`: the minimum over `reps` timed calls after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return min(times)


def two_four_rates(device: torch.device, smoke: bool) -> list[str]:
    """A linear layer with a 2:4 mask: dense bf16 product vs torch's semi-structured one."""

    from sparse_bench.sparsity.execution import semistructured

    if not semistructured.available(device):
        return [f"not available on {device.type} (needs CUDA, compute capability >= 8.0)"]
    lines = ["| tokens x in -> out | dense fwd ms | 2:4 fwd ms (weight compressed once) | 2:4 fwd ms (compressed "
             "each call) | dense train step ms | 2:4 train step ms | max abs diff vs masked |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    shapes = [(64, 128, 64)] if smoke else [(2048, 768, 3072), (8192, 4096, 4096), (16384, 8192, 8192)]
    for tokens, fan_in, out in shapes:
        lines.append(_two_four_row(tokens, fan_in, out, device, 3 if smoke else 20))
    return lines


def _two_four_row(tokens: int, fan_in: int, out: int, device: torch.device, reps: int) -> str:
    from torch.nn import functional as F

    from sparse_bench.sparsity.execution import semistructured

    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    mask = Structure("nm", 2, 4).random_masks([(out, fan_in)], [0], torch.Generator().manual_seed(0))[0]
    mask = mask.to(device, dtype)
    w = (torch.randn(out, fan_in, device=device, dtype=dtype, generator=g) * mask).requires_grad_(True)
    x = torch.randn(tokens, fan_in, device=device, dtype=dtype, generator=g, requires_grad=True)
    packed = semistructured.compress(w.detach(), dtype)
    with torch.no_grad():
        diff = (F.linear(x, packed) - F.linear(x, w)).abs().max().item()
        dense_fwd = _ms(lambda: F.linear(x, w), reps, device)
        once_fwd = _ms(lambda: F.linear(x, packed), reps, device)
        each_fwd = _ms(lambda: semistructured.two_four_linear(x, w, mask), reps, device)
    dense_step = _ms(lambda: F.linear(x, w).sum().backward(), reps, device)
    sparse_step = _ms(lambda: semistructured.two_four_linear(x, w, mask).sum().backward(), reps, device)
    return (f"| {tokens} x {fan_in} -> {out} | {dense_fwd:.3f} | {once_fwd:.3f} | {each_fwd:.3f} | "
            f"{dense_step:.3f} | {sparse_step:.3f} | {diff:.3g} |")


def decoder_rates(device: torch.device, smoke: bool) -> list[str]:
    """Images per second through the ImageNet reader with each decoder this machine has."""
    import io
    import tempfile

    import numpy as np
    from PIL import Image

    from sparse_bench.data import build_data
    from sparse_bench.data.imagenet import dali_available

    # sandboxed machines (gVisor) cannot dup the descriptors of the default strategy that the
    # loader's workers pass their batches through: share through files instead
    torch.multiprocessing.set_sharing_strategy("file_system")
    lines = ["| decoder | images/s |", "|---|---:|"]
    n_class, per_class = (2, 4) if smoke else (8, 256)  # 2,048 images: the timing starts after one batch
    batch = 4 if smoke else 128
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        encoded = []  # a few distinct JPEGs, written under many names (decoding costs the same)
        for _ in range(8):
            buf = io.BytesIO()
            Image.fromarray((rng.random((300, 400, 3)) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
            encoded.append(buf.getvalue())
        for split, count in (("train", per_class), ("val", 4)):
            for c in range(n_class):
                folder = Path(tmp) / split / f"n{c:08d}"
                folder.mkdir(parents=True)
                for i in range(count):
                    (folder / f"img{i}.JPEG").write_bytes(encoded[(c + i) % len(encoded)])
        for decoder in ("pil", "gpu", "dali"):
            if decoder == "dali" and not dali_available():
                lines.append("| dali | not installed (pip install '.[dali]') |")
                continue
            cfg = OmegaConf.load(conf_dir() / "dataset" / "imagenet.yaml")
            cfg.root, cfg.batch_size, cfg.num_workers = tmp, batch, 0 if smoke else 8
            cfg.persistent_workers, cfg.decoder = False, decoder
            data = build_data(cfg, device, 0)
            t0, n = None, 0
            for _, y in data.train:
                if t0 is None:  # the workers have started and filled their first batches
                    sync(device)
                    t0 = time.perf_counter()
                    continue
                n += int(y.shape[0])
            sync(device)
            lines.append(f"| {decoder} on {device.type} ({cfg.num_workers} workers) | "
                         f"{n / (time.perf_counter() - t0):,.0f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
