"""SNIP / GraSP / SynFlow: scores against direct autograd (or closed-form) computation, exact
masks, untouched model state, static training, and one CLI run per method."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from sparse_bench.confdir import conf_dir
from sparse_bench.errors import ConfigError
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.sparsity.saliency import SynFlowScorer, grasp_scores, snip_scores
from sparse_bench.train.trainer import hooked_step

from conftest import cli_here

CONF = conf_dir() / "method"
METHODS = ["snip", "grasp", "synflow"]


def data(n_batches=2, batch=16, features=6, classes=4, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def mlp(seed=0, bn=False, dropout=0.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 10)]
    if bn:
        layers.append(nn.BatchNorm1d(10))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)]
    return nn.Sequential(*layers)


def build(name, model, density=0.3, data_batches=None, **over):
    batches = data_batches if data_batches is not None else data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), OmegaConf.create(over))
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=2, steps_per_epoch=5,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                        batches=lambda n, key=0: batches[:n], loss_fn=nn.CrossEntropyLoss())
    return build_method(cfg, ctx), opt


def weights(model):
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def assert_top(masks, scores):
    """Every kept weight scores at least as high as every pruned one (global ranking)."""
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    pruned = torch.cat([s[~m] for s, m in zip(scores, masks)])
    assert kept.min() >= pruned.max()


# --- scores against direct computation ----------------------------------------------------------
def test_snip_scores_are_abs_grad_times_weight():
    model, batches = mlp(), data(n_batches=2)
    ws = weights(model)
    loss = sum(F.cross_entropy(model(x), y) for x, y in batches) / len(batches)
    grads = torch.autograd.grad(loss, ws)
    expected = [(g * w).abs().detach() for g, w in zip(grads, ws)]
    names = ["0.weight", "3.weight", "5.weight"]
    got = snip_scores(model, names, batches, nn.CrossEntropyLoss())
    for e, s in zip(expected, got):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-8)

    method, _ = build("snip", mlp(), density=0.3, data_batches=batches, batches=2)
    method.setup()
    assert sum(method.masks.nnz()) == round(0.3 * sum(method.masks.numels))
    assert_top(method.masks.masks, expected)


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_scores_are_minus_weight_times_hessian_gradient(temperature):
    model, batches = mlp(), data(n_batches=2)
    names = ["0.weight", "3.weight", "5.weight"]
    ws = tuple(p.detach().clone() for p in weights(model))
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in names}

    def loss_of(*w):
        params = {**fixed, **dict(zip(names, w))}
        return sum(F.cross_entropy(torch.func.functional_call(model, params, (x,)) / temperature, y)
                   for x, y in batches) / len(batches)

    g = torch.autograd.grad(loss_of(*[w.requires_grad_() for w in ws]), ws)
    _, hg = torch.autograd.functional.hvp(loss_of, tuple(w.detach() for w in ws), v=tuple(g))
    expected = [-(w.detach() * h) for w, h in zip(ws, hg)]
    got = grasp_scores(model, names, batches, nn.CrossEntropyLoss(), temperature)
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0
    for e, s in zip(expected, got):
        torch.testing.assert_close(s, e, rtol=1e-4, atol=1e-5 * scale)

    # GraSP removes the weights of LARGEST S = -w Hg: the kept ones are those of smallest S
    method, _ = build("grasp", mlp(), density=0.3, data_batches=batches, batches=2, temperature=temperature)
    method.setup()
    assert sum(method.masks.nnz()) == round(0.3 * sum(method.masks.numels))
    assert_top(method.masks.masks, [-e for e in expected])


def synflow_closed_form(w1, b1, w2, masks):
    """SynFlow scores of x -> W2 relu(W1 x + b1) (+ b2) at an all-ones input, linearised.

    R = 1^T |W2| (|W1| 1 + |b1|) + sum|b2|, so dR/dW1_ij = sum_k |W2_ki| and
    dR/dW2_ki = sum_j |W1_ij| + |b1_i|.
    """
    a1, a2 = w1.abs() * masks[0], w2.abs() * masks[1]
    s1 = a2.sum(0)[:, None] * a1
    s2 = a2 * (a1.sum(1) + b1.abs())[None, :]
    return [s1, s2]


def two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


def test_synflow_scores_match_the_closed_form():
    model = two_layer()
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    assert (w1 < 0).any() and (b1 < 0).any()  # the linearisation matters
    ones = [torch.ones_like(w1, dtype=torch.bool), torch.ones_like(w2, dtype=torch.bool)]
    scorer = SynFlowScorer(model, ["0.weight", "2.weight"], (6,), torch.device("cpu"))
    for e, s in zip(synflow_closed_form(w1, b1, w2, ones), scorer(ones)):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)
    half = [torch.rand(w1.shape) < 0.5, torch.rand(w2.shape) < 0.5]
    for e, s in zip(synflow_closed_form(w1, b1, w2, half), scorer(half)):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-6)
    assert torch.equal(model[0].weight, w1) and (model[0].weight < 0).any()  # signs restored


def test_synflow_iterative_pruning_follows_the_exponential_schedule():
    density, n = 0.3, 5
    model = two_layer(seed=3)
    w1, b1, w2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight))
    total = w1.numel() + w2.numel()
    masks = [torch.ones_like(w1, dtype=torch.bool), torch.ones_like(w2, dtype=torch.bool)]
    for k in range(1, n + 1):
        scores = synflow_closed_form(w1, b1, w2, masks)
        flat = torch.cat([torch.where(m, s, torch.tensor(-1.0)).flatten() for s, m in zip(scores, masks)])
        keep = round(density ** (k / n) * total)
        ranked = flat.sort(descending=True).values
        assert ranked[keep - 1] > ranked[keep], "tie at the cut: pick another seed"
        new = flat >= ranked[keep - 1]
        masks = [m.view_as(w) for m, w in zip(torch.split(new, [w1.numel(), w2.numel()]), (w1, w2))]
    # data-free: the batch gives its shape only
    batches = [(torch.full((16, 6), float("nan")), torch.zeros(16, dtype=torch.long))]
    method, _ = build("synflow", model, density=density, data_batches=batches, iterations=n)
    method.setup()
    assert sum(method.masks.nnz()) == round(density * total)
    for got, want in zip(method.masks.masks, masks):
        assert torch.equal(got, want)
    assert torch.equal(model[0].weight, w1 * masks[0]) and torch.equal(model[2].weight, w2 * masks[1])


# --- masks, weights and model state -------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("name", METHODS)
def test_exact_density_init_values_and_untouched_state(name, scope):
    model = mlp(bn=True, dropout=0.3)
    model.train()
    # give BN non-trivial running statistics, so a train-mode forward would move them
    with torch.no_grad():
        model(torch.randn(32, 6) * 3 + 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method, opt = build(name, model, density=0.17, scope=scope)
    rng = torch.get_rng_state()
    logs = method.setup()
    total = sum(method.masks.numels)
    assert sum(method.masks.nnz()) == round(0.17 * total)
    assert logs["mask/pruned"] == total - round(0.17 * total)
    if scope == "layer":
        for k, n in zip(method.masks.nnz(), method.masks.numels):
            assert abs(k - 0.17 * n) <= 1
    assert torch.equal(torch.get_rng_state(), rng), "scoring must not advance the global RNG"
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 0
    prunable = dict(zip(method.masks.names, method.masks.masks))
    for k, v in model.state_dict().items():
        if k in prunable:
            m = prunable[k]
            assert torch.equal(v[m], before[k][m]), f"{k}: kept weights keep their init values"
            assert torch.all(v[~m] == 0)
        else:
            assert torch.equal(v, before[k]), f"{k} (bias / BN parameter or statistic) must be untouched"


@pytest.mark.parametrize("name", METHODS)
def test_masks_stay_fixed_during_training(name):
    model = mlp()
    method, opt = build(name, model, density=0.25)
    method.setup()
    masks = [m.clone() for m in method.masks.masks]
    x, y = data(n_batches=1)[0]
    for step in range(12):
        hooked_step(method, opt, step, lambda: F.cross_entropy(model(x), y))
        assert method.on_step_end(step + 1) is None
        if (step + 1) % 5 == 0:
            assert method.on_epoch_end((step + 1) // 5, step + 1) is None
    for m, p, old in zip(method.masks.masks, method.masks.params, masks):
        assert torch.equal(m, old)
        assert torch.all(p[~m] == 0)
        assert torch.any(p[m] != 0)


@pytest.mark.parametrize("name,over,key", [
    ("snip", {"batches": 0}, "method.batches"),
    ("grasp", {"temperature": 0}, "method.temperature"),
    ("synflow", {"iterations": -1}, "method.iterations"),
    ("synflow", {"schedule": "cubic"}, "method.schedule"),
    ("snip", {"scope": "row"}, "method.scope"),
])
def test_bad_options_fail_with_one_line_naming_the_key(name, over, key):
    with pytest.raises(ConfigError, match=key):
        build(name, mlp(), **over)


def test_synflow_linear_schedule_and_float64():
    method, _ = build("synflow", mlp(), density=0.1, iterations=4, schedule="linear", precision="float64")
    assert [method.round_density(k) for k in range(1, 5)] == pytest.approx([0.775, 0.55, 0.325, 0.1])
    method.setup()
    assert sum(method.masks.nnz()) == round(0.1 * sum(method.masks.numels))


# --- the CLI ------------------------------------------------------------------------------------
def test_cli_run_per_method_hits_the_density(tmp_path):
    args = ["-m", f"method={','.join(METHODS)}", "dataset=digits", "model=mlp", "logger=none",
            "schedule=constant", "schedule.epochs=2", "density=0.2", f"paths.runs={tmp_path}",
            "sweep_name=pai", "progress=false", "eval.train_samples=0"]
    proc = cli_here(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = {p.name: p for p in (tmp_path / "multirun" / "pai").iterdir() if p.is_dir()}
    for name in METHODS:
        res = json.loads((folders[f"digits-mlp-{name}-d0.2-s0"] / "results.json").read_text())
        total = res["prunable"]["total"]
        assert res["status"] == "complete" and res["epochs"] == 2
        assert res["density"]["achieved"] == round(0.2 * total) / total
        assert res["final"]["test/acc"] > 0.3
