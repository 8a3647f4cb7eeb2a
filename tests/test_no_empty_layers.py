"""No prunable layer ends, or trains, with zero active weights unless the user asks for it
(``prunable.allow_empty``): every method on tiny data, across short schedules, few batches per
epoch and densities near the smallest usable one, keeps at least one weight in every layer after
every update; a density that would force an empty layer is refused at start."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sparse_bench.errors import ConfigError
from sparse_bench.run import run
from sparse_bench.sparsity.distributions import min_density

from conftest import compose, tiered

pytestmark = pytest.mark.usefixtures("one_thread")

# a small MLP on digits: prunable tensors of 1,024, 128 and 80 weights
HIDDEN = "[16,8]"
SHAPES = [(16, 64), (8, 16), (10, 8)]
F1 = "{unit:fraction,value:1.0}"
# what makes each method update inside a run of a few steps (its defaults update every 100 or 1000)
UPDATES = {
    "sparse_momentum": ["method.update_every=1"],
    "set": ["method.update_every=1", "method.end=null", "method.scope=global"],
    "rigl": ["method.update_every=1", f"method.end={F1}", "method.scope=global"],
    "gse": ["method.update_every=1", f"method.end={F1}"],
    "topkast": ["method.update_every=1"],
    "dsr": ["method.update_every=1", "method.end=null"],
    "deepr": ["method.end=null"],
    "gmp": ["method.start={unit:fraction,value:0.0}", "method.frequency={unit:step,value:1}"],
    "lottery": ["method.n_rounds=2"],
    "synflow": ["method.iterations=3"],
    "acdc": [], "snip": [], "grasp": [], "static": [],
}
INITS = {"rigl": "erk", "set": "er", "gse": "er"}  # the distributions their defaults draw
CASES = [(method, epochs, limit, factor) for method in sorted(UPDATES)
         for epochs, limit, factor in ((1, 1, 1.2), (2, 2, 2.0), (3, None, 1.2))]


def _layer_densities(folder: Path) -> list[dict]:
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = [{k: v for k, v in r.items() if k.startswith("density/") and k != "density/achieved"} for r in recs]
    return [d for d in out if d]


@pytest.mark.parametrize("method,epochs,limit,factor", tiered(CASES, every=3, ids=lambda c: "-".join(map(str, c))))
def test_no_method_empties_a_layer(method, epochs, limit, factor, tmp_path):
    density = round(min_density(SHAPES, INITS.get(method, "uniform")) * factor, 4)
    over = [f"method={method}", "dataset=digits", "model=mlp", f"model.hidden={HIDDEN}", "schedule=constant",
            f"schedule.epochs={epochs}", f"density={density}", "logger=none", "progress=false", "device=cpu",
            "eval.train_samples=0", f"paths.runs={tmp_path}", *UPDATES[method]]
    if limit:
        over.append(f"limit_train_batches={limit}")
    cfg = compose(over)
    try:
        run(cfg)
    except ConfigError as exc:  # refused at start: one line, nothing trained
        assert "\n" not in str(exc)
        assert not (tmp_path / cfg.run_name / "metrics.jsonl").exists()
        return
    folder = tmp_path / cfg.run_name
    records = _layer_densities(folder)
    assert records, "every run records its per-layer densities"
    for rec in records:  # every update and every epoch
        assert min(rec.values()) > 0, rec
    final = json.loads((folder / "results.json").read_text())
    assert final["status"] == "complete" and min(final["density"]["per_layer"].values()) > 0


def test_a_global_ranking_may_empty_a_layer_when_asked(tmp_path):
    # GMP's global magnitude ranking at the smallest density: the small middle layer would empty
    base = ["method=gmp", "dataset=digits", "model=mlp", f"model.hidden={HIDDEN}", "schedule=constant",
            "schedule.epochs=2", "limit_train_batches=2", "density=0.003", "logger=none", "progress=false",
            "device=cpu", "eval.train_samples=0", *UPDATES["gmp"]]
    kept = compose([*base, f"paths.runs={tmp_path / 'kept'}"])
    run(kept)
    assert min(json.loads((tmp_path / "kept" / kept.run_name / "results.json").read_text())
               ["density"]["per_layer"].values()) > 0
    emptied = compose([*base, "prunable.allow_empty=true", f"paths.runs={tmp_path / 'emptied'}"])
    run(emptied)
    res = json.loads((tmp_path / "emptied" / emptied.run_name / "results.json").read_text())
    assert res["status"] == "complete" and min(res["density"]["per_layer"].values()) == 0
    # the same total either way: the floor moves weights between layers, never adds any
    total = sum(math.prod(s) for s in SHAPES)
    assert res["density"]["achieved"] == pytest.approx(round(0.003 * total) / total)


def test_a_density_that_must_empty_a_layer_is_refused_at_start(tmp_path):
    over = ["method=gmp", "dataset=digits", "model=mlp", f"model.hidden={HIDDEN}", "schedule.epochs=1",
            "density=0.001", "logger=none", "progress=false", "device=cpu", f"paths.runs={tmp_path}"]
    with pytest.raises(ConfigError) as exc:  # 0.001 x 1,232 weights: 1 weight for 3 layers
        run(compose(over))
    msg = str(exc.value)
    assert "\n" not in msg and "fewer than one per prunable layer (3)" in msg and "prunable.allow_empty=true" in msg
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_a_layer_a_method_empties_stops_the_run(tmp_path, monkeypatch):
    # the safety net: a method that empties a layer (a bug) fails the run, never completes it
    from sparse_bench.errors import RunFailed
    from sparse_bench.sparsity.methods.dense import Static as StaticMethod

    def empty_first(self, epoch, step):
        self.masks.masks[0] = self.masks.masks[0] & False
        self.masks.apply_()
        return self.density_logs()

    monkeypatch.setattr(StaticMethod, "on_epoch_end", empty_first)
    cfg = compose(["method=static", "dataset=digits", "model=mlp", f"model.hidden={HIDDEN}", "schedule.epochs=2",
                   "density=0.1", "logger=none", "progress=false", "device=cpu", "limit_train_batches=2",
                   f"paths.runs={tmp_path}"])
    with pytest.raises(RunFailed, match="left net.0.weight with no active weight"):
        run(cfg)
    res = json.loads((tmp_path / cfg.run_name / "results.json").read_text())
    assert res["status"] == "failed"
