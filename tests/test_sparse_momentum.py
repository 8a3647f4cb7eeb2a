"""Sparse momentum: one prune / redistribute / grow cycle, checked against direct computation."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.confdir import conf_dir
from sparse_bench.sparsity.methods import MethodContext, build_method

CONF = conf_dir() / "method" / "sparse_momentum.yaml"
EPOCHS, SPE = 4, 10


def make(density=0.2, seed=0, steps=15, **over):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cfg = OmegaConf.merge(OmegaConf.load(CONF), OmegaConf.create(over))
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=EPOCHS, steps_per_epoch=SPE,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed + 1),
                        loss_fn=nn.CrossEntropyLoss())
    method = build_method(cfg, ctx)
    method.setup()
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        method.before_optimizer_step(step)
        opt.step()
        method.after_optimizer_step(step)
    return model, opt, method


def momentum(opt, p):
    return opt.state[p]["momentum_buffer"]


VARIANTS = [
    {},
    {"growth": "random"},
    {"growth": "momentum_neuron"},
    {"growth": "global_momentum"},
    {"prune": "set"},
    {"prune": "negativity"},
    {"prune": "global_magnitude"},
    {"redistribution": "magnitude"},
    {"redistribution": "nonzero"},
    {"redistribution": "none"},
    {"init": "erk"},
    {"decay": "linear"},
]


@pytest.mark.parametrize("over", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_cycle_keeps_the_count_exact_and_grown_weights_at_zero(over):
    model, opt, m = make(**over)
    before = sum(m.masks.nnz())
    target = round(0.2 * sum(m.masks.numels))
    assert before == target
    old = [k.clone() for k in m.masks.masks]
    logs = m.update(step=SPE)
    assert sum(m.masks.nnz()) == before
    grown_any = 0
    for p, o, n in zip(m.masks.params, old, m.masks.masks):
        born = n & ~o
        grown_any += int(born.sum())
        assert torch.all(p[born] == 0), "grown weights must start at exactly 0"
        assert torch.all(p[~n] == 0), "inactive weights must be 0"
    assert grown_any > 0
    assert logs["mask/grown"] == grown_any == logs["mask/pruned"]
    if over.get("redistribution") == "none":
        assert m.masks.nnz() == [int(o.sum()) for o in old]


def test_pruned_weights_are_the_smallest_active_ones():
    model, opt, m = make()
    w_before = [p.detach().clone() for p in m.masks.params]
    m.update(step=SPE)
    c = m.last_update
    for w, o, d, r, rate in zip(w_before, c["old_masks"], c["pruned"], c["removed"], c["layer_rates"]):
        survivors = o & ~d
        assert int(d.sum()) == r == min(math.ceil(rate * int(o.sum())), int(o.sum()))
        assert w[d].abs().max() <= w[survivors].abs().min()


def test_growth_takes_the_largest_momentum_among_free_slots():
    model, opt, m = make()
    mom = [momentum(opt, p).clone() for p in m.masks.params]
    m.update(step=SPE)
    c = m.last_update
    for g, o, d, grown, k in zip(mom, c["old_masks"], c["pruned"], c["grown"], c["regrow"]):
        free = ~(o & ~d)
        assert int(grown.sum()) == k
        assert not torch.any(grown & ~free)
        rest = free & ~grown
        if k and rest.any():
            assert g[grown].abs().min() >= g[rest].abs().max()


def test_shares_are_mean_momentum_of_active_weights_and_budget_follows_them():
    model, opt, m = make(density=0.05)
    masks = [k.clone() for k in m.masks.masks]
    raw = [float(momentum(opt, p).abs()[k].mean()) for p, k in zip(m.masks.params, masks)]
    m.update(step=SPE)
    c = m.last_update
    assert c["shares"] == pytest.approx([r / sum(raw) for r in raw])
    total = sum(c["removed"])
    caps = [0.99 * f for f in c["free"]]
    assert all(s * total < cap for s, cap in zip(c["shares"], caps)), "precondition: no cap binds"
    for s, k in zip(c["shares"], c["regrow"]):
        assert abs(k - s * total) < 1.0
    assert sum(c["regrow"]) == total


def test_cap_at_099_of_free_slots_and_overflow_spread_over_other_layers():
    model, opt, m = make()
    last = m.masks.params[-1]
    momentum(opt, last).fill_(1e3)  # the last layer claims nearly all regrowth
    m.update(step=SPE)
    c = m.last_update
    total = sum(c["removed"])
    assert c["shares"][-1] > 0.99
    assert c["shares"][-1] * total > 0.99 * c["free"][-1], "precondition: the cap binds"
    assert c["regrow"][-1] == math.floor(0.99 * c["free"][-1])
    assert sum(c["regrow"]) == total
    overflow = total - c["regrow"][-1]
    # spread evenly over the other two layers (their own shares are ~0)
    assert abs(c["regrow"][0] - overflow / 2) <= 1 and abs(c["regrow"][1] - overflow / 2) <= 1


def test_dense_layer_guard():
    model, opt, m = make()
    masks = [k.clone() for k in m.masks.masks]
    masks[-1] = torch.rand(masks[-1].shape, generator=torch.Generator().manual_seed(5)) < 0.9
    masks[0] = torch.rand(masks[0].shape, generator=torch.Generator().manual_seed(6)) < 0.85
    m.masks.set_masks(masks)
    momentum(opt, m.masks.params[-1]).fill_(10.0)  # large share for the last layer only
    momentum(opt, m.masks.params[0]).mul_(1e-6)
    nnz = m.masks.nnz()
    m.update(step=SPE)
    c = m.last_update
    p = c["prune_rate"]
    sparsity_last = 1 - nnz[-1] / m.masks.numels[-1]
    assert c["shares"][-1] > 1 / 3 and c["layer_rates"][-1] == pytest.approx(min(sparsity_last, p))
    assert c["shares"][0] < 1 / 3 and c["layer_rates"][0] == p  # dense but small share: full rate


def test_momentum_buffers_are_not_masked():
    model, opt, m = make()
    for p, k in zip(m.masks.params, m.masks.masks):
        buf = momentum(opt, p)
        assert torch.all(p[~k] == 0)
        assert buf[~k].abs().sum() > 0, "inactive weights keep accumulating momentum"
    bufs = [momentum(opt, p).clone() for p in m.masks.params]
    m.update(step=SPE)
    for p, b in zip(m.masks.params, bufs):
        assert torch.equal(momentum(opt, p), b), "a cycle leaves the momentum buffers alone"


def test_prune_rate_decay():
    _, _, m = make(steps=0)
    T = EPOCHS * SPE
    assert m.prune_rate(0) == pytest.approx(0.5)
    assert m.prune_rate(T // 2) == pytest.approx(0.005 + 0.495 / 2)
    assert m.prune_rate(T) == pytest.approx(0.005)
    _, _, lin = make(steps=0, decay="linear")
    assert lin.prune_rate(T // 4) == pytest.approx(0.5 - 0.495 / 4)


def test_cycles_at_the_end_of_every_epoch_but_the_last():
    _, _, m = make()
    fired = [m.on_epoch_end(e, e * SPE) is not None for e in range(1, EPOCHS + 1)]
    assert fired == [True] * (EPOCHS - 1) + [False]
    _, _, s = make(update_every=5)
    assert [s.on_step_end(k) is not None for k in range(1, 11)] == [False] * 4 + [True] + [False] * 4 + [True]


def test_determinism_and_state_round_trip():
    _, _, a = make(growth="random")
    _, _, b = make(growth="random")
    a.update(SPE)
    b.update(SPE)
    assert all(torch.equal(x, y) for x, y in zip(a.masks.masks, b.masks.masks))
    _, _, c = make(growth="random", seed=1)
    c.update(SPE)
    assert not all(torch.equal(x, y) for x, y in zip(a.masks.masks, c.masks.masks))
    state = a.state_dict()
    _, _, d = make(growth="random")
    d.load_state_dict(state)
    a.update(2 * SPE)  # d's model was trained identically, so only the method state matters
    d.update(2 * SPE)
    assert all(torch.equal(x, y) for x, y in zip(a.masks.masks, d.masks.masks))


@pytest.mark.parametrize("key,value", [("prune", "bogus"), ("growth", "bogus"), ("redistribution", "x"),
                                       ("decay", "step"), ("prune_rate", 1.5), ("update_every", "often")])
def test_bad_options_are_config_errors(key, value):
    from sparse_bench.errors import ConfigError

    with pytest.raises(ConfigError, match=f"method.{key}"):
        make(steps=0, **{key: value})
