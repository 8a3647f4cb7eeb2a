"""RigL and Top-KAST: each rule checked against an independent computation in this file."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.errors import ConfigError
from sparse_bench.sparsity.distributions import layer_counts
from sparse_bench.sparsity.methods import MethodContext, build_method

from conftest import cli_here

CPU = torch.device("cpu")
D_IN, HIDDEN, CLASSES, BATCH, N_BATCHES = 20, 64, 5, 32, 8


# --------------------------------------------------------------------------- helpers


def make_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable problem: labels from a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH * N_BATCHES, D_IN, generator=g)
    y = (x @ torch.randn(D_IN, CLASSES, generator=g)).argmax(1)
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


def build(cfg: dict, density: float = 0.2, epochs: int = 5, model_seed: int = 0, lr: float = 0.05,
          momentum: float = 0.9, weight_decay: float = 5e-4, setup: bool = True):
    batches = make_batches()
    model = make_model(model_seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=epochs,
                        steps_per_epoch=len(batches), device=CPU,
                        generator=torch.Generator().manual_seed(1), prunable=None,
                        batches=lambda n, key=0: batches[:n], loss_fn=nn.CrossEntropyLoss())
    method = build_method(OmegaConf.create(cfg), ctx)
    if setup:
        method.setup()
    return model, opt, method, batches


def train_step(model, opt, method, batch, s: int, after_grads=None, after_opt=None, loss_fn=None):
    """One trainer iteration (same hook order as Trainer.train_epoch); `s` = steps done before."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    x, y = batch
    method.before_forward(s)
    loss = loss_fn(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    method.before_optimizer_step(s)
    if after_grads:
        after_grads()
    opt.step()
    method.after_optimizer_step(s)
    if after_opt:
        after_opt()
    logs = method.on_step_end(s + 1)
    return float(loss.detach()), logs


def momentum_of(opt, p) -> torch.Tensor:
    return opt.state[p]["momentum_buffer"]


def top_k_mask(scores: torch.Tensor, k: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """The k largest scores (optionally only among `among`), by a full argsort."""
    flat = scores.flatten().clone()
    if among is not None:
        flat[~among.flatten()] = -math.inf
    order = torch.argsort(flat, descending=True)
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[order[:k]] = True
    return out.view_as(scores)


def bottom_k_mask(scores: torch.Tensor, k: int, among: torch.Tensor) -> torch.Tensor:
    flat = scores.flatten().clone()
    flat[~among.flatten()] = math.inf
    order = torch.argsort(flat)
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[order[:k]] = True
    return out.view_as(scores)


RIGL = {"name": "rigl", "init": "erk", "drop_fraction": 0.3, "decay": "cosine", "update_every": 4,
        "end": {"unit": "fraction", "value": 0.75}, "scope": "layer", "grow_init": "zeros", "drop_noise": 0.0}
TOPKAST = {"name": "topkast", "forward_density": None, "backward_density": None, "update_every": 4,
           "exploration_l2": 0.0}


# --------------------------------------------------------------------------- RigL


def test_rigl_density_exact_after_every_step_and_masks_move():
    model, opt, method, batches = build(RIGL, density=0.2)
    counts = layer_counts(method.masks.shapes, 0.2, "erk")
    assert method.masks.nnz() == counts
    initial = [m.clone() for m in method.masks.masks]
    updates = 0
    for s in range(40):
        _, logs = train_step(model, opt, method, batches[s % N_BATCHES], s)
        assert method.masks.nnz() == counts  # layer scope: every layer keeps its count exactly
        for p, m in zip(method.masks.params, method.masks.masks):
            assert torch.all(p[~m] == 0)
        if logs:
            updates += 1
            assert logs["mask/grown"] == logs["mask/pruned"]
    assert updates == 7  # steps 4, 8, ..., 28 (< 0.75 * 40)
    moved = sum(int((a != b).sum()) for a, b in zip(initial, method.masks.masks))
    assert moved > 0


def test_rigl_drops_smallest_weights_and_grows_largest_dense_gradients():
    model, opt, method, batches = build(RIGL, density=0.2)
    for s in range(3):
        train_step(model, opt, method, batches[s], s)
    # the 4th step ends with a mask update; its dense gradient, computed independently
    batch = batches[3]
    params = method.masks.params
    loss = nn.CrossEntropyLoss()(model(batch[0]), batch[1])
    dense_grad = [g.detach().clone() for g in torch.autograd.grad(loss, params)]
    old = [m.clone() for m in method.masks.masks]
    nnz = [int(m.sum()) for m in old]
    post = {}
    _, logs = train_step(model, opt, method, batch, 3,
                         after_opt=lambda: post.update(w=[p.detach().clone() for p in params]))
    assert logs is not None
    alpha = 0.3 * (1 + math.cos(math.pi * 4 / 30)) / 2
    assert logs["rigl/drop_fraction"] == pytest.approx(alpha)
    born_any = False
    for i, p in enumerate(params):
        k = math.floor(alpha * nnz[i])  # the reference truncates
        dropped = bottom_k_mask(post["w"][i].abs(), k, old[i])
        kept = old[i] & ~dropped
        grown = top_k_mask(dense_grad[i].abs(), k, among=~kept)  # just-dropped may regrow
        assert torch.equal(method.masks.masks[i], kept | grown), method.masks.names[i]
        born = grown & ~old[i]
        born_any |= bool(born.any())
        assert torch.all(p.detach()[born] == 0)  # grown weights start at exactly 0
        assert torch.all(momentum_of(opt, p)[born] == 0)  # ... with zero momentum
        assert torch.equal(p.detach()[kept], post["w"][i][kept])  # survivors keep their values
    assert born_any


def test_rigl_drop_fraction_schedule_cosine_to_zero_at_end():
    model, opt, method, batches = build(RIGL, density=0.2)
    counts = layer_counts(method.masks.shapes, 0.2, "erk")
    seen = {}
    snapshot = None
    for s in range(40):
        _, logs = train_step(model, opt, method, batches[s % N_BATCHES], s)
        if logs:
            seen[s + 1] = logs
        if s + 1 == 30:
            snapshot = [m.clone() for m in method.masks.masks]
    assert sorted(seen) == [4, 8, 12, 16, 20, 24, 28]
    for step, logs in seen.items():
        alpha = 0.3 * (1 + math.cos(math.pi * step / 30)) / 2
        assert logs["rigl/drop_fraction"] == pytest.approx(alpha)
        assert logs["rigl/dropped"] == sum(math.floor(alpha * c) for c in counts)
    fractions = [seen[s]["rigl/drop_fraction"] for s in sorted(seen)]
    assert fractions == sorted(fractions, reverse=True)
    assert method.drop_fraction(30) == 0.0 and method.drop_fraction(35) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(snapshot, method.masks.masks))  # none after 75%


def test_rigl_inactive_gradients_and_momentum_stay_zero():
    model, opt, method, batches = build(RIGL, density=0.2)
    params = method.masks.params

    def check_grads():
        for p, m in zip(params, method.masks.masks):
            assert torch.all(p.grad[~m] == 0)

    for s in range(40):
        train_step(model, opt, method, batches[s % N_BATCHES], s, after_grads=check_grads)
        for p, m in zip(params, method.masks.masks):
            assert torch.all(momentum_of(opt, p)[~m] == 0)
            assert torch.all(p.detach()[~m] == 0)


def test_rigl_is_deterministic_and_resumes_bit_identically():
    cfg = dict(RIGL, drop_noise=1e-5)  # uses the generator, whose state must round-trip too

    def run(model, opt, method, batches, steps):
        for s in steps:
            train_step(model, opt, method, batches[s % N_BATCHES], s)

    a = build(cfg)
    run(*a, range(0, 20))
    saved = copy.deepcopy((a[0].state_dict(), a[1].state_dict(), a[2].state_dict()))
    run(*a, range(20, 40))

    b = build(cfg)
    run(*b, range(0, 40))
    for pa, pb in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(pa, pb)

    c = build(cfg, model_seed=5)  # a different model, then everything restored
    c[0].load_state_dict(saved[0])
    c[1].load_state_dict(saved[1])
    c[2].load_state_dict(saved[2])
    run(*c, range(20, 40))
    for pa, pc in zip(a[0].parameters(), c[0].parameters()):
        assert torch.equal(pa, pc)
    assert all(torch.equal(x, y) for x, y in zip(a[2].masks.masks, c[2].masks.masks))


def test_rigl_training_reduces_loss():
    model, opt, method, batches = build(RIGL, density=0.2, lr=0.2)
    losses = [train_step(model, opt, method, batches[s % N_BATCHES], s)[0] for s in range(40)]
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])


def test_rigl_global_scope_keeps_the_total_exact():
    model, opt, method, batches = build(dict(RIGL, scope="global"), density=0.2)
    total = sum(method.masks.nnz())
    for s in range(12):
        _, logs = train_step(model, opt, method, batches[s % N_BATCHES], s)
        assert sum(method.masks.nnz()) == total
        if logs:
            assert logs["mask/grown"] > 0


@pytest.mark.parametrize("key,value", [("grow_init", "random_normal"), ("scope", "network"),
                                       ("update_every", "epoch"), ("drop_fraction", 1.5),
                                       ("decay", "cubic")])
def test_rigl_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}="):
        build(dict(RIGL, **{key: value}), setup=False)


# --------------------------------------------------------------------------- Top-KAST


def manual_forward(model: nn.Module, names, weights, x):
    """The model's output with the prunable weights replaced by `weights`."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for n, w in zip(names, weights):
            params[n].copy_(w)
    return twin(x)


def test_topkast_forward_uses_exactly_the_top_k_of_theta():
    model, opt, method, batches = build(TOPKAST, density=0.2, setup=False)
    init = [p.detach().clone() for p in method.masks.params]
    method.setup()
    names, shapes = method.masks.names, method.masks.shapes
    k_fwd = layer_counts(shapes, 0.2, "uniform")
    k_bwd = [min(n, 2 * k) for n, k in zip(method.masks.numels, k_fwd)]  # default: twice the forward set
    x = batches[0][0]

    def check(theta):
        fwd = [top_k_mask(t.abs(), k) for t, k in zip(theta, k_fwd)]
        bwd = [top_k_mask(t.abs(), k) for t, k in zip(theta, k_bwd)]
        assert all(torch.equal(a, b) for a, b in zip(fwd, method.masks.masks))
        assert all(torch.equal(a, b) for a, b in zip(bwd, method.backward))
        method.before_forward(0)
        with torch.no_grad():
            assert torch.equal(model(x), manual_forward(model, names, [t * m for t, m in zip(theta, fwd)], x))

    check(init)
    updates = 0
    for s in range(20):
        _, logs = train_step(model, opt, method, batches[s % N_BATCHES], s)
        for p, t, m in zip(method.masks.params, method.theta, method.masks.masks):
            assert torch.equal(p.detach(), t * m)  # between steps the model is theta * A
        if logs:
            updates += 1
            check([t.clone() for t in method.theta])
    assert updates == 5


def test_topkast_weights_outside_backward_set_never_change():
    # no weight decay: B \ A can only move through its gradient (not its decay)
    model, opt, method, batches = build(TOPKAST, density=0.2, weight_decay=0.0)
    changed_b_minus_a = 0
    s = 0
    for _interval in range(4):  # update_every = 4: each interval uses one (A, B)
        theta0 = [t.clone() for t in method.theta]
        fwd = [m.clone() for m in method.masks.masks]
        bwd = [b.clone() for b in method.backward]
        for _ in range(4):
            train_step(model, opt, method, batches[s % N_BATCHES], s)
            s += 1
            for t, t0, b in zip(method.theta, theta0, bwd):
                assert torch.equal(t[~b], t0[~b])
            for p, b in zip(method.masks.params, bwd):
                assert torch.all(momentum_of(opt, p)[~b] == 0)
        for t, t0, a, b in zip(method.theta, theta0, fwd, bwd):
            only_b = b & ~a
            changed_b_minus_a += int((t[only_b] != t0[only_b]).sum())
    assert changed_b_minus_a > 0  # B \ A is trained even though it is not in the forward pass


def test_topkast_step_applies_the_forward_gradient_to_the_whole_backward_set():
    lr = 0.1
    model, opt, method, batches = build(TOPKAST, density=0.2, lr=lr, momentum=0.0, weight_decay=0.0)
    theta0 = [t.clone() for t in method.theta]
    fwd = [m.clone() for m in method.masks.masks]
    bwd = [b.clone() for b in method.backward]
    x, y = batches[0]
    # independent: the gradient with respect to alpha = theta * A, in a twin model
    twin = copy.deepcopy(model)
    named = dict(twin.named_parameters())
    with torch.no_grad():
        for n, t, a in zip(method.masks.names, theta0, fwd):
            named[n].copy_(t * a)
    loss = nn.CrossEntropyLoss()(twin(x), y)
    grads = torch.autograd.grad(loss, [named[n] for n in method.masks.names])
    train_step(model, opt, method, (x, y), 0)
    for t, t0, g, b in zip(method.theta, theta0, grads, bwd):
        expected = torch.where(b, t0 - lr * g, t0)
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-7)
        assert bool((t[b] != t0[b]).any())


def test_topkast_forward_density_is_exact():
    model, opt, method, batches = build(TOPKAST, density=0.1)
    n = sum(method.masks.numels)
    assert method.masks.nnz() == layer_counts(method.masks.shapes, 0.1, "uniform")
    for s in range(12):
        train_step(model, opt, method, batches[s % N_BATCHES], s)
        assert sum(method.masks.nnz()) == round(0.1 * n)
        assert method.density_logs()["density/achieved"] == round(0.1 * n) / n
        assert sum(int((p != 0).sum()) for p in method.masks.params) <= round(0.1 * n)
        # the backward set: twice the forward set in every layer
        assert [int(b.sum()) for b in method.backward] == [
            min(numel, 2 * k) for numel, k in zip(method.masks.numels, method.k_forward)]


def test_topkast_theta_round_trips_in_state_dict():
    def run(model, opt, method, batches, steps):
        for s in steps:
            train_step(model, opt, method, batches[s % N_BATCHES], s)

    a = build(TOPKAST, density=0.2)
    run(*a, range(0, 10))  # mid-interval: B \ A holds trained values that only theta knows
    saved = copy.deepcopy((a[0].state_dict(), a[1].state_dict(), a[2].state_dict()))
    assert "theta" in saved[2] and len(saved[2]["theta"]) == len(a[2].theta)
    run(*a, range(10, 30))

    c = build(TOPKAST, density=0.2, model_seed=5)
    c[0].load_state_dict(saved[0])
    c[1].load_state_dict(saved[1])
    c[2].load_state_dict(saved[2])
    assert all(torch.equal(x, y) for x, y in zip(saved[2]["theta"], c[2].theta))
    for p, t, m in zip(c[2].masks.params, c[2].theta, c[2].masks.masks):
        assert torch.equal(p.detach(), t * m)
    run(*c, range(10, 30))
    for pa, pc in zip(a[0].parameters(), c[0].parameters()):
        assert torch.equal(pa, pc)
    assert all(torch.equal(x, y) for x, y in zip(a[2].theta, c[2].theta))


def test_topkast_training_reduces_loss():
    model, opt, method, batches = build(TOPKAST, density=0.2, lr=0.2)
    losses = [train_step(model, opt, method, batches[s % N_BATCHES], s)[0] for s in range(40)]
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])


def test_topkast_exploration_penalty_scales_b_minus_a_by_one_over_d():
    lam, lr, d = 0.5, 0.1, 0.2
    model, opt, method, batches = build(dict(TOPKAST, exploration_l2=lam), density=d, lr=lr,
                                        momentum=0.0, weight_decay=0.0)
    theta0 = [t.clone() for t in method.theta]
    fwd = [m.clone() for m in method.masks.masks]
    bwd = [b.clone() for b in method.backward]
    zero_loss = lambda out, y: (out * 0).sum()  # noqa: E731 - only the penalty acts
    train_step(model, opt, method, batches[0], 0, loss_fn=zero_loss)
    for t, t0, a, b in zip(method.theta, theta0, fwd, bwd):
        torch.testing.assert_close(t[a], t0[a] * (1 - lr * lam))
        torch.testing.assert_close(t[b & ~a], t0[b & ~a] * (1 - lr * lam / d))
        assert torch.equal(t[~b], t0[~b])


@pytest.mark.parametrize("key,value", [("backward_density", 0.1), ("forward_density", 1.5),
                                       ("update_every", 0), ("exploration_l2", -1.0)])
def test_topkast_bad_options_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"method.{key}="):
        build(dict(TOPKAST, **{key: value}), density=0.2, setup=False)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", ["rigl", "topkast"])
def test_cli_run_hits_the_target_density(method, tmp_path):
    runs = tmp_path / "runs"
    proc = cli_here([f"method={method}", "dataset=digits", "model=mlp", "logger=none", "schedule=constant",
                "schedule.epochs=2", "density=0.2", f"paths.runs={runs}", "progress=false", "device=cpu"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = runs.glob("*/results.json")
    results = json.loads(results_file.read_text())
    n = results["prunable"]["total"]
    assert results["density"]["target"] == 0.2
    assert results["density"]["achieved"] == round(0.2 * n) / n  # exact to the weight


def test_cli_multirun_of_three_methods(tmp_path):
    runs = tmp_path / "runs"
    proc = cli_here(["-m", "method=static,rigl,topkast", "dataset=digits", "model=mlp", "logger=none",
                "schedule=constant", "schedule.epochs=1", "limit_train_batches=3", f"paths.runs={runs}",
                "sweep_name=t", "progress=false", "device=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(runs.glob("multirun/t/*/results.json"))
    assert len(found) == 3
    assert sorted(json.loads(f.read_text())["config"]["method"]["name"] for f in found) == \
        ["rigl", "static", "topkast"]
