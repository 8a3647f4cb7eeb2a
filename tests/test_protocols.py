"""The comparison papers' protocols: every option changes behaviour as the reference code does
(GSE's baselines, the DSR code's SET/DSR/DeepR, AC/DC, RigL), statistics batches come from their
own stream without disturbing the epoch in progress, and every method runs on short schedules.

The hooks are driven by hand in the trainer's order on tiny models; expected values are computed
directly (a dense autograd pass, the reference's formula), never read off the method."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf
from test_data_cifar_imagenet import inet_cfg, write_cifar10, write_imagenet
from torch import nn

from sparse_bench.data import build_data
from sparse_bench.errors import ConfigError
from sparse_bench.run import run
from sparse_bench.sparsity.distributions import layer_counts
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.train.trainer import hooked_step

from conftest import CONF, cli_here, compose, experiment_overrides

CPU = torch.device("cpu")
SPE = 4


# tiny models and tensors: one intra-op thread (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def E(v):
    return {"unit": "epoch", "value": v}


def S(v):
    return {"unit": "step", "value": v}


g0 = torch.Generator().manual_seed(0)
X = torch.randn(32, 12, generator=g0)
Y = (X @ torch.randn(12, 4, generator=g0)).argmax(1)
STATS = [(torch.randn(16, 12, generator=g0), torch.randint(0, 4, (16,), generator=g0)) for _ in range(3)]


def mlp():
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


def make(name, density=0.2, epochs=4, model=None, wd=0.0, seed=0, **over):
    torch.manual_seed(seed)
    model = model if model is not None else mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=wd)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "method" / f"{name}.yaml"), OmegaConf.create(over))
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=epochs, steps_per_epoch=SPE, device=CPU,
                        generator=torch.Generator().manual_seed(seed + 1), loss_fn=nn.CrossEntropyLoss(),
                        batches=lambda n, key=0: STATS[:n])
    return model, opt, build_method(cfg, ctx)


def step(model, opt, m, t, x=X, y=Y):
    """One optimizer step in the trainer's hook order; returns the step's logs."""
    hooked_step(m, opt, t, lambda: nn.functional.cross_entropy(model(x), y))
    return m.on_step_end(t + 1)


# --- GSE's static, SET and RigL (dynamic_sparse_training.py) -------------------------------------
def test_gse_static_starts_at_er_densities_with_sparse_fan_in_weights():
    # GSE's example: at 98% ResNet-56's first conv keeps ~37 of 432 weights (ER), not 9 (uniform)
    from sparse_bench.models import build_model
    from sparse_bench.sparsity.masks import MaskSet

    shapes = MaskSet.from_model(build_model(OmegaConf.create({"name": "resnet56"}), (3, 32, 32), 10), None).shapes
    assert layer_counts(shapes, 0.02, "uniform")[0] == 9 and layer_counts(shapes, 0.02, "er")[0] == 37

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    _, _, m = make("static", density=0.1, model=model, init="er", reinit="fan_in")
    m.setup()
    assert m.masks.nnz() == layer_counts(m.masks.shapes, 0.1, "er")
    for p, k, mod in zip(m.masks.params, m.masks.masks, (model[0], model[3])):
        rows, mask = p.detach().reshape(p.shape[0], -1), k.reshape(p.shape[0], -1)
        bound = (3.0 / mask.sum(1).clamp_min(1)).sqrt()
        assert torch.all(rows[~mask] == 0)
        assert torch.all(rows.abs() <= bound[:, None] + 1e-7)  # U(-1, 1) sqrt(3 / sparse fan-in)
        assert torch.all(mod.bias.detach().abs() <= bound + 1e-7)
        # the draw fills the bound: the largest |w| of a layer is close to its units' bound
        assert float((rows.abs().max(1).values / bound)[mask.sum(1) > 4].min()) > 0.3


def set_gse(**over):
    return make("set", density=0.25, epochs=3, init="er", reinit="fan_in", update_every=2, end=S(8),
                prune_rate=0.2, prune_rate_min=0.0, decay="cosine", scope="global", exclude_pruned=True, **over)


def test_gse_set_ranks_globally_decays_to_t_end_and_never_regrows_what_it_pruned():
    model, opt, m = set_gse()
    m.setup()
    total_nnz = sum(m.masks.nnz())
    updates = []
    for t in range(3 * SPE):
        before_w = [p.detach().clone() for p in m.masks.params]
        logs = step(model, opt, m, t)
        if not logs:
            continue
        u = m.last_update
        updates.append(u["step"])
        zeta = 0.1 * (1 + math.cos(math.pi * u["step"] / 8))
        assert u["prune_rate"] == pytest.approx(zeta)
        old, pruned, grown = u["old_masks"], u["pruned"], u["grown"]
        assert sum(int(d.sum()) for d in pruned) == math.floor(zeta * total_nnz)
        # one global magnitude ranking (of the weights the update saw)
        w = [p.detach() for p in m.masks.params]
        kept = [o & ~d for o, d in zip(old, pruned)]
        assert max(float(x[d].abs().max()) for x, d in zip(w, pruned) if d.any()) <= \
            min(float(x[k].abs().min()) for x, k in zip(w, kept) if k.any())
        for o, d, gr, p in zip(old, pruned, grown, m.masks.params):
            assert not torch.any(gr & d), "a weight pruned in this update is never regrown in it"
            assert not torch.any(gr & o) and torch.all(p.detach()[gr] == 0)
            assert torch.all(opt.state[p]["momentum_buffer"][gr] == 0)
        assert sum(m.masks.nnz()) == total_nnz
    assert updates == [2, 4, 6], "updates every 2 steps, none from T_end = 8 on"
    del before_w


def test_set_options_default_to_the_original_and_check_their_values():
    _, _, m = make("set")
    assert (m.scope, m.exclude_pruned, m.decay_kind, m.cadence.end) == ("layer", False, "constant", 4 * SPE)
    with pytest.raises(ConfigError, match="method.scope"):
        make("set", scope="global", prune="set")
    with pytest.raises(ConfigError, match="method.end"):
        make("set", end=0.6)  # a bare number: a fraction or an epoch?


def test_gse_rigl_grows_by_the_gradient_of_separate_statistics_batches():
    model, opt, m = make("rigl", density=0.3, epochs=2, init="er", reinit="fan_in", update_every=3, end=E(2),
                         drop_fraction=0.2, scope="global", exclude_pruned=True, stat_batches=2)
    m.setup()
    for t in range(2):
        step(model, opt, m, t)
    # the update after step 3: its growth score is the dense gradient summed over 2 statistics batches
    hooked_step(m, opt, 2, lambda: nn.functional.cross_entropy(model(X), Y))
    ref = copy.deepcopy(model)
    grads = [torch.zeros_like(p) for p in m.masks.params]
    names = m.masks.names
    for x, y in STATS[:2]:
        gs = torch.autograd.grad(nn.functional.cross_entropy(ref(x), y),
                                 [dict(ref.named_parameters())[n] for n in names])
        grads = [a + b for a, b in zip(grads, gs)]
    old = [k.clone() for k in m.masks.masks]
    logs = m.on_step_end(3)
    assert logs is not None
    u = m.last_update
    k = u["k"][0]
    assert k == math.floor(m.drop_fraction(3) * sum(u["nnz_before"]))
    grown = u["grown"]
    assert not any(torch.any(gr & o) for gr, o in zip(grown, old)), "growth only among weights inactive before"
    flat_g = torch.cat([g.abs().flatten() for g in grads])
    flat_old = torch.cat([o.flatten() for o in old])
    expect = torch.topk(torch.where(flat_old, torch.full_like(flat_g, -1.0), flat_g), k).indices
    got = torch.cat([gr.flatten() for gr in grown]).nonzero().squeeze(1)
    assert sorted(got.tolist()) == sorted(expect.tolist())
    # the statistics pass leaves the training gradients alone
    assert all(p.grad is not None for p in m.masks.params)


# --- Top-KAST (topkast_training.py) ---------------------------------------------------------------
def topkast_gse(**over):
    model = nn.Sequential(nn.Linear(12, 24), nn.LayerNorm(24), nn.ReLU(), nn.Linear(24, 4))
    return make("topkast", density=0.25, epochs=4, model=model, **{"init": "er", "update_every": 100,
                                                                   "explore_end": S(5), **over})


def test_topkast_explores_every_step_then_every_update_interval():
    model, opt, m = topkast_gse()
    m.setup()
    calls = []
    real = m.select

    def counted():
        calls.append(True)
        return real()

    m.select = counted
    for t in range(12):
        before = len(calls)
        logs = step(model, opt, m, t)
        assert len(calls) - before == (1 if t + 1 < 5 else 0), t
        assert (logs is not None) == (t + 1 == 4), "only the last exploration step is logged"
    # ER forward counts; the backward set twice the forward set in every layer
    assert m.k_forward == layer_counts(m.masks.shapes, 0.25, "er")
    assert m.k_backward == [min(n, 2 * k) for n, k in zip(m.masks.numels, m.k_forward)]


def test_topkast_norm_penalty_is_the_gradient_of_gses_weight_decay_term():
    lam = 1e-2
    model, opt, m = topkast_gse(norm_penalty=lam, explore_end=None)
    m.setup()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    m.before_optimizer_step(0)
    # GSE: wd * sum_l (||w_A|| + ||theta_{B\A}|| / D_l) + wd * ||w|| for every other module weight
    thetas = [t.clone().requires_grad_(True) for t in m.theta]
    term = 0.0
    for t, a, b, k, n in zip(thetas, m.masks.masks, m.backward, m.k_forward, m.masks.numels):
        term = term + torch.linalg.norm(t[a]) + torch.linalg.norm(t[b & ~a]) / (k / n)
    ln = model[1].weight.detach().clone().requires_grad_(True)
    term = lam * (term + torch.linalg.norm(ln))
    want = torch.autograd.grad(term, thetas + [ln])
    for p, w in zip(m.masks.params, want[:-1]):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model[1].weight.grad, want[-1], rtol=1e-5, atol=1e-8)
    assert torch.all(model[1].bias.grad == 0) and torch.all(model[0].bias.grad == 0), "biases: no decay"


@pytest.mark.parametrize("promote", ["theta", "zero"])
def test_topkast_weight_promoted_from_the_backward_set(promote):
    model, opt, m = topkast_gse(explore_end=None, promote=promote)
    m.setup()
    a, b = m.masks.masks[0], m.backward[0]
    only_b = (b & ~a).nonzero()[0]
    with torch.no_grad():  # a B \ A weight grew large while trained in the backward pass
        m.theta[0][tuple(only_b)] = 10.0
    m.update(1)
    assert bool(m.masks.masks[0][tuple(only_b)]), "it enters the forward set"
    value = float(m.theta[0][tuple(only_b)])
    assert value == (10.0 if promote == "theta" else 0.0)
    assert float(m.masks.params[0].detach()[tuple(only_b)]) == value


# --- GMP (gradual_sparse_training.py) and the lottery ticket (lottery_training.py) ------------------
def test_gse_gmp_prunes_on_a_cosine_every_interval_to_t_end():
    model, opt, m = make("gmp", density=0.1, epochs=5, start=E(0), end=E(3), frequency=S(3), curve="cosine",
                         reinit="fan_in")
    assert m.events == [0, 3, 6, 9, 12]
    m.setup()
    total = sum(m.masks.numels)
    for t in range(5 * SPE):
        logs = step(model, opt, m, t)
        if t + 1 in (3, 6, 9):
            s = 0.9 * (1 - math.cos(math.pi * (t + 1) / 12)) / 2  # GSE: sparsity * (1 - cosine_annealing)
            assert sum(m.masks.nnz()) == round((1 - s) * total) and logs["gmp/sparsity"] == pytest.approx(s)
    assert sum(m.masks.nnz()) == round(0.1 * total)


@pytest.mark.parametrize("density,rounds", [(0.1, 4), (0.05, 5), (0.02, 6)])
def test_lottery_density_list_gives_gses_number_of_trainings(density, rounds):
    _, _, m = make("lottery", density=density, densities=[0.5, 0.25, 0.1, 0.05, 0.02])
    assert m.rounds == rounds and m.densities[-1] == density
    with pytest.raises(ConfigError, match="method.densities"):
        make("lottery", density=0.3, densities=[0.5, 0.25, 0.1])


# --- SynFlow's linearised scoring (prune_before_training.py, utils.prepare_synflow_model) ---------
def test_synflow_linearise_replaces_norms_gelu_and_softmax_on_a_copy():
    from sparse_bench.models.vit import SimpleViT
    from sparse_bench.sparsity.saliency import SynFlowScorer

    torch.manual_seed(0)
    vit = SimpleViT(image_size=(8, 8), patch_size=4, num_classes=3, dim=8, depth=1, heads=2, dim_head=4, mlp_dim=8)
    names = [n for n, p in vit.named_parameters() if p.dim() == 2]
    masks = [torch.ones_like(dict(vit.named_parameters())[n], dtype=torch.bool) for n in names]
    lin = SynFlowScorer(vit, names, (3, 8, 8), CPU, torch.float64, linearise=True)
    plain = SynFlowScorer(vit, names, (3, 8, 8), CPU, torch.float64)
    assert not any(isinstance(mod, (nn.LayerNorm, nn.GELU)) for mod in lin.net.modules())
    assert all(not mod.attention_softmax for mod in lin.net.modules() if hasattr(mod, "attention_softmax"))
    assert any(isinstance(mod, nn.LayerNorm) for mod in vit.modules()), "the model itself is untouched"
    assert all(mod.attention_softmax for mod in vit.modules() if hasattr(mod, "attention_softmax"))
    a, b = lin(masks), plain(masks)
    assert all(torch.isfinite(s).all() for s in a) and any(not torch.allclose(x, y) for x, y in zip(a, b))
    # the linearised attention is (q k^T / sqrt(d)) v
    att = lin.net.layers[0][0]
    h = torch.rand(1, 4, 8, dtype=torch.float64)
    qkv = att.to_qkv(h).view(1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    want = att.to_out(((qkv[0] @ qkv[1].transpose(-2, -1)) / 2.0 @ qkv[2]).transpose(1, 2).reshape(1, 4, 8))
    torch.testing.assert_close(att(h), want)


# --- the DSR code's DSR and DeepR -----------------------------------------------------------------
def test_dsr_never_regrows_a_just_pruned_weight_and_adapts_to_an_absolute_np():
    model, opt, m = make("dsr", density=0.3, update_every=2, end=None, np_count=50, init_threshold=0.05)
    m.setup()
    seen = 0
    for t in range(8):
        h = m.threshold
        if step(model, opt, m, t):
            u = m.last_update
            seen += 1
            for d, gr in zip(u["pruned"], u["grown"]):
                assert not torch.any(d & gr)
            k = sum(u["removed"])
            assert m.threshold == (2 * h if k < 45 else h / 2 if k > 55 else h)
    assert seen == 4


def test_deepr_dsr_code_variant_l1_in_the_loss_gradient_noise_and_first_update_signs():
    over = dict(l1=1e-2, l1_mode="loss", noise_mode="gradient", eta=0.5, regrow_sign="first_update",
                exclude_pruned=True, temperature={"unit": "epoch", "points": [[0, 0.0], [1, 1e-2]]}, end=E(3))
    model, opt, m = make("deepr", density=0.3, **over)
    m.setup()
    assert m.temperature_at(0) == 0.0 and m.temperature_at(SPE) == 1e-2
    # L1 through the loss gradient: + l1 * sign(w) (temperature 0 in epoch 1: no noise)
    model.zero_grad()
    nn.functional.cross_entropy(model(X), Y).backward()
    g = [p.grad.clone() for p in m.masks.params]
    m.before_optimizer_step(0)
    for p, before in zip(m.masks.params, g):
        torch.testing.assert_close(p.grad, before + 1e-2 * torch.sign(p.detach()))
    # noise on the gradient of active weights only, std sqrt(2 eta T)
    model.zero_grad()
    nn.functional.cross_entropy(model(X), Y).backward()
    g = [p.grad.clone() for p in m.masks.params]
    m.before_optimizer_step(SPE)
    noise = torch.cat([(p.grad - b - 1e-2 * torch.sign(p.detach()))[k] for p, b, k in
                       zip(m.masks.params, g, m.masks.masks)])
    off = torch.cat([(p.grad - b)[~k] for p, b, k in zip(m.masks.params, g, m.masks.masks)])
    assert torch.all(off == 0) and float(noise.std()) == pytest.approx(math.sqrt(2 * 0.5 * 1e-2), rel=0.15)
    # rewiring: a new connection is born without a sign and takes the sign of its first update
    born_seen = False
    for t in range(SPE, 3 * SPE):
        step(model, opt, m, t)
        born = m.last_step["born"]
        for b, d, u in zip(born, m.last_step["dead"], m.unsigned):
            assert not torch.any(b & d), "exclude_pruned: a connection that just died is not reconnected"
            assert torch.equal(u & b, b)
        if any(b.any() for b in born):
            born_seen = True
            marks = [b.clone() for b in born]
            step(model, opt, m, t + 1)
            for mk, p, s, mask in zip(marks, m.masks.params, m.signs, m.masks.masks):
                w = p.detach()
                signed = mk & mask & (w != 0)
                assert torch.equal(s[signed], w[signed] > 0)
            break
    assert born_seen
    # from the end milestone on the masks stay fixed
    for t in range(3 * SPE, 4 * SPE):
        before = [k.clone() for k in m.masks.masks]
        step(model, opt, m, t)
        assert all(torch.equal(a, b) for a, b in zip(before, m.masks.masks))


# --- AC/DC (IST-DASLab/ACDC configs) ---------------------------------------------------------------
def test_acdc_experiments_lay_out_the_references_phases():
    for exp, epochs, compress, restore in (
            ("acdc_imagenet_resnet50", 100, list(range(10, 71, 10)) + [85], list(range(15, 66, 10)) + [75]),
            ("acdc_imagenet_resnet50_2x", 200, list(range(10, 171, 10)) + [185], list(range(15, 166, 10)) + [175]),
            ("acdc_cifar100_wrn28_10", 200, [10, 50, 90, 130, 170], [30, 70, 110, 150])):
        cfg = compose(experiment_overrides(exp))
        assert cfg.schedule.epochs * cfg.schedule.multiplier == epochs
        model = mlp()
        ctx = MethodContext(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), density=0.1,
                            epochs=epochs, steps_per_epoch=1, device=CPU, generator=torch.Generator())
        m = build_method(cfg.method, ctx)
        assert sorted(m.compress_at) == compress and sorted(m.decompress_at) == restore, exp
    two_x = compose(["experiment=acdc_imagenet_resnet50_2x"])
    assert two_x.method.scope == "layer" and list(two_x.prunable.exclude) == ["conv1.weight", "fc.weight"]


def test_acdc_wrn_variant_has_biases_late_stride_and_a_raw_input_shortcut():
    from sparse_bench.models.wrn import WideResNetACDC

    net = WideResNetACDC(depth=10, widen_factor=2, num_classes=5)
    block = net.layer2[0]
    assert all(c.bias is not None for c in net.modules() if isinstance(c, nn.Conv2d))
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2) and block.shortcut.stride == (2, 2)
    assert net.bn1.momentum == 0.9
    seen = {}
    block.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    block.shortcut.register_forward_pre_hook(lambda mod, args: seen.__setitem__("s", args[0]))
    net(torch.randn(2, 3, 32, 32))
    assert seen["s"] is seen["x"], "the shortcut reads the raw block input"


# --- statistics batches ---------------------------------------------------------------------------
def _epoch(loader, epoch, mid=None):
    loader.set_epoch(epoch)
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x.clone(), y.clone()))
        if mid is not None and i == 0:
            mid()
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def _check_loader(loader, rebuild):
    ref = _epoch(loader, 3)
    drawn = {}

    def mid():
        drawn["a"] = list(loader.draw(2, 7))
        drawn["b"] = list(loader.draw(2, 8))

    assert _same(_epoch(loader, 3, mid), ref), "drawing statistics batches leaves the epoch in progress alone"
    a, b = drawn["a"], drawn["b"]
    assert len(a) == 2 and not _same(a, b), "every update draws fresh batches"
    assert _same(list(loader.draw(2, 7)), a), "the same key draws the same batches"
    assert _same(list(rebuild().draw(2, 7)), a), "a resumed run (fresh loader) draws the same batches"
    assert not _same(a, ref[:2]), "not the epoch's first batches"
    return a


def test_statistics_batches_leave_the_epoch_alone_on_tensor_loaders(tmp_path):
    synth = OmegaConf.create({"name": "synthetic", "input_shape": [1, 4, 4], "num_classes": 3, "n_train": 40,
                              "n_test": 5, "val_fraction": 0.0, "batch_size": 6})
    _check_loader(build_data(synth, CPU, 3).train, lambda: build_data(synth, CPU, 3).train)
    write_cifar10(tmp_path / "cifar-10-batches-py")
    cifar = OmegaConf.create({"name": "cifar10", "root": str(tmp_path), "batch_size": 8, "val_fraction": 0.0,
                              "augment": {"crop": True, "padding": 4, "pad_mode": "zeros", "flip": True}})
    data = build_data(cifar, CPU, 3)
    a = _check_loader(data.train, lambda: build_data(cifar, CPU, 3).train)
    # statistics batches are training batches: augmented like them
    raw = {tuple(x.flatten().tolist()) for x, _ in data.train_eval.draw(100, 0)} if data.train_eval else set()
    assert raw and any(tuple(x.flatten().tolist()) not in raw for x in a[0][0])


def test_statistics_batches_leave_the_epoch_alone_with_persistent_imagenet_workers(tmp_path):
    write_imagenet(tmp_path, n_train=6)
    cfg = inet_cfg(tmp_path, num_workers=2, persistent_workers=True, batch_size=4)
    data = build_data(cfg, CPU, seed=5)
    assert data.train.loader.persistent_workers
    a = _check_loader(data.train, lambda: build_data(inet_cfg(tmp_path, num_workers=0, batch_size=4), CPU, 5).train)
    assert [x.shape for x, _ in a] == [(4, 3, 32, 32)] * 2
    # every image still seen once per epoch after mid-epoch draws (the old bug restarted the epoch)
    seen = torch.cat([y for _, y in _epoch(data.train, 4, lambda: list(data.train.draw(3, 1)))])
    assert sorted(seen.tolist()) == [0] * 6 + [1] * 6 + [2] * 6


# --- short schedules ------------------------------------------------------------------------------
@pytest.mark.slow
def test_acdc_runs_on_four_epochs_from_the_command_line(tmp_path):
    proc = cli_here(["method=acdc", "schedule.epochs=4", "dataset=digits", "model=mlp", "logger=none", "progress=false",
                "eval.train_samples=0", "device=cpu", f"paths.runs={tmp_path}", "density=0.2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "density 0.2000" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_schedule_too_short_for_the_pattern_is_one_line_with_the_fix(tmp_path):
    over = ["method=acdc", "schedule.epochs=4", "dataset=digits", "model=mlp", "logger=none", "progress=false",
            "device=cpu", f"paths.runs={tmp_path}", "method.warmup={unit:epoch,value:10}"]
    with pytest.raises(ConfigError) as err:
        run(compose(over))
    msg = str(err.value)
    assert "\n" not in msg and "method.warmup" in msg and "fraction" in msg and "schedule.epochs" in msg
    proc = cli_here(over, cwd=tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "method.warmup" in lines[-1]


@pytest.mark.parametrize("method", ["acdc", "gmp", "dsr", "deepr", "set", "rigl", "gse", "topkast", "lottery",
                                    "sparse_momentum"])
def test_every_scheduled_method_runs_on_a_two_epoch_schedule(method, tmp_path):
    over = [f"method={method}", "schedule.epochs=2", "limit_train_batches=3", "dataset=digits", "model=mlp",
            "logger=none", "progress=false", "eval.train_samples=0", "device=cpu", f"paths.runs={tmp_path}",
            "density=0.2", "schedule=constant"]
    if method == "lottery":
        over.append("method.n_rounds=1")
    final = run(compose(over))
    assert math.isfinite(final["test/loss"]) and final["density/achieved"] == pytest.approx(0.2, abs=0.01)


def test_reproduce_sweeps_the_densities_the_published_runs_used():
    from sparse_bench import reproduce

    cmd = reproduce.command("sm_imagenet_resnet50", None, None, [])
    assert "density=0.15626087,0.25626087" in cmd  # the "10%" / "20%" columns' real densities
    cfg = compose(["experiment=sm_imagenet_resnet50"])
    assert cfg.density == 0.15626087 and cfg.paper["values"][0.15626087].column == "10%"


# --- the last gaps of a second read (GSE's Top-KAST init, its loader, its GMP window) ---------------
def _row_method(row: str, model: nn.Module, steps_per_epoch: int = SPE, density: float | None = None):
    """The method of an experiment row, as a run of that row builds it, on `model`."""
    cfg = compose(experiment_overrides(row))
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctx = MethodContext(model=model, optimizer=opt, density=float(density or cfg.density),
                        epochs=int(cfg.schedule.epochs), steps_per_epoch=steps_per_epoch, device=CPU,
                        generator=torch.Generator().manual_seed(1), loss_fn=nn.CrossEntropyLoss(),
                        batches=lambda n, key=0: STATS[:n])
    return build_method(cfg.method, ctx)


@pytest.mark.parametrize("row", ["gse_cifar100_resnet56_topkast", "gse_cifar10_resnet56_topkast"])
def test_gse_topkast_on_resnet56_trains_torchs_default_init_not_kaiming_normal(row):
    # topkast_training.py's sparsify builds every Linear and Conv2d afresh (layers.py MaskedLinear /
    # MaskedConv2d) without copying the old weight: U(-1, 1) / sqrt(fan_in), as reset_parameters draws
    from sparse_bench.models import build_model

    classes = 100 if "cifar100" in row else 10
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": "resnet56"}), (3, 32, 32), classes)
    own = {n: p.detach().std().item() for n, p in model.named_parameters() if p.dim() > 1}
    m = _row_method(row, model)
    m.setup()
    layers = {n: mod for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert len(m.theta) == len(layers) == len(m.masks.names)
    for name, theta in zip(m.masks.names, m.theta):
        mod = layers[name[: -len(".weight")]]
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(mod.weight)
        bound = 1.0 / math.sqrt(fan_in)
        assert theta.abs().max().item() <= bound + 1e-7, name
        if theta.numel() >= 1000:  # a uniform draw over (-bound, bound): std bound / sqrt(3)
            assert theta.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
            # ResNet-56's own Kaiming-normal weights: sqrt(2 / fan_in), about 2.45x larger
            assert own[name] / theta.std().item() == pytest.approx(math.sqrt(6), rel=0.1), name
        if mod.bias is not None:
            assert mod.bias.abs().max().item() <= bound + 1e-7
    fc = layers["linear"] if "linear" in layers else list(layers.values())[-1]
    assert fc.bias is not None and fc.bias.abs().max().item() > 0


def test_reinit_default_refuses_a_weight_no_linear_or_conv_owns():
    from sparse_bench.sparsity.reinit import reinit_

    emb = nn.Embedding(10, 4)
    with pytest.raises(ConfigError) as exc:
        reinit_("default", emb, ["weight"], [emb.weight.data], [torch.ones_like(emb.weight, dtype=torch.bool)],
                torch.Generator().manual_seed(0))
    assert "method.reinit=default" in str(exc.value) and "\n" not in str(exc.value)


def test_gse_rows_drop_the_last_partial_batch_as_its_loader_does(tmp_path):
    from sparse_bench.data.loader import DeviceLoader

    # datasets.py get_dataloader: drop_last=True, so 50,000 CIFAR images at batch 128 are 390 steps
    assert len(DeviceLoader(torch.zeros(50_000, 1), torch.zeros(50_000), 128, True, drop_last=True)) == 390
    assert len(DeviceLoader(torch.zeros(50_000, 1), torch.zeros(50_000), 128, True, drop_last=False)) == 391
    for row in ("gse_cifar10_resnet56", "gse_cifar100_vit_cifar_rigl", "gse_cifar10_vgg16_small_gmp",
                "gse_imagenet_resnet50", "gse_width_cifar100_resnet56"):
        assert compose(experiment_overrides(row)).dataset.drop_last is True, row
    write_cifar10(tmp_path)  # a small CIFAR-10: the row's loader at batch 16 instead of 128
    cfg = OmegaConf.merge(compose(["experiment=gse_cifar10_resnet56"]).dataset, {"root": str(tmp_path),
                                                                               "batch_size": 16})
    data = build_data(cfg, CPU, seed=0)
    n = data.train.num_samples
    assert len(data.train) == n // 16 and n % 16 and len(list(data.train)) == n // 16


@pytest.mark.parametrize("name,extra", [("synthetic", {"n_train": 250}), ("digits", {})])
def test_every_reader_honours_drop_last(name, extra):
    cfg = OmegaConf.create({"name": name, "batch_size": 100, "val_fraction": 0.0, **extra})
    for drop in (False, True):
        data = build_data(OmegaConf.merge(cfg, {"drop_last": drop}), CPU, seed=0)
        n = data.train.num_samples
        assert len(data.train) == (n // 100 if drop else -(-n // 100))
        assert sum(len(y) for _, y in data.train) == (n // 100 * 100 if drop else n)


def test_drop_last_with_no_whole_batch_is_refused_in_one_line(tmp_path):
    over = ["dataset=synthetic", "dataset.n_train=50", "dataset.batch_size=64", "dataset.drop_last=true",
            "model=mlp", "logger=none", "progress=false", "device=cpu", f"paths.runs={tmp_path}", "schedule.epochs=1"]
    with pytest.raises(ConfigError) as exc:
        run(compose(over))
    msg = str(exc.value)
    assert "\n" not in msg and "dataset.drop_last" in msg and "dataset.batch_size=64" in msg


def test_gse_gmp_window_ends_at_epoch_120_of_390_steps():
    # gradual_sparse_training.py: final_prune_step = prune_finish * len(train_loader) = 120 * 390
    for row in ("gse_cifar10_resnet56_gmp", "gse_cifar100_vit_cifar_gmp"):
        m = _row_method(row, mlp(), steps_per_epoch=390, density=0.02)
        assert m.end == 46_800 and m.start == 0 and m.frequency == 1000


@pytest.mark.parametrize("name", ["static", "gmp", "snip", "topkast"])
def test_fan_in_reinit_draws_each_layers_bias_from_its_units_bound(name):
    # layers.py init_masked_params: bias ~ U(-1, 1) * sqrt(3 / fan_in) of the unit, like its weights
    model = mlp()
    before = [m.bias.detach().clone() for m in model if isinstance(m, nn.Linear)]
    _, _, m = make(name, model=model, reinit="fan_in")
    m.setup()
    linears = [mod for mod in model if isinstance(mod, nn.Linear)]
    dense_fan_in = name != "static"  # the others re-draw the dense model before choosing the mask
    for mod, old, mask in zip(linears, before, m.masks.masks):
        fan = torch.full((mod.out_features,), float(mod.in_features)) if dense_fan_in else mask.sum(1).float()
        bound = (3.0 / fan.clamp_min(1)).sqrt()
        assert not torch.equal(mod.bias, old)
        assert bool((mod.bias.abs() <= bound + 1e-6).all())
        assert mod.bias.abs().max() > 0.5 * bound.min()  # drawn from the bound, not the default's 1/sqrt(fan_in)
