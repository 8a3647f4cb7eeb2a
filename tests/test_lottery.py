"""Lottery tickets: rewinding under the new mask, the density sequence, rounds of full LR
schedules, and bit-identical resume across a round boundary."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from sparse_bench.confdir import conf_dir
from sparse_bench.errors import ConfigError
from sparse_bench.run import run
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.train.checkpoint import load_checkpoint
from sparse_bench.train.trainer import hooked_step

from conftest import Crash, compose, killed_after, read_jsonl

CONF = conf_dir() / "method" / "lottery.yaml"
EPOCHS, SPE = 2, 4


def build(density=0.3, epochs=EPOCHS, **over):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    cfg = OmegaConf.merge(OmegaConf.load(CONF), OmegaConf.create(over))
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=epochs, steps_per_epoch=SPE,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                        loss_fn=nn.CrossEntropyLoss())
    method = build_method(cfg, ctx)
    method.setup()
    return model, opt, method


def train(model, opt, method, on_step=None, on_boundary=None):
    """Drive the hooks like the trainer for rounds * epochs epochs."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    step = 0
    for epoch in range(1, method.rounds * method.ctx.epochs + 1):
        for _ in range(SPE):
            hooked_step(method, opt, step, lambda: F.cross_entropy(model(x), y))
            step += 1
            method.on_step_end(step)
            if on_step:
                on_step(step)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        logs = method.on_epoch_end(epoch, step)
        if on_boundary:
            on_boundary(epoch, before, logs)
    return step


@pytest.mark.parametrize("rewind_epoch", [0.0, 0.5])
def test_rewinding_restores_the_early_weights_under_the_new_mask(rewind_epoch):
    model, opt, method = build(density=0.3, n_rounds=2, rewind_epoch=rewind_epoch)
    assert method.rounds == 3
    rewind_step = round(rewind_epoch * SPE)
    saved = {}
    if rewind_step == 0:
        saved["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    else:
        def on_step(step):
            if step == rewind_step:
                saved["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    boundaries = []
    names = method.masks.names
    total = sum(method.masks.numels)

    def on_boundary(epoch, before, logs):
        if epoch % EPOCHS or epoch == method.rounds * EPOCHS:
            assert logs is None
            return
        r = epoch // EPOCHS
        boundaries.append(epoch)
        target = 0.3 ** (r / 2)
        assert logs["lottery/round"] == r + 1
        assert logs["lottery/target_density"] == pytest.approx(target)
        assert "mask/pruned" in logs and "mask/change_pct" in logs
        assert sum(method.masks.nnz()) == round(target * total)
        state = model.state_dict()
        rewind = saved["state"]
        for k, v in state.items():
            if k in names:
                m = method.masks.masks[names.index(k)]
                assert torch.equal(v[m], rewind[k][m]), f"{k}: kept weights equal the rewind checkpoint"
                assert torch.all(v[~m] == 0)
            else:
                assert torch.equal(v, rewind[k]), f"{k}: biases / BN parameters and statistics are rewound"
        # the kept weights are the currently active ones of largest trained magnitude (global)
        kept = torch.cat([before[n].abs()[m] for n, m in zip(names, method.masks.masks)])
        dropped = torch.cat([before[n].abs()[(before[n] != 0) & ~m] for n, m in zip(names, method.masks.masks)])
        assert dropped.numel() > 0 and kept.min() >= dropped.max()
        assert len(opt.state) == 0, "a fresh optimizer state every round"

    train(model, opt, method, on_step=None if rewind_step == 0 else on_step, on_boundary=on_boundary)
    assert boundaries == [2, 4]
    assert sum(method.masks.nnz()) == round(0.3 * total)


def test_masks_only_shrink_and_stay_applied_within_a_round():
    model, opt, method = build(density=0.2, n_rounds=3, scope="layer")
    history = []
    train(model, opt, method, on_boundary=lambda e, b, logs: history.append([m.clone() for m in method.masks.masks]))
    for a, b in zip(history, history[1:]):
        for ma, mb in zip(a, b):
            assert not torch.any(mb & ~ma), "a pruned weight never comes back"
    for p, m, n in zip(method.masks.params, method.masks.masks, method.masks.numels):
        assert torch.all(p[~m] == 0)
        assert abs(int(m.sum()) - 0.2 * n) <= 1  # scope: layer keeps every layer at the density


def test_density_sequence_is_followed_exactly():
    counts = []
    model, opt, method = build(density=0.125, n_rounds=3)
    assert method.densities == pytest.approx([0.5, 0.25, 0.125]) and method.densities[-1] == 0.125
    total = sum(method.masks.numels)
    train(model, opt, method, on_boundary=lambda e, b, logs: counts.append(sum(method.masks.nnz())))
    targets = [1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.125]  # after epochs 1..8
    assert counts == [round(d * total) for d in targets]

    # default: the fewest steps keeping >= 80% per round; exactly 0.8^k when density = 0.8^3
    _, _, m = build(density=0.8 ** 3)
    assert m.rounds == 4 and m.densities == pytest.approx([0.8, 0.64, 0.512])
    _, _, m = build(density=0.3)
    assert len(m.densities) == math.ceil(math.log(0.3) / math.log(0.8)) == 6
    assert all(b / a >= 0.8 - 1e-12 for a, b in zip([1.0] + m.densities, m.densities)) and m.densities[-1] == 0.3
    _, _, m = build(density=0.3, densities=[0.6, 0.45, 0.3])
    assert m.densities == [0.6, 0.45, 0.3] and m.rounds == 4
    with pytest.raises(ConfigError, match="method.densities"):
        build(density=0.3, densities=[0.6, 0.4])
    with pytest.raises(ConfigError, match="method.rewind_epoch"):
        build(density=0.3, rewind_epoch=EPOCHS)
    with pytest.raises(ConfigError, match="method.n_rounds"):
        build(density=0.3, n_rounds=0)



def _strip(recs):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in recs]


def test_rounds_restart_the_lr_and_resume_is_bit_identical(tmp_path, fast_overrides, monkeypatch):
    base = ["dataset=digits", "model=mlp", "method=lottery", "method.n_rounds=2", "method.rewind_epoch=0.5",
            "schedule=cosine", "schedule.warmup_epochs=0", "schedule.epochs=2", "density=0.3",
            "eval.train_samples=0"] + fast_overrides[:-1]
    full = compose(base + [f"paths.runs={tmp_path / 'a'}"])
    run(full)
    folder_a = tmp_path / "a" / full.run_name
    res = json.loads((folder_a / "results.json").read_text())
    recs = read_jsonl(folder_a / "metrics.jsonl")
    epochs = [r for r in recs if "train/loss" in r]
    total = res["prunable"]["total"]
    spe = epochs[0]["step"]
    assert res["epochs"] == 6 and res["steps"] == 6 * spe, "total epochs = rounds * epochs"
    lrs = [r["lr"] for r in epochs]
    assert lrs[0] > lrs[1] and lrs[0:2] == lrs[2:4] == lrs[4:6], "the LR schedule restarts every round"
    assert [r.get("lottery/round") for r in epochs] == [None, 2, None, 3, None, None]
    assert epochs[1]["lottery/target_density"] == pytest.approx(0.3 ** 0.5)
    assert [round(r["density/achieved"] * total) for r in epochs] == [
        round(0.3 ** 0.5 * total) if i in (1, 2) else (total if i == 0 else round(0.3 * total)) for i in range(6)]
    assert res["density"]["achieved"] == round(0.3 * total) / total

    cfg = compose(base + [f"paths.runs={tmp_path / 'b'}"])
    with killed_after(monkeypatch, 3), pytest.raises(Crash):  # after the first round boundary, before the second
        run(cfg)
    folder_b = tmp_path / "b" / cfg.run_name
    ck = load_checkpoint(folder_b / "checkpoint.pt")
    assert ck["method"]["lottery"]["round"] == 2 and ck["method"]["lottery"]["rewind"] is not None
    run(cfg)

    assert _strip(read_jsonl(folder_a / "metrics.jsonl")) == _strip(read_jsonl(folder_b / "metrics.jsonl"))
    ca = load_checkpoint(folder_a / "checkpoint.pt")
    cb = load_checkpoint(folder_b / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for ma, mb in zip(ca["method"]["masks"]["masks"], cb["method"]["masks"]["masks"]):
        assert torch.equal(ma, mb)
    assert json.loads((folder_b / "results.json").read_text())["final"] == res["final"]
