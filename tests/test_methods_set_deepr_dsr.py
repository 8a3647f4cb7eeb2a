"""SET, DEEP R and DSR: exact density, zero-initialised growth, optimizer state, determinism,
bit-identical resume, learning, and each method's own rule."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.confdir import conf_dir
from sparse_bench.errors import ConfigError
from sparse_bench.sparsity.distributions import allocate
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.sparsity.methods.dsr import DSR
from sparse_bench.train.trainer import hooked_step

from conftest import cli_here

CPU = torch.device("cpu")
STEPS_PER_EPOCH = 6
BATCH = 32

# fast settings: updates often enough that every test sees several of them
CONFIGS = {
    "set": {"name": "set", "init": "er", "prune_rate": 0.3, "prune_rate_min": 0.0, "decay": "constant",
            "update_every": "epoch", "prune": "magnitude"},
    "deepr": {"name": "deepr", "init": "uniform", "l1": 1e-4, "temperature": 1e-5, "regrow_sign": "fixed"},
    "dsr": {"name": "dsr", "init": "uniform", "init_threshold": 0.01, "np_target": 0.1, "delta": 0.1,
            "update_every": 3},
}
METHODS = list(CONFIGS)


# --------------------------------------------------------------------------- a learnable toy problem


class Net(nn.Module):
    """A conv layer and two linear layers: 6x6 single-channel images, 4 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 36, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def toy_data(n_batches: int, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(36, 4, generator=g)
    xs = torch.randn(n_batches * BATCH, 1, 6, 6, generator=g)
    ys = (xs.flatten(1) @ teacher).argmax(1)
    return [(xs[i * BATCH:(i + 1) * BATCH], ys[i * BATCH:(i + 1) * BATCH]) for i in range(n_batches)]


DATA = toy_data(STEPS_PER_EPOCH)


def build(cfg: dict, seed: int = 0, density: float = 0.2, epochs: int = 4, lr: float = 0.05,
          momentum: float = 0.9, setup: bool = True):
    torch.manual_seed(1000)  # the same initial weights for every seed: only the method's RNG varies
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=epochs,
                        steps_per_epoch=STEPS_PER_EPOCH, device=CPU,
                        generator=torch.Generator().manual_seed(seed), prunable=None,
                        batches=lambda n, key=0: DATA[:n], loss_fn=nn.CrossEntropyLoss())
    method = build_method(OmegaConf.create(cfg), ctx)
    if setup:
        method.setup()
    return model, opt, method


def train(model, opt, method, epochs, start_epoch=1, on_step=None, on_update=None):
    """The trainer's hook order; `on_step(step)` after every step, `on_update(logs)` after updates."""
    loss_fn = nn.CrossEntropyLoss()
    step = (start_epoch - 1) * STEPS_PER_EPOCH
    for epoch in range(start_epoch, start_epoch + epochs):
        for x, y in DATA:
            hooked_step(method, opt, step, lambda x=x, y=y: loss_fn(model(x), y))
            step += 1
            logs = method.on_step_end(step)
            if logs and on_update:
                on_update(logs)
            if on_step:
                on_step(step)
        logs = method.on_epoch_end(epoch, step)
        if logs and on_update:
            on_update(logs)
    return step


def full_loss(model) -> float:
    with torch.no_grad():
        return float(sum(nn.functional.cross_entropy(model(x), y) for x, y in DATA) / len(DATA))


def momentum(opt, p):
    return opt.state[p]["momentum_buffer"]


def grown_positions(method, name):
    """The positions the last update activated (zero-initialised), per layer."""
    if name == "deepr":
        return method.last_step["born"]
    return method.last_update["grown"]


# --------------------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", METHODS)
def test_density_is_exact_after_every_step_and_update(name):
    model, opt, method = build(CONFIGS[name])
    per_layer = method.masks.nnz()
    total = sum(method.masks.numels)
    assert sum(per_layer) == round(0.2 * total)
    updates = []

    def check(step):
        nnz = method.masks.nnz()
        assert sum(nnz) == sum(per_layer), f"step {step}"
        if name != "dsr":  # SET and DEEP R keep every layer's count; DSR moves weights between layers
            assert nnz == per_layer, f"step {step}"
        for p, m in zip(method.masks.params, method.masks.masks):
            assert torch.all(p.data[~m] == 0)

    train(model, opt, method, 4, on_step=check, on_update=lambda logs: updates.append(logs))
    assert updates, "no update happened"
    churn = sum(u["mask/grown"] for u in updates)
    assert churn > 0, "the masks never changed"
    for u in updates:
        assert u["mask/grown"] == u["mask/pruned"]
    if name == "dsr":  # DSR reallocates: layer counts do change
        assert method.masks.nnz() != per_layer


@pytest.mark.parametrize("name", METHODS)
def test_grown_weights_start_at_zero_with_zeroed_momentum(name):
    model, opt, method = build(CONFIGS[name])
    seen = {"grown": 0, "kept_momentum": 0}

    def check(_logs=None):
        grown = grown_positions(method, name)
        for p, m, g in zip(method.masks.params, method.masks.masks, grown):
            assert torch.all(m[g]), "grown positions must be active"
            assert torch.all(p.data[g] == 0), "grown weights must start at exactly 0"
            mom = momentum(opt, p)
            assert torch.all(mom[g] == 0), "momentum of grown weights must be zeroed"
            seen["grown"] += int(g.sum())
            # the other active weights keep their momentum
            seen["kept_momentum"] += int((mom[m & ~g] != 0).sum())

    if name == "deepr":
        def step_check(step):
            check()
            dead = method.last_step["dead"]
            for p, d, m in zip(method.masks.params, dead, method.masks.masks):
                assert torch.all(momentum(opt, p)[d] == 0), "momentum of dead connections is zeroed"
                assert torch.all(p.data[d & ~m] == 0)
        train(model, opt, method, 3, on_step=step_check)
    else:
        train(model, opt, method, 3, on_update=check)
    assert seen["grown"] > 0
    assert seen["kept_momentum"] > 0


def masks_after(name, seed, epochs=3):
    model, opt, method = build(CONFIGS[name], seed=seed)
    train(model, opt, method, epochs)
    return [m.clone() for m in method.masks.masks], [p.detach().clone() for p in method.masks.params]


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_masks_different_seed_different(name):
    a_masks, a_w = masks_after(name, 0)
    b_masks, b_w = masks_after(name, 0)
    c_masks, _ = masks_after(name, 1)
    assert all(torch.equal(x, y) for x, y in zip(a_masks, b_masks))
    assert all(torch.equal(x, y) for x, y in zip(a_w, b_w))
    assert not all(torch.equal(x, y) for x, y in zip(a_masks, c_masks))


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_continues_identically(name):
    epochs, split = 4, 2
    model, opt, method = build(CONFIGS[name], seed=0, epochs=epochs)
    train(model, opt, method, split)
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()})
    logs_a = []
    train(model, opt, method, epochs - split, start_epoch=split + 1, on_update=logs_a.append)

    # a fresh build with another seed and no setup(), as a resumed run does
    model_b, opt_b, method_b = build(CONFIGS[name], seed=7, epochs=epochs, setup=False)
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    method_b.load_state_dict(saved["method"])
    logs_b = []
    train(model_b, opt_b, method_b, epochs - split, start_epoch=split + 1, on_update=logs_b.append)

    assert logs_a and logs_a == logs_b
    for x, y in zip(method.masks.masks, method_b.masks.masks):
        assert torch.equal(x, y)
    for x, y in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(x, y)
    if name == "dsr":
        assert method.threshold == method_b.threshold


@pytest.mark.parametrize("name", METHODS)
def test_short_training_learns(name):
    model, opt, method = build(CONFIGS[name], density=0.3, epochs=16, lr=0.1)
    before = full_loss(model)
    train(model, opt, method, 16)
    after = full_loss(model)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("name, key, value", [
    ("set", "prune_rate", 1.5), ("set", "prune", "random"), ("set", "update_every", 0),
    ("deepr", "temperature", -1), ("deepr", "regrow_sign", "flip"),
    ("dsr", "np_target", 2.0), ("dsr", "delta", 1.0), ("dsr", "init_threshold", 0.0),
])
def test_bad_options_are_config_errors(name, key, value):
    with pytest.raises(ConfigError, match=f"method.{key}"):
        build({**CONFIGS[name], key: value}, setup=False)


# --------------------------------------------------------------------------- SET


def test_set_prunes_exactly_the_smallest_magnitudes_and_regrows_at_random():
    model, opt, method = build(CONFIGS["set"])
    train(model, opt, method, 1)  # one epoch of training (and its end-of-epoch update)
    old = [m.clone() for m in method.masks.masks]
    weights = [p.detach().clone() for p in method.masks.params]
    logs = method.update(step=STEPS_PER_EPOCH)
    for w, o, n in zip(weights, old, method.masks.masks):
        k = int(o.sum())
        drop = math.floor(0.3 * k)
        # our own ranking: the `drop` smallest |w| among the active weights
        mags = w.abs()[o]
        cut = torch.sort(mags).values
        expected = o & (w.abs() <= cut[drop - 1])
        assert int(expected.sum()) == drop  # no ties in random weights
        removed = o & ~n
        assert torch.all(expected[removed]), "only the smallest may be removed"
        assert torch.all(n[o & ~expected]), "every larger active weight is kept"
        assert int(n.sum()) == k
        grown = n & ~o
        assert int(grown.sum()) == int(removed.sum())
    assert logs["set/rewired"] == sum(math.floor(0.3 * int(o.sum())) for o in old)
    assert logs["mask/grown"] > 0


def test_set_sign_mode_prunes_each_sign_in_proportion():
    cfg = {**CONFIGS["set"], "prune": "set", "prune_rate": 0.5}
    model, opt, method = build(cfg)
    p, m = method.masks.params[1], method.masks.masks[1]
    with torch.no_grad():  # 3/4 of the active weights positive, 1/4 negative, distinct magnitudes
        idx = m.flatten().nonzero().flatten()
        vals = torch.arange(1, len(idx) + 1, dtype=torch.float32) / len(idx)
        signs = torch.ones(len(idx))
        signs[::4] = -1
        p.data.view(-1)[idx] = vals * signs
    w = p.detach().clone()
    method.update(step=1)
    n = method.masks.masks[1]
    pruned = method.last_update["pruned"][1]
    k = math.floor(0.5 * len(idx))
    n_pos, n_neg = int((m & (w > 0)).sum()), int((m & (w < 0)).sum())
    k_pos, k_neg = allocate([k * n_pos / (n_pos + n_neg), k * n_neg / (n_pos + n_neg)], [n_pos, n_neg], k)
    assert int((pruned & (w > 0)).sum()) == k_pos and int((pruned & (w < 0)).sum()) == k_neg
    pos_vals, neg_vals = w[m & (w > 0)].sort().values, w[m & (w < 0)].sort(descending=True).values
    assert torch.all(w[pruned & (w > 0)] <= pos_vals[k_pos - 1])  # the smallest positives
    assert torch.all(w[pruned & (w < 0)] >= neg_vals[k_neg - 1])  # the negatives closest to zero
    assert int(n.sum()) == int(m.sum())


def test_set_decay_and_step_cadence():
    cfg = {**CONFIGS["set"], "decay": "linear", "prune_rate_min": 0.1, "update_every": 4}
    model, opt, method = build(cfg, epochs=2)
    rates = []
    train(model, opt, method, 2, on_update=lambda logs: rates.append(logs["set/prune_rate"]))
    total = 2 * STEPS_PER_EPOCH
    assert rates == pytest.approx([0.3 + (0.1 - 0.3) * s / total for s in (4, 8)])


# --------------------------------------------------------------------------- DEEP R


def test_deepr_weights_keep_their_sign():
    model, opt, method = build(CONFIGS["deepr"])
    signs0 = [s.clone() for s in method.signs]
    for p, m, s in zip(method.masks.params, method.masks.masks, signs0):
        assert torch.all((p.data[m] > 0) == s[m])

    def check(step):
        for p, m, s in zip(method.masks.params, method.masks.masks, signs0):
            w = p.data
            assert torch.all(w[m & s] >= 0) and torch.all(w[m & ~s] <= 0), f"step {step}"

    train(model, opt, method, 3, on_step=check)
    assert all(torch.equal(a, b) for a, b in zip(signs0, method.signs))  # fixed signs


def test_deepr_weight_pushed_across_zero_dies_and_is_replaced():
    cfg = {**CONFIGS["deepr"], "l1": 0.0, "temperature": 0.0}
    model, opt, method = build(cfg)
    layer = 1
    p, m, s = method.masks.params[layer], method.masks.masks[layer], method.signs[layer]
    active = m.flatten().nonzero().flatten()
    victim, survivor = int(active[0]), int(active[1])
    nnz = method.masks.nnz()
    before = m.clone()
    with torch.no_grad():  # as if the gradient step had pushed `victim` across zero
        sign = lambda i: 1.0 if bool(s.view(-1)[i]) else -1.0  # noqa: E731
        p.data.view(-1)[victim] = -0.5 * sign(victim)
        p.data.view(-1)[survivor] = 0.25 * sign(survivor)
        others = [q.data.clone() for q in method.masks.params]
    method.after_optimizer_step(0)
    new = method.masks.masks[layer]
    assert bool(method.last_step["dead"][layer].view(-1)[victim])
    assert bool(new.view(-1)[survivor])
    assert float(p.data.view(-1)[victim]) == 0.0
    assert float(p.data.view(-1)[survivor]) == 0.25 * sign(survivor)
    assert method.masks.nnz() == nnz
    born = method.last_step["born"][layer]
    assert int(born.sum()) == 1 and int(method.last_step["dead"][layer].sum()) == 1
    assert not bool((born & before & ~method.last_step["dead"][layer]).any())  # born among the dormant
    # nothing else changed in any layer (no noise, no shrink)
    for i, (q, o) in enumerate(zip(method.masks.params, others)):
        if i != layer:
            assert torch.equal(q.data, o)
            assert int(method.last_step["born"][i].sum()) == 0


def test_deepr_shrink_and_noise_scale():
    lr, l1 = 0.05, 0.01
    model, opt, method = build({**CONFIGS["deepr"], "l1": l1, "temperature": 0.0}, lr=lr)
    with torch.no_grad():
        for p, m, s in zip(method.masks.params, method.masks.masks, method.signs):
            p.data.copy_(torch.where(s, 1.0, -1.0) * m)
    method.after_optimizer_step(0)
    for p, m in zip(method.masks.params, method.masks.masks):
        assert torch.allclose(p.data[m].abs(), torch.full_like(p.data[m], 1.0 - lr * l1))
    temp = 1e-2
    model, opt, method = build({**CONFIGS["deepr"], "l1": 0.0, "temperature": temp}, lr=lr)
    with torch.no_grad():
        for p, m, s in zip(method.masks.params, method.masks.masks, method.signs):
            p.data.copy_(torch.where(s, 10.0, -10.0) * m)
    method.after_optimizer_step(0)
    theta = torch.cat([(p.data.abs() - 10.0)[m] for p, m in zip(method.masks.params, method.masks.masks)])
    assert theta.std().item() == pytest.approx(math.sqrt(2 * lr * temp), rel=0.15)


def test_deepr_random_regrow_sign_mode_redraws_signs_of_new_connections():
    model, opt, method = build({**CONFIGS["deepr"], "regrow_sign": "random", "temperature": 1e-3})
    prev = [s.clone() for s in method.signs]
    changed = {"n": 0}

    def check(step):
        for i, (s, b) in enumerate(zip(method.signs, method.last_step["born"])):
            assert torch.equal(prev[i][~b], s[~b]), "only new connections get a new sign"
            changed["n"] += int((prev[i] != s).sum())
            prev[i] = s.clone()

    train(model, opt, method, 2, on_step=check)
    assert changed["n"] > 0


@pytest.mark.parametrize("exclude_pruned", [False, True])
def test_deepr_top_k_draw_picks_what_the_sort_draw_picks(exclude_pruned):
    """The CPU's top-k of the dead count and the accelerator's sort-and-rank draw the same
    connections from the same random scores: two runs that differ only in the draw train the same."""
    cfg = {**CONFIGS["deepr"], "temperature": 1e-3, "exclude_pruned": exclude_pruned}
    runs = []
    for sort_draw in (False, True):
        model, opt, method = build(cfg)
        method.sort_draw = sort_draw
        born = []
        train(model, opt, method, 2, on_step=lambda step, born=born, method=method: born.append(
            sum(int(b.sum()) for b in method.last_step["born"])))
        runs.append((born, [m.clone() for m in method.masks.masks], [p.detach().clone() for p in model.parameters()]))
    (born_a, masks_a, weights_a), (born_b, masks_b, weights_b) = runs
    assert born_a == born_b and sum(born_a) > 0  # connections were rewired, the same number each step
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))


# --------------------------------------------------------------------------- DSR


@pytest.mark.parametrize("pruned, expected", [(10, 2.0), (89, 2.0), (90, 1.0), (110, 1.0), (111, 0.5), (500, 0.5)])
def test_dsr_threshold_rule(pruned, expected):
    assert DSR.adjust_threshold(1.0, pruned, target=100.0, delta=0.1) == expected


def set_magnitudes(method, small_per_layer: list[int], small=1e-4, big=1.0):
    """Active weights |w| = big except the first `small_per_layer[l]` of each layer."""
    with torch.no_grad():
        for p, m, c in zip(method.masks.params, method.masks.masks, small_per_layer):
            idx = m.flatten().nonzero().flatten()
            vals = torch.full((len(idx),), big)
            vals[:c] = small
            p.data.view(-1)[idx] = vals


@pytest.mark.parametrize("counts, factor", [([0, 5, 0], 2.0), ([0, 30, 0], 0.5), ([2, 12, 1], 1.0)])
def test_dsr_threshold_doubles_or_halves_in_an_update(counts, factor):
    # 0.2 * (36 + 4608 + 128) = 954 active; np_target 15/954 -> N_p = 15, tolerance +-1.5
    model, opt, method = build({**CONFIGS["dsr"], "np_target": 15 / 954, "init_threshold": 0.01})
    assert sum(method.masks.nnz()) == 954
    set_magnitudes(method, counts)
    logs = method.update(step=3)
    assert logs["dsr/pruned"] == sum(counts)
    assert method.threshold == 0.01 * factor
    assert logs["dsr/threshold"] == 0.01 * factor


def test_dsr_regrowth_follows_surviving_counts():
    model, opt, method = build({**CONFIGS["dsr"], "init_threshold": 0.01})
    nnz = method.masks.nnz()
    counts = [nnz[0] // 2, 300, nnz[2] // 2]
    set_magnitudes(method, counts)
    old = [m.clone() for m in method.masks.masks]
    method.update(step=3)
    k = sum(counts)
    surviving = [n - c for n, c in zip(nnz, counts)]
    new_nnz = method.masks.nnz()
    grown = [n - s for n, s in zip(new_nnz, surviving)]
    assert sum(new_nnz) == sum(nnz)
    assert sum(grown) == k
    for g, s in zip(grown, surviving):
        assert abs(g - k * s / sum(surviving)) < 1.0
    assert grown == method.last_update["regrow"]
    # exactly the small weights were pruned; survivors kept their values
    for p, o, n in zip(method.masks.params, old, method.masks.masks):
        assert torch.all(n[o & (p.data.abs() == 1.0)])
        assert torch.all(p.data[n & ~o] == 0)


def test_dsr_regrowth_counts_helper_is_exact_and_capped():
    assert DSR.regrowth_counts([10, 30, 60], [100, 100, 100], 10) == [1, 3, 6]
    assert DSR.regrowth_counts([10, 30, 60], [100, 100, 2], 10) == [2, 6, 2]
    assert sum(DSR.regrowth_counts([1, 1, 1], [5, 5, 5], 7)) == 7
    assert sum(DSR.regrowth_counts([0, 0], [3, 4], 7)) == 7
    assert DSR.regrowth_counts([0, 5], [10, 1], 4) == [3, 1]  # overflow lands where there is room


# --------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("name", METHODS)
def test_cli_run(tmp_path, name):
    runs = tmp_path / "runs"
    extra = ["method.update_every=3"] if name == "dsr" else []
    proc = cli_here([f"method={name}", "dataset=digits", "model=mlp", "logger=none", "schedule=constant",
                "schedule.epochs=2", "limit_train_batches=5", "progress=false", "device=cpu",
                f"paths.runs={runs}", *extra], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = list(runs.rglob("results.json"))
    res = json.loads(results.read_text())
    total = res["prunable"]["total"]
    target = res["density"]["target"]
    assert res["density"]["achieved"] == round(target * total) / total
    assert res["steps"] == 10


def test_dsr_default_period_lengthens_like_the_reference():
    from sparse_bench.sparsity.methods import MethodContext, build_method

    cfg = OmegaConf.load(conf_dir() / "method" / "dsr.yaml")
    model = nn.Sequential(nn.Linear(4, 4))
    ctx = MethodContext(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                        density=0.5, epochs=200, steps_per_epoch=10, device=CPU,
                        generator=torch.Generator().manual_seed(0))
    m = build_method(cfg, ctx)
    fired = [s for s in range(1, 2001) if m.cadence.at_step(s)]
    # the DSR code's wrnet_schedule.yaml as fractions: period 100 from epoch 0, 200 from 25, 400 from
    # 80, 800 from 140; an update when the step count is a multiple of the period in force; none
    # from epoch 190 (--stop-rewire-epoch)
    assert fired == [100, 200, 400, 600, 800, 1200, 1600]
    # the same schedule in the reference's epochs gives the same steps
    cfg.update_every = {"unit": "epoch", "points": [[0, 100], [25, 200], [80, 400], [140, 800]]}
    cfg.end = {"unit": "epoch", "value": 190}
    m = build_method(cfg, ctx)
    assert [s for s in range(1, 2001) if m.cadence.at_step(s)] == fired
