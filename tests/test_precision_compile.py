"""GPU-grade training, the parts that run on a CPU: mixed precision (bf16 / fp16 autocast, the
fp16 gradient scaler), sparse layers under autocast, gradient clipping, torch.compile without a
recompile per mask update and its fallback to eager."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.confdir import conf_dir
from sparse_bench.errors import ConfigError
from sparse_bench.run import run, validate
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.train.precision import Amp
from sparse_bench.train.trainer import hooked_step

from conftest import compose, read_jsonl

BASE = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=2", "density=0.3",
        "limit_train_batches=8", "eval.train_samples=0", "logger=none", "progress=false", "device=cpu"]


def _rigl(model, opt, every=2):
    cfg = OmegaConf.load(conf_dir() / "method" / "rigl.yaml")
    cfg.update_every = every
    cfg.end = {"unit": "fraction", "value": 1.0}
    ctx = MethodContext(model=model, optimizer=opt, density=0.3, epochs=1, steps_per_epoch=20,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    m = build_method(cfg, ctx)
    m.setup()
    return m


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_weights_masks_and_state_float32_and_grows_at_zero(precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method = _rigl(model, opt)
    amp = Amp(precision, "cpu")
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    dtypes = []

    def forward():
        out = model(x)
        dtypes.append(out.dtype)
        return nn.functional.cross_entropy(out, y)

    for step in range(6):
        old = [m.clone() for m in method.masks.masks]
        hooked_step(method, opt, step, forward, amp=amp)
        logs = method.on_step_end(step + 1)
        if logs:
            for p, o, n in zip(method.masks.params, old, method.masks.masks):
                assert torch.equal(p.detach()[n & ~o], torch.zeros_like(p.detach()[n & ~o]))  # grown at exactly 0
    assert dtypes[0] == PRECISION_DTYPE[precision]  # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert method.last_update  # updates happened
    assert (amp.state_dict() is not None) == (precision == "fp16")


PRECISION_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def test_sparse_layers_run_float32_under_autocast_and_train_like_masked(tmp_path):
    over = [*BASE, "method=rigl", "method.update_every=3", "precision=bf16"]
    recs = {}
    for execution in ("masked", "sparse"):
        cfg = compose([*over, f"execution={execution}", f"paths.runs={tmp_path / execution}"])
        run(cfg)
        recs[execution] = read_jsonl(tmp_path / execution / cfg.run_name / "metrics.jsonl")
    a, b = recs["masked"][-1], recs["sparse"][-1]
    assert a["test/acc"] == pytest.approx(b["test/acc"], abs=0.03)  # bf16 rounds the two differently
    assert a["density/achieved"] == b["density/achieved"]


def test_fp16_with_sparse_layers_is_one_line():
    with pytest.raises(ConfigError, match="precision=fp16 with execution=sparse"):
        validate(compose([*BASE, "method=rigl", "precision=fp16", "execution=sparse"]))


def test_gradient_clipping_bounds_the_global_norm():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    method = build_method(OmegaConf.load(conf_dir() / "method" / "dense.yaml"),
                          MethodContext(model=model, optimizer=opt, density=1.0, epochs=1, steps_per_epoch=1,
                                        device=torch.device("cpu"), generator=torch.Generator()))
    x, y = torch.randn(4, 8) * 100, torch.randint(0, 3, (4,))
    hooked_step(method, opt, 0, lambda: nn.functional.cross_entropy(model(x), y), clip_grad_norm=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("execution", ["masked", "sparse"])
def test_compile_does_not_recompile_per_mask_update(execution, tmp_path):
    """A small CNN under torch.compile with RigL updating its masks every 2 steps: the compiled
    graphs stay bounded (masks are applied outside the compiled forward; sparse layers, whose
    structure changes size at every update, run eagerly inside it)."""
    cfg = compose(["dataset=synthetic", "dataset.input_shape=[1,28,28]", "dataset.n_train=256", "dataset.n_test=64",
                   "dataset.batch_size=32", "dataset.drop_last=true", "model=lenet5_caffe", "schedule=constant",
                   "schedule.epochs=2", "method=rigl", "method.update_every=2", "method.end={unit:fraction,value:1.0}",
                   "density=0.3", "logger=none", "progress=false", "device=cpu", "eval.train_samples=0",
                   "compile=true", "compile_backend=aot_eager", f"execution={execution}", f"paths.runs={tmp_path}"])
    run(cfg)
    recs = read_jsonl(tmp_path / cfg.run_name / "metrics.jsonl")
    updates = [r for r in recs if r.get("update")]
    epochs = [r for r in recs if "compile/graphs" in r]
    assert len(updates) >= 5 and len(epochs) == 2
    assert epochs[-1]["compile/graphs"] <= (2 if execution == "masked" else 8)  # bounded, not one per update
    assert epochs[-1]["compile/graphs"] == epochs[0]["compile/graphs"]  # nothing compiled in the second epoch


def test_a_compile_failure_trains_eagerly_with_one_line(tmp_path, monkeypatch, caplog):
    def broken(module, **kw):
        def call(*a, **k):
            raise RuntimeError("no compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    cfg = compose([*BASE, "method=static", "compile=true", f"paths.runs={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="sparse_bench"):
        run(cfg)
    lines = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(lines) == 1 and "no compiler here" in lines[0] and "training eagerly" in lines[0]
    assert (tmp_path / cfg.run_name / "results.json").exists()


def test_the_weight_average_is_kept_on_the_masks_and_evaluated(tmp_path):
    from sparse_bench.train.checkpoint import load_checkpoint

    cfg = compose([*BASE, "method=rigl", "method.update_every=3", "eval.ema_decay=0.9", f"paths.runs={tmp_path}"])
    run(cfg)
    folder = tmp_path / cfg.run_name
    final = read_jsonl(folder / "metrics.jsonl")[-1]
    assert 0.0 <= final["ema/test/acc"] <= 1.0 and "ema/test/loss" in final
    ckpt = load_checkpoint(folder / "checkpoint.pt")
    masks = dict(zip(ckpt["method"]["masks"]["names"], ckpt["method"]["masks"]["masks"]))
    for name, m in masks.items():
        ema = ckpt["ema"][name]
        assert torch.equal(ema[~m], torch.zeros_like(ema[~m]))  # zero wherever the final mask is
        assert not torch.equal(ema[m], ckpt["model"][name][m])  # an average, not a copy


def test_a_weight_average_with_sparse_layers_is_one_line():
    with pytest.raises(ConfigError, match="eval.ema_decay with execution=sparse"):
        validate(compose([*BASE, "method=rigl", "eval.ema_decay=0.99", "execution=sparse"]))


@pytest.mark.slow
def test_the_device_check_runs_every_section_at_toy_sizes(tmp_path):
    """scripts/device_check.py --smoke on the CPU: every section runs and none fails, so the GPU
    check is ready whenever a GPU is lent."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "scripts/device_check.py", "--smoke", "--out", str(tmp_path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "device_check.md").read_text()
    assert "failed:" not in report and "skipped:" not in report, report
    for title in ("CUDA tests", "ResNet-50", "GSE", "bench_sparse.py layers", "RigL's mask updates", "decoders",
                  "finished"):
        assert title in report


@pytest.mark.parametrize("method", ["rigl", "set", "sparse_momentum"])
def test_channels_last_conv_weights_take_mask_updates_like_contiguous_ones(method):
    """Under channels_last=true a conv weight (and its masks, scores, momentum) is stored in another
    order; mask updates write flat positions in the logical order, so both layouts end equal."""

    def train(channels_last: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
        x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        cfg = OmegaConf.load(conf_dir() / "method" / f"{method}.yaml")
        cfg.update_every, cfg.end = 2, {"unit": "fraction", "value": 1.0}
        m = build_method(cfg, MethodContext(model=model, optimizer=opt, density=0.3, epochs=1, steps_per_epoch=10,
                                            device=torch.device("cpu"), generator=torch.Generator().manual_seed(1)))
        m.setup()
        changed = 0
        for step in range(7):
            hooked_step(m, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
            logs = m.on_step_end(step + 1)
            changed += (logs or {}).get("mask/grown", 0)
        masks = [t.detach().contiguous() for t in m.masks.masks]
        return masks, [p.detach().contiguous() for p in model.parameters()], changed

    masks_a, params_a, grown = train(False)
    masks_b, params_b, _ = train(True)
    assert grown > 0  # the updates moved weights
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
