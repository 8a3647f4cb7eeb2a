"""GSE: candidate gradients against autograd, sampler distributions, no dense gradient, updates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sparse_bench.confdir import conf_dir
from sparse_bench.errors import ConfigError
from sparse_bench.sparsity import candidate_grad as cg
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.sparsity.methods import gse as gse_mod
from sparse_bench.train.trainer import hooked_step

from conftest import cli_here, read_jsonl

CONF = conf_dir() / "method" / "gse.yaml"
EPOCHS, SPE = 5, 20  # 100 steps; end_fraction 0.6 -> updates before step 60


# --------------------------------------------------------------------------- helpers


def mlp():
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(inplace=True), nn.Linear(48, 36), nn.ReLU(), nn.Linear(36, 5))


def convnet():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 6, 3, padding=1),
                         nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def data(model_kind, n=32, seed=123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g) if model_kind == "mlp" else torch.randn(n, 3, 8, 8, generator=g)
    return x, torch.randint(0, 5, (n,), generator=g)


def make(model_kind="mlp", density=0.2, seed=0, **over):
    torch.manual_seed(seed)
    model = mlp() if model_kind == "mlp" else convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    cfg = OmegaConf.merge(OmegaConf.load(CONF), OmegaConf.create({"update_every": 10, **over}))
    x, y = data(model_kind)
    batches = [data(model_kind, seed=1000 + i) for i in range(4)]
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=EPOCHS, steps_per_epoch=SPE,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed + 1),
                        batches=lambda n, key=0: batches[:n], loss_fn=nn.CrossEntropyLoss())
    method = build_method(cfg, ctx)
    method.setup()
    return model, opt, method, (x, y)


def train(model, opt, method, xy, start, stop, on_update=None):
    """Drive the trainer's hooks by hand for steps start+1..stop; returns the last loss."""
    x, y = xy
    loss = None
    for step in range(start, stop):
        loss = hooked_step(method, opt, step, lambda: F.cross_entropy(model(x), y))
        old = [m.clone() for m in method.masks.masks]
        logs = method.on_step_end(step + 1)
        if logs and on_update is not None:
            on_update(step + 1, old, logs)
    return float(loss.detach())


def dense_grad(layer, inputs, grad_out):
    """The reference: autograd's dense weight gradient for one call of the layer."""
    w = layer.weight.detach().clone().requires_grad_(True)
    if isinstance(layer, nn.Conv2d):
        out = layer._conv_forward(inputs, w, None)
    else:
        out = F.linear(inputs, w)
    (gw,) = torch.autograd.grad(out, w, grad_out)
    return gw.flatten(1)


# --------------------------------------------------------------------------- candidate gradients


def all_pairs(n_out, fan_in, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n_out, (n,), generator=g), torch.randint(fan_in, (n,), generator=g)


@pytest.mark.parametrize("chunk", [7, 100, cg.DEFAULT_CHUNK])
def test_candidate_gradients_linear_match_autograd(chunk):
    torch.manual_seed(0)
    layer = nn.Linear(11, 9).double()
    x = torch.randn(6, 4, 11, dtype=torch.float64)  # leading dims are extra rows
    d = torch.randn(6, 4, 9, dtype=torch.float64)
    o, j = all_pairs(9, 11, 50)
    got = cg.candidate_gradients(layer, x, d, o, j, chunk_size=chunk)
    ref = dense_grad(layer, x, d)[o, j]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("conv_kw", [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=2),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding="same"),
])
@pytest.mark.parametrize("chunk", [5, 300, cg.DEFAULT_CHUNK])
def test_candidate_gradients_conv_match_autograd(conv_kw, chunk):
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 4, **conv_kw).double()
    x = torch.randn(3, 3, 7, 6, dtype=torch.float64)
    out = layer(x)
    d = torch.randn_like(out)
    fan_in = layer.weight[0].numel()
    o, j = all_pairs(4, fan_in, 40, seed=2)
    got = cg.candidate_gradients(layer, x, d, o, j, chunk_size=chunk)
    w = layer.weight.detach().clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(layer._conv_forward(x, w, None), w, d)
    torch.testing.assert_close(got, gw.flatten(1)[o, j], rtol=1e-10, atol=1e-12)


def test_candidate_gradients_float32_within_tolerance_and_empty():
    torch.manual_seed(2)
    layer = nn.Conv2d(2, 5, 3, stride=2, padding=1)
    x = torch.randn(4, 2, 9, 9)
    d = torch.randn_like(layer(x))
    o, j = all_pairs(5, 18, 30)
    got = cg.candidate_gradients(layer, x, d, o, j, chunk_size=13)
    torch.testing.assert_close(got, dense_grad(layer, x, d)[o, j], rtol=1e-5, atol=1e-5)
    empty = torch.zeros(0, dtype=torch.long)
    assert cg.candidate_gradients(layer, x, d, empty, empty).numel() == 0


def test_grouped_conv_and_other_layers_are_config_errors():
    with pytest.raises(ConfigError, match="groups=2"):
        cg.candidate_gradients(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5), torch.randn(1, 4, 3, 3),
                               torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = MethodContext(model=model, optimizer=opt, density=0.5, epochs=1, steps_per_epoch=1,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="Conv1d"):
        build_method(OmegaConf.load(CONF), ctx)
    with pytest.raises(ConfigError, match="method.sampling"):
        make(sampling="rigl")


# --------------------------------------------------------------------------- sampling distributions


def manual_rows(layer, x, d):
    """Rows (x_r, delta_r) by direct construction, independent of the module under test."""
    if isinstance(layer, nn.Conv2d):
        xr = F.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride).permute(0, 2, 1)
        return xr.reshape(-1, xr.shape[-1]), d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])
    return x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_grabo_and_graest_unit_scores_follow_the_paper(kind):
    torch.manual_seed(3)
    if kind == "linear":
        layer, x = nn.Linear(6, 4).double(), torch.randn(5, 6, dtype=torch.float64)
    else:
        layer, x = nn.Conv2d(2, 3, 2, stride=1, padding=1).double(), torch.randn(2, 2, 3, 3, dtype=torch.float64)
    d = torch.randn_like(layer(x))
    xr, dr = manual_rows(layer, x, d)
    R = xr.shape[0]
    assert cg.num_rows(layer, d) == R
    g, f = cg.unit_scores(layer, x, d, "grabo", chunk_size=4)
    torch.testing.assert_close(f, xr.abs().sum(0))
    torch.testing.assert_close(g, dr.abs().sum(0))
    s = torch.tensor([(-1.0) ** (r // 2) for r in range(R)], dtype=torch.float64)
    g, f = cg.unit_scores(layer, x, d, "graest", signs=s, chunk_size=4)
    torch.testing.assert_close(f, (s[:, None] * xr).sum(0))
    torch.testing.assert_close(g, (s[:, None] * dr).sum(0))
    # the probability vectors the sampler builds: |.| normalised
    p = gse_mod.sampling_distribution(f, f.numel())
    torch.testing.assert_close(p, (s[:, None] * xr).sum(0).abs() / (s[:, None] * xr).sum(0).abs().sum())
    assert torch.allclose(gse_mod.sampling_distribution(torch.zeros(4), 4), torch.full((4,), 0.25, dtype=torch.float64))


def test_sampler_frequencies_match_the_product_distribution():
    p_out = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    p_in = torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64)
    n = 200_000
    o, j = gse_mod.sample_candidates(p_out, p_in, 3, 4, n, torch.Generator().manual_seed(0))
    freq = torch.bincount(o * 4 + j, minlength=12).double() / n
    expected = (p_out[:, None] * p_in[None, :]).flatten()
    assert torch.all(freq[expected == 0] == 0)
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / n))
    o, j = gse_mod.sample_candidates(None, None, 3, 4, n, torch.Generator().manual_seed(1))
    freq = torch.bincount(o * 4 + j, minlength=12).double() / n
    assert torch.allclose(freq, torch.full((12,), 1 / 12, dtype=torch.float64), atol=4 * math.sqrt(0.25 / n))


@pytest.mark.parametrize("sampling", ["grabo", "graest"])
def test_method_statistics_come_from_layer_inputs_and_output_gradients(sampling):
    """The hooks capture x and delta of every prunable layer: sum_r delta x^T is the dense grad."""
    model, opt, m, (x, y) = make("conv", sampling=sampling)
    calls = m._layer_calls(x, y, seed=0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for mod, layer_calls in zip(m.modules, calls):
        assert len(layer_calls) == 1
        inp, d = layer_calls[0]
        torch.testing.assert_close(dense_grad(mod, inp, d), mod.weight.grad.flatten(1), rtol=1e-4, atol=1e-6)
    # GraBo's f for the first conv is the unfolded |input| summed over rows
    scores = [None] * len(m.modules)
    m.sampling = "grabo"
    m._scores(calls, scores)
    xr, _ = manual_rows(m.modules[0], x, calls[0][0][1])
    torch.testing.assert_close(scores[0][1], xr.abs().sum(0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- no dense gradient


class AllocRecorder(TorchDispatchMode):
    """Records every freshly allocated floating tensor (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.fresh: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ptrs = set()
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor):
                    ptrs.add(t.untyped_storage().data_ptr())
        out = func(*args, **kwargs)
        for o in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.untyped_storage().data_ptr() not in ptrs:
                self.fresh.append((str(func), tuple(o.shape)))
        return out


def big_weight_model():
    # weights (64x40, 48x64, 5x48): no activation or unfold block has as many elements
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(inplace=True), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))


def test_update_never_allocates_a_dense_float_tensor_of_a_weight_shape(monkeypatch):
    torch.manual_seed(0)
    model = big_weight_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    batch = (torch.randn(8, 40, generator=g), torch.randint(0, 5, (8,), generator=g))
    ctx = MethodContext(model=model, optimizer=opt, density=0.1, epochs=1, steps_per_epoch=100,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                        batches=lambda n, key=0: [batch] * n, loss_fn=nn.CrossEntropyLoss())
    m = build_method(OmegaConf.merge(OmegaConf.load(CONF), {"sampling": "grabo", "chunk_size": 256}), ctx)
    m.setup()
    weights = [p for p in m.masks.params]
    banned_shapes = {tuple(p.shape) for p in weights}
    banned_numels = {p.numel() for p in weights}

    calls = []
    real = gse_mod.candidate_gradients

    def spy(layer, inputs, grad_outputs, out_idx, in_idx, chunk_size):
        calls.append((out_idx, in_idx, chunk_size))
        return real(layer, inputs, grad_outputs, out_idx, in_idx, chunk_size)

    monkeypatch.setattr(gse_mod, "candidate_gradients", spy)
    for p in model.parameters():
        assert p.grad is None
    # a (loss) backward with a momentum buffer present, so the optimizer has per-weight state
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()
    model.zero_grad(set_to_none=True)

    with AllocRecorder() as rec:
        logs = m.update(step=10)
    assert logs["mask/grown"] > 0
    bad = [(f, s) for f, s in rec.fresh if s in banned_shapes or math.prod(s) in banned_numels]
    assert not bad, f"dense weight-shaped float tensors allocated: {bad[:5]}"
    for p in model.parameters():
        assert p.grad is None, "the update must not compute parameter gradients"
    assert len(calls) == len(weights)
    for out_idx, in_idx, chunk in calls:
        assert out_idx.dtype == torch.long and in_idx.dtype == torch.long and out_idx.dim() == 1
        assert chunk == 256
    # the detector does flag a dense backward (so this test can fail)
    with AllocRecorder() as rec:
        F.cross_entropy(model(batch[0]), batch[1]).backward()
    assert any(s in banned_shapes for _, s in rec.fresh)


def test_update_leaves_grads_buffers_and_global_rng_untouched():
    model, opt, m, (x, y) = make("conv", sampling="graest")
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    m.update(step=10)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(mod._forward_hooks for mod in model.modules()), "hooks must be removed"


# --------------------------------------------------------------------------- the update


def test_reinit_scales_by_sparse_fan_in():
    model, opt, m, _ = make("conv", density=0.3)
    for mod, mask in zip(m.modules, m.masks.masks):
        w = mod.weight.detach().flatten(1)
        mk = mask.flatten(1)
        bound = torch.sqrt(3.0 / mk.sum(1).clamp_min(1).float())
        assert torch.all(w[~mk] == 0)
        assert torch.all(w.abs() <= bound[:, None] + 1e-6)
        assert torch.all(mod.bias.detach().abs() <= bound + 1e-6)
        # the largest weight of a unit with many inputs is near its bound, not near the dense one
        rows = mk.sum(1) >= 8
        assert torch.all(w[rows].abs().amax(1) > 0.5 * bound[rows])
    _, _, m2, _ = make("conv", density=0.3, reinit="none")
    assert not torch.equal(m2.modules[0].weight, m.modules[0].weight)


@pytest.mark.parametrize("over", [
    {}, {"scope": "layer"}, {"sampling": "grabo"}, {"sampling": "graest", "scope": "layer"},
    {"sampling": "graest", "stat_batches": 3}, {"gamma": 2.0, "init": "erk"},
])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_updates_keep_density_exact_grow_at_zero_and_never_prune_grown(kind, over):
    model, opt, m, xy = make(kind, **over)
    target = round(0.2 * sum(m.masks.numels))
    layer_counts = m.masks.nnz()
    assert sum(layer_counts) == target
    seen = []

    def check(step, old, logs):
        new = m.masks.masks
        assert sum(m.masks.nnz()) == target
        if over.get("scope") == "layer":
            assert m.masks.nnz() == layer_counts
        grown_total = 0
        for p, o, n, gi, pi in zip(m.masks.params, old, new, m.last_update["grown"], m.last_update["pruned"]):
            born = n & ~o
            grown_total += int(born.sum())
            assert int(born.sum()) == gi.numel(), "every selected candidate was inactive"
            assert torch.all(n.view(-1)[gi]), "a just-grown weight was pruned"
            assert not torch.any(o.view(-1)[gi])
            assert torch.all(o.view(-1)[pi]) and not torch.any(n.view(-1)[pi])
            assert torch.all(p.detach()[born] == 0)
            assert torch.all(opt.state[p]["momentum_buffer"][born] == 0)
            assert torch.all(p.detach()[~n] == 0)
        alpha = m.alpha_at(step)
        assert logs["gse/alpha"] == pytest.approx(alpha)
        assert grown_total == logs["mask/grown"] == logs["mask/pruned"] == m.last_update["k"]
        if over.get("scope") != "layer":
            assert grown_total == min(math.ceil(alpha * target), logs["gse/candidates"])
        assert 0 <= logs["gse/candidates_already_active"] < 1
        seen.append(step)

    train(model, opt, m, xy, 0, 70, on_update=check)
    assert seen == [10, 20, 30, 40, 50]  # none from end_fraction * 100 = 60 on


def test_alpha_schedule():
    _, _, m, _ = make()
    assert m.t_end == 60
    assert m.alpha_at(0) == pytest.approx(0.2)
    assert m.alpha_at(30) == pytest.approx(0.1)
    assert m.alpha_at(15) == pytest.approx(0.1 * (1 + math.cos(math.pi * 15 / 60)))
    assert m.alpha_at(60) == 0.0 and m.alpha_at(90) == 0.0
    assert [s for s in range(1, 101) if m.cadence.at_step(s)] == [10, 20, 30, 40, 50]


def test_all_inactive_are_candidates_in_a_dense_enough_layer():
    _, _, m, _ = make(density=0.2, scope="layer")
    nnz = m.masks.nnz()
    dense_layers = [i for i, (k, n) in enumerate(zip(nnz, m.masks.numels)) if 0.5 <= k / n < 1]
    assert dense_layers, "ER makes the 36x5 classifier more than half dense"
    cands, _ = m._candidates(None, nnz)
    for i in dense_layers:
        assert cands[i][0].numel() == m.masks.numels[i] - nnz[i]


def test_determinism_and_state_round_trip():
    def run(stop, resume_from=None):
        model, opt, m, xy = make("conv", sampling="graest")
        start = 0
        if resume_from is not None:
            model.load_state_dict(resume_from["model"])
            opt.load_state_dict(resume_from["opt"])
            m.load_state_dict(resume_from["method"])
            start = resume_from["step"]
        train(model, opt, m, xy, start, stop)
        return model, opt, m

    a_model, _, a = run(45)
    b_model, _, b = run(45)
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert torch.equal(p, q)
    # checkpoint at 25 (between updates), resume in a fresh method, continue to 45
    c_model, c_opt, c = run(25)
    state = copy.deepcopy({"model": c_model.state_dict(), "opt": c_opt.state_dict(), "method": c.state_dict(),
                           "step": 25})
    train(c_model, c_opt, c, data("conv"), 25, 45)
    d_model, _, d = run(45, resume_from=state)
    for x, y, z in zip(a.masks.masks, c.masks.masks, d.masks.masks):
        assert torch.equal(x, y) and torch.equal(x, z)
    for p, q in zip(a_model.parameters(), d_model.parameters()):
        assert torch.equal(p, q)
    # a different seed gives a different mask trajectory
    torch.manual_seed(0)
    _, _, e, _ = make("conv", sampling="graest", seed=3)
    assert not all(torch.equal(x, y) for x, y in zip(a.masks.masks, e.masks.masks))


def test_short_training_improves_loss_and_conv_model_updates():
    model, opt, m, xy = make("conv", density=0.3, sampling="grabo")
    x, y = xy
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    updates = []
    end = train(model, opt, m, xy, 0, 60, on_update=lambda s, o, logs: updates.append(logs["mask/grown"]))
    assert len(updates) == 5 and all(u > 0 for u in updates)
    assert end < 0.7 * start
    assert sum(m.masks.nnz()) == round(0.3 * sum(m.masks.numels))


def test_cli_run_keeps_density_exact(tmp_path):
    r = cli_here(["method=gse", "dataset=digits", "model=mlp", "logger=none", "schedule=constant",
             "schedule.epochs=2", "method.update_every=5", "density=0.2", f"paths.runs={tmp_path}",
             "progress=false", "device=cpu"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = read_jsonl(next(tmp_path.glob("*/metrics.jsonl")))
    assert any("gse/alpha" in rec for rec in recs)
    for rec in recs:
        if "density/achieved" in rec:
            assert rec["density/achieved"] == pytest.approx(round(0.2 * 17024) / 17024, abs=1e-12)
