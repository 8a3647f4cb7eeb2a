"""Structured sparsity (``structure=nm|fan_in|block``, ``method=srigl``): the structure holds exactly
after the initial masks and after every update of every method that keeps one, each layer keeps
its count, grown weights start at 0, and unstructured runs are bit-identical to before."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sparse_bench.confdir import conf_dir
from sparse_bench.errors import ConfigError
from sparse_bench.run import run
from sparse_bench.schema import IMPLEMENTATIONS
from sparse_bench.sparsity.methods import MethodContext, build_method
from sparse_bench.sparsity.structure import Structure
from sparse_bench.train.trainer import hooked_step

from conftest import Crash, compose, killed_after, read_jsonl

KEEPERS = sorted(n for n, impl in IMPLEMENTATIONS["method"].items() if getattr(impl, "keeps_structure", False))


class Net(nn.Module):
    """A conv layer (8 input channels: groups of 4 along them) and two linear layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.stem(x)).flatten(1))))


def _method(name: str, structure: Structure, density: float, model: nn.Module, **over):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = OmegaConf.load(conf_dir() / "method" / f"{name}.yaml")
    for k, v in {"update_every": 2, "end": {"unit": "fraction", "value": 1.0}, **over}.items():
        if k in cfg:
            cfg[k] = v
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 8, 4, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
    ctx = MethodContext(model=model, optimizer=opt, density=density, epochs=1, steps_per_epoch=20,
                        device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                        loss_fn=nn.CrossEntropyLoss(), batches=lambda n, key=0: [(x, y)] * n, structure=structure)
    return build_method(cfg, ctx), opt, x, y


def _train(method, opt, model, x, y, steps: int, each_update):
    for step in range(steps):
        hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
        old = [m.clone() for m in method.masks.masks]
        before = [p.detach().clone() for p in method.masks.params]
        if method.on_step_end(step + 1):
            each_update(old, before)


DROP_AND_GROW = ["dsr", "gse", "rigl", "set", "sparse_momentum", "static"]
PRUNING = ["acdc", "gmp", "grasp", "lottery", "snip", "synflow"]


def test_the_methods_that_keep_a_structure():
    assert KEEPERS == sorted(DROP_AND_GROW + PRUNING + ["deepr", "srigl", "topkast"])


BLOCKS = [Structure("block", block=(4, 4)), Structure("block", block=(1, 8))]


@pytest.mark.parametrize("name", DROP_AND_GROW)
@pytest.mark.parametrize("structure", [Structure("nm", 2, 4), Structure("nm", 1, 4), Structure("fan_in"), *BLOCKS])
def test_structure_holds_after_init_and_every_update(name, structure):
    torch.manual_seed(0)
    model = Net()
    density = structure.n / structure.m if structure.kind == "nm" else 0.2
    method, opt, x, y = _method(name, structure, density, model)
    method.setup()
    ms = method.masks
    assert ms.structure_violations() == {}
    counts = [int(m.sum()) for m in ms.masks]
    if structure.kind == "nm":  # every group exactly n: density n/m in every layer
        assert counts == [int(n * structure.n / structure.m) for n in ms.numels]
        conv = ms.masks[0]  # groups run along input channels at one kernel position
        assert bool((conv.reshape(16, 2, 4, 3, 3).sum(2) == structure.n).all())
    elif structure.kind == "block":  # whole blocks: a conv's along (out, in channels) at each kernel position
        rows, cols = structure.block
        conv = ms.masks[0].permute(2, 3, 0, 1).reshape(3, 3, 16 // rows, rows, 8 // cols, cols)
        per_block = conv.sum((3, 5))
        assert bool(((per_block == 0) | (per_block == rows * cols)).all())
        assert all(c % (rows * cols) == 0 and c > 0 for c in counts)
        assert sum(counts) == pytest.approx(0.2 * sum(ms.numels), rel=0.15)
    else:
        for m in ms.masks:
            per_unit = m.reshape(m.shape[0], -1).sum(1)
            assert bool((per_unit == per_unit[0]).all()) and int(per_unit[0]) >= 1
    updates = []

    def check(old, before):
        assert ms.structure_violations() == {}
        assert [int(m.sum()) for m in ms.masks] == counts  # each layer keeps its count
        for p, o, n in zip(ms.params, old, ms.masks):
            new = n & ~o
            assert bool((p.detach()[new] == 0).all())  # grown weights start at 0
            assert bool((p.detach()[~n] == 0).all())
        updates.append(sum(int((n & ~o).sum()) for o, n in zip(old, ms.masks)))

    _train(method, opt, model, x, y, 9, check)
    if name != "static":
        assert len(updates) == 4 and sum(updates) > 0  # the masks did change, within the structure



def test_block_drops_rank_blocks_by_the_scores_the_drop_used():
    """Under blocks the drop's scores are made once per update: RigL's drop noise is drawn once,
    and the blocks are ranked by the same noisy scores the drop chose from."""
    torch.manual_seed(0)
    model = Net()
    method, opt, x, y = _method("rigl", BLOCKS[0], 0.2, model, drop_noise=1e-3)
    method.setup()
    made = []
    real = type(method).drop_scores
    method.drop_scores = lambda u: made.append(u.step) or real(method, u)
    _train(method, opt, model, x, y, 5, lambda old, before: None)
    assert made and len(made) == len(set(made))  # one set of scores per update

@pytest.mark.parametrize("structure", [Structure("nm", 2, 4), Structure("fan_in"), BLOCKS[0]])
def test_topkast_chooses_both_sets_within_the_structure(structure):
    """Top-KAST's forward set A (the masks) keeps the structure after every re-selection, its
    backward set B contains A and is structured too (a fan-in per unit, whole blocks)."""
    torch.manual_seed(0)
    model = Net()
    density = 0.5 if structure.kind == "nm" else 0.2
    method, opt, x, y = _method("topkast", structure, density, model, update_every=2)
    method.setup()
    ms, seen = method.masks, []
    for step in range(8):
        hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
        method.on_step_end(step + 1)
        assert ms.structure_violations() == {}
        for a, b in zip(ms.masks, method.backward):
            assert bool((b | ~a).all()) and int(b.sum()) > int(a.sum())
            if structure.kind != "nm":  # (under 2:4 B is every weight: twice n/m)
                assert structure.violations(b) == 0
        seen.append([m.clone() for m in ms.masks])
    assert any(not torch.equal(p, q) for p, q in zip(seen[0], seen[-1]))  # the sets did move


@pytest.mark.parametrize("structure", [Structure("nm", 2, 4), Structure("fan_in")])
def test_deepr_regrows_its_dead_within_their_groups(structure):
    """DeepR rewires after every step; under a structure every N:M group / unit regrows what died
    in it: the structure and each layer's count hold after every step, new connections at 0."""
    torch.manual_seed(0)
    model = Net()
    density = 0.5 if structure.kind == "nm" else 0.2
    method, opt, x, y = _method("deepr", structure, density, model, temperature=1e-3)
    method.setup()
    ms = method.masks
    counts = [int(m.sum()) for m in ms.masks]
    for step in range(6):
        old = [m.clone() for m in ms.masks]
        hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
        method.on_step_end(step + 1)
        assert ms.structure_violations() == {}
        assert [int(m.sum()) for m in ms.masks] == counts
        for p, o, n in zip(ms.params, old, ms.masks):
            assert bool((p.detach()[n & ~o] == 0).all())
    assert int(sum(method.rewired)) > 0  # connections did die and were regrown


def _uniform_groups(structure: Structure, mask: torch.Tensor) -> bool:
    per = structure.groups(mask).sum(1)
    return bool((per == per[0]).all())


@pytest.mark.parametrize("name", PRUNING)
@pytest.mark.parametrize("structure", [Structure("nm", 2, 4), Structure("fan_in"), BLOCKS[0]])
def test_pruning_methods_keep_the_structure_at_every_mask_they_choose(name, structure):
    """Every mask a pruning method chooses has the same count in every group (a dense phase is
    dense; blocks whole), and the last one is the structure itself: n per N:M group, one fan-in
    per unit, whole blocks."""
    torch.manual_seed(0)
    model = Net()
    density = 0.5 if structure.kind == "nm" else 0.2
    over = {"iterations": 3, "n_rounds": 2, "frequency": {"unit": "step", "value": 2},
            "phase_length": {"unit": "step", "value": 4}}
    method, opt, x, y = _method(name, structure, density, model, **over)
    method.setup()
    ms, spe = method.masks, method.ctx.steps_per_epoch
    seen = []

    def look():
        if not seen or any(not torch.equal(a, b) for a, b in zip(seen[-1], ms.masks)):
            seen.append([m.clone() for m in ms.masks])
            for m in ms.masks:
                if structure.kind == "block":
                    assert structure.violations(m) == 0
                else:
                    assert bool(m.all()) or _uniform_groups(structure, m)

    look()
    for step in range(method.rounds * method.ctx.total_steps):
        hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
        method.on_step_end(step + 1)
        look()
        if (step + 1) % spe == 0:
            method.on_epoch_end((step + 1) // spe, step + 1)
            look()
    assert ms.structure_violations() == {}
    if structure.kind != "block":  # (a layer the method keeps whole is a valid block mask)
        assert not any(bool(m.all()) for m in ms.masks)
    assert sum(int(m.sum()) for m in ms.masks) == pytest.approx(density * sum(ms.numels), rel=0.1)


def test_srigl_keeps_a_constant_fan_in_ablates_units_and_follows_its_reference_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    method, opt, _, _ = _method("srigl", Structure("fan_in"), 0.1, model, update_every=3)
    method.setup()
    ms = method.masks
    targets = method.targets
    # initial fan-in: floor(target / units) per unit (the reference's random_sparsify)
    assert [int(m.sum(1)[0]) for m in ms.masks] == [t // m.shape[0] for t, m in zip(targets, ms.masks)]
    seen_ablated = []
    for step in range(15):
        hooked_step(method, opt, step, lambda: nn.functional.cross_entropy(model(x), y))
        old = [m.clone() for m in ms.masks]
        logs = method.on_step_end(step + 1)
        if not logs:
            continue
        ablated = method.last_update["ablated"]
        seen_ablated.append(ablated[0])
        assert ablated[-1] == 0  # the output layer is never ablated
        for i, m in enumerate(ms.masks):
            per_unit = m.sum(1)
            live = per_unit[per_unit > 0]
            assert int((per_unit == 0).sum()) == ablated[i]
            assert bool((live == live[0]).all())  # one fan-in for every live unit
            assert int(live[0]) == targets[i] // (m.shape[0] - ablated[i])  # T // (units - ablated)
            assert bool((model[2 * i].weight.detach()[m & ~old[i]] == 0).all())
    assert len(seen_ablated) == 5 and max(seen_ablated) > 0  # at 10% the hidden layer loses units


def test_structured_regrowth_takes_each_groups_deficit_by_largest_score():
    s = Structure("nm", 2, 4)
    old = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    after = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # group 1 lost 1, group 2 lost 2
    scores = torch.tensor([[0.0, 5.0, 3.0, 4.0, 9.0, 1.0, 8.0, 7.0]])
    grown = s.regrow(scores, old, after, blocked=old)  # not where it just dropped, while there is room
    assert grown.tolist() == [[False, False, False, True, True, False, False, True]]
    grown = s.regrow(scores, old, after, blocked=after)  # just-dropped positions allowed
    assert grown.tolist() == [[False, True, False, False, True, False, True, False]]


def test_block_selections_take_whole_blocks_by_their_mean_score():
    """A 2x8 weight in 1x2 blocks (8 blocks): drops take the active blocks of smallest mean drop
    score, as many as the method's drop took weights (rounded to blocks), regrowth the free
    blocks of largest mean score, pruning keeps the largest means among the active blocks."""
    s = Structure("block", block=(1, 2))
    old = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    w = torch.tensor([[5.0, 5.0, 1.0, 0.5, 0, 0, 0, 0], [0.2, 9.0, 0, 0, 3.0, 3.0, 0, 0]])
    method_drop = torch.zeros_like(old)
    method_drop[0, 3] = method_drop[1, 0] = method_drop[0, 2] = True  # three weights: 2 blocks (round(1.5))
    dropped = s.whole_drops(method_drop, old, w.abs())
    # block means: (0,0) 5, (0,1) 0.75, (1,0) 4.6, (1,2) 3 -> the two smallest: (0,1) and (1,2)
    assert dropped.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]]
    after = old & ~dropped
    grow = torch.tensor([[0, 0, 9.0, 9.0, 1.0, 2.0, 0, 0], [0, 0, 4.0, 4.0, 9.0, 9.0, 3.0, 0.5]])
    grown = s.regrow(grow, old, after, blocked=old)  # free blocks: (0,2) 1.5, (0,3) 0, (1,1) 4, (1,3) 1.75
    assert grown.tolist() == [[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]]
    kept = s.keep([w.abs()], [old], [torch.ones(3, dtype=torch.bool)], 0.0)[0]  # 3 weights: 2 blocks
    assert kept.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert s.violations(kept) == 0 and s.violations(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0]] * 2).bool()) == 2


def test_unstructured_masks_are_bit_identical_to_before_structures():
    """Digests of the masks after each of 10 steps (updates every 2 steps where a method has a
    cadence), taken with the code before the structure group existed (and before the
    channels_last-safe mask writes): unstructured runs choose exactly the same masks."""
    expected = {"static": "737f02b85a693112", "set": "7ce45769d3b7c89c", "rigl": "9e5c95700d327ac9",
                "sparse_momentum": "b08854dcefe38c90", "dsr": "dad24c19622beecc", "gse": "530610f9c3f42724",
                "deepr": "c4e83cc607139184", "gmp": "b6745517958ddb6e", "acdc": "2e3babfd3000554a",
                "snip": "7cf1c79ffb43c2d2", "synflow": "3ac9df799ee3589d", "lottery": "97ed17cd3058ec22",
                "grasp": "fc9e1d9e1fae4a4b", "topkast": "c64218aa3159bc82"}
    got = {}
    for name in expected:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cfg = OmegaConf.load(conf_dir() / "method" / f"{name}.yaml")
        for k, v in (("update_every", 2), ("end", {"unit": "fraction", "value": 1.0})):
            if k in cfg:
                cfg[k] = v
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
        method = build_method(cfg, MethodContext(
            model=model, optimizer=opt, density=0.3, epochs=1, steps_per_epoch=12, device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(1), loss_fn=nn.CrossEntropyLoss(),
            batches=lambda n, key=0, x=x, y=y: [(x, y)] * n))
        method.setup()
        h = hashlib.sha256()
        for step in range(10):
            hooked_step(method, opt, step, lambda model=model, x=x, y=y: nn.functional.cross_entropy(model(x), y))
            method.on_step_end(step + 1)
            for t in method.masks.masks:
                h.update(t.cpu().numpy().tobytes())
        got[name] = h.hexdigest()[:16]
    assert got == expected


BASE = ["dataset=digits", "model=mlp", "model.hidden=[32]", "schedule=constant", "schedule.epochs=1",
        "limit_train_batches=6", "eval.train_samples=0", "logger=none", "progress=false", "device=cpu"]


@pytest.mark.parametrize("overrides, message", [
    (["method=rigl", "structure=nm", "density=0.1"], "density=0.1 contradicts structure=nm"),
    (["method=srigl", "density=0.1"], "pass structure=fan_in"),
    (["method=rigl", "structure=nm", "structure.n=4", "density=1.0"], "structure.n=4 must be below structure.m=4"),
    (["method=rigl", "structure=block", "structure.shape=[4]", "density=0.1"],
     r"structure.shape=\[4\] must be two whole numbers"),
    (["method=rigl", "structure=block", "density=0.1"],  # the 10-class output layer: 10 rows
     r"net.2.weight has 10 outputs and 32 inputs, not multiples of structure.shape=\[4, 4\].*prunable.exclude"),
    (["method=deepr", "structure=block", "density=0.1", "structure.shape=[1,2]"],
     "structure=block: method=deepr's connections die one at a time"),
])
def test_bad_structure_input_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(compose(BASE + [f"paths.runs={tmp_path}", *overrides]))


def test_nm_conv_with_input_channels_not_divisible_is_one_line():
    s = Structure("nm", 2, 4)
    with pytest.raises(ConfigError, match=r"stem.weight has 3 input channels, not a multiple of m=4.*prunable.exclude"):
        s.check(["stem.weight"], [(16, 3, 3, 3)], 0.5)


@pytest.mark.parametrize("structure, tag", [(["structure=nm", "density=0.5"], "2of4"),
                                            (["structure=fan_in", "density=0.2"], "fan_in"),
                                            (["structure=block", "density=0.2", "structure.shape=[1,4]"], "block1x4")])
def test_a_structured_run_trains_names_its_structure_and_keeps_it(tmp_path, structure, tag):
    cfg = compose(BASE + [f"paths.runs={tmp_path}", "method=rigl", "method.update_every=2", *structure])
    assert tag in cfg.run_name
    run(cfg)
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    density = float(structure[1].split("=")[1])
    assert results["density"]["achieved"] == pytest.approx(density, abs=0.02)
    if tag == "2of4":  # FLOPs follow the structure: a 2:4 layer counts half its dense FLOPs
        assert results["flops"]["test_multiple"] == pytest.approx(0.5, abs=1e-3)
    records = read_jsonl(next(tmp_path.rglob("metrics.jsonl")))
    assert any(r.get("mask/grown", 0) > 0 for r in records)


def test_two_four_linear_gradients_match_the_masked_product(monkeypatch):
    """The 2:4 layer's autograd function on the CPU, with the semi-structured compression (CUDA
    only) replaced by the dense cast it stands for: output, input, weight and bias gradients as
    the masked dense product's, nothing reaching inactive weights."""
    from sparse_bench.sparsity.execution import semistructured

    monkeypatch.setattr(semistructured, "compress", lambda w, dtype: w.to(dtype))
    torch.manual_seed(0)
    mask = Structure("nm", 2, 4).random_masks([(64, 128)], [0], torch.Generator().manual_seed(0))[0]
    w = (torch.randn(64, 128) * mask).requires_grad_(True)
    b = torch.randn(64, requires_grad=True)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    w2, b2, x2 = (t.detach().clone().requires_grad_(True) for t in (w, b, x))
    out = semistructured.two_four_linear(x, w, mask.float(), b)
    ref = nn.functional.linear(x2, (w2 * mask).bfloat16(), b2.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=0.25)  # bias added after the bf16 product
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-2, atol=5e-2)
    assert not bool(w.grad[~mask].any())


@pytest.mark.parametrize("structure", [["structure=nm", "density=0.5"], ["structure=block", "structure.shape=[2,4]",
                                                                        "density=0.2"]])
def test_structured_gse_trains_the_same_sparse_as_masked(tmp_path, structure):
    """GSE under a structure on sparse layers (its updates through dense views) takes the same
    updates as on masked ones: the same losses, and its updates grow."""
    runs = {}
    for execution in ("masked", "sparse"):
        cfg = compose(BASE + [f"paths.runs={tmp_path / execution}", "method=gse", "method.update_every=2",
                              "method.end={unit:fraction,value:1.0}", "model.hidden=[32]", f"execution={execution}",
                              *structure])
        run(cfg)
        runs[execution] = read_jsonl(tmp_path / execution / cfg.run_name / "metrics.jsonl")
    assert any(r.get("mask/grown", 0) > 0 for r in runs["masked"])
    for a, b in zip(runs["masked"], runs["sparse"]):
        for k in ("train/loss", "test/loss", "mask/grown"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_execution_sparse_runs_two_four_layers_on_semi_structured_products(tmp_path, monkeypatch):
    """execution=sparse under a 2:4 structure where the semi-structured product is available (a
    CUDA GPU of sm >= 80; here on the CPU, with the compression replaced by the dense cast it
    stands for): the Linear layers whose shape the 2:4 tensors take stay masked layers with that
    forward product (plan entry "2:4"), the others become CSR layers; training matches
    execution=masked, and a resumed run rebuilds the same layers and ends bit-identical."""
    from sparse_bench.sparsity.execution import engine, semistructured

    compressed = []
    monkeypatch.setattr(semistructured, "available", lambda device=None: True)
    monkeypatch.setattr(semistructured, "compress", lambda w, dtype: compressed.append(w.shape) or w.to(dtype))
    over = [*BASE, "schedule.epochs=2", "method=rigl", "method.update_every=2", "structure=nm", "density=0.5",
            "precision=bf16"]
    runs = {}
    for name, execution in (("masked", "masked"), ("sparse", "sparse"), ("resumed", "sparse")):
        cfg = compose([*over, f"execution={execution}", f"paths.runs={tmp_path / name}"])
        if name == "resumed":
            with killed_after(monkeypatch, 1), pytest.raises(Crash):
                run(cfg)
            compressed.clear()
        run(cfg)
        runs[name] = tmp_path / name / cfg.run_name
    assert compressed and set(compressed) == {(32, 64)}  # after the resume too; the 10 x 32 layer does not fit
    plan = json.loads((runs["sparse"] / "execution.json").read_text())["plan"]
    assert plan == {"net.0.weight": engine.TWO_FOUR, "net.2.weight": "sparse"}
    metrics = {k: read_jsonl(d / "metrics.jsonl") for k, d in runs.items()}
    assert any(r.get("mask/grown", 0) > 0 for r in metrics["sparse"])
    for a, b in zip(metrics["masked"], metrics["sparse"], strict=True):
        if "train/loss" in a:  # the same bf16 products, the bias added after the sparse one
            assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)
    timing = ("time", "throughput/", "sparse/rebuild")
    assert [{k: v for k, v in r.items() if not k.startswith(timing)} for r in metrics["sparse"]] == \
        [{k: v for k, v in r.items() if not k.startswith(timing)} for r in metrics["resumed"]]


def test_two_four_layer_runs_the_dense_product_while_its_mask_is_not_two_four(monkeypatch):
    """A TwoFourLinear multiplies on 2:4 tensors only while its mask is 2:4 (a pruning method's
    masks start dense, AC/DC's dense phases are dense): checked again whenever the mask changes,
    in place or replaced; in float32 always the plain product."""
    from sparse_bench.sparsity.execution import semistructured

    compressed = []
    monkeypatch.setattr(semistructured, "compress", lambda w, dtype: compressed.append(1) or w.to(dtype))
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    layer.__class__ = semistructured.TwoFourLinear
    two_four = Structure("nm", 2, 4).random_masks([(32, 64)], [0], torch.Generator().manual_seed(0))[0]
    x = torch.randn(5, 64)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    layer.mask = torch.ones(32, 64, dtype=torch.bool)  # dense
    forward()
    assert not compressed
    layer.mask.copy_(two_four)  # pruned to 2:4 in place
    with torch.no_grad():
        layer.weight.mul_(two_four)
    y = forward()
    assert len(compressed) == 1 and y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias), rtol=2e-2, atol=0.1)
    layer(x)  # float32: the plain product
    assert len(compressed) == 1
    layer.mask = torch.ones(32, 64, dtype=torch.bool)  # replaced by a dense one (AC/DC's dense phase)
    forward()
    assert len(compressed) == 1
    layer.mask = two_four.clone()
    forward()
    assert len(compressed) == 2
