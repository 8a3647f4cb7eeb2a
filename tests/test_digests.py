"""What every method trains, pinned: a short seeded run per method and execution (masked and
sparse) ends with the masks, weights and metrics recorded in tests/digests/ before the
architecture was rebuilt, so a refactor that changes behaviour fails here.

Masks must be equal; weights and metrics equal to float tolerance (a machine with another CPU,
or another thread count, sums in another order; the tolerance is far below what a change of
behaviour moves). ``SPARSE_BENCH_RECORD_DIGESTS=1`` records them anew (only after a deliberate
change of behaviour, said in its commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparse_bench.run import run
from sparse_bench.train.checkpoint import load_checkpoint

from conftest import compose, tiered

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent / "digests"
RECORD = os.environ.get("SPARSE_BENCH_RECORD_DIGESTS") == "1"
BASE = ["dataset=synthetic", "dataset.input_shape=[1,8,8]", "dataset.n_train=256", "dataset.n_test=64",
        "dataset.batch_size=32", "model=mlp", "model.hidden=[24,12]", "schedule=constant", "schedule.epochs=2",
        "limit_train_batches=4", "density=0.3", "logger=none", "progress=false", "device=cpu",
        "eval.train_samples=64"]
F = "{unit:fraction,value:%s}"
# what makes each method update inside eight steps
METHODS = {
    "dense": [], "static": [],
    "sparse_momentum": ["method.update_every=2"],
    "set": ["method.update_every=2", "method.end=null"],
    "deepr": ["method.end=null"],
    "dsr": ["method.update_every=2", "method.end=null"],
    "rigl": ["method.update_every=2", f"method.end={F % 1.0}"],
    "topkast": ["method.update_every=2"],
    "gse": ["method.update_every=2", f"method.end={F % 1.0}"],
    "gmp": [f"method.start={F % 0.0}", f"method.end={F % 0.8}", "method.frequency={unit:step,value:2}"],
    "acdc": [f"method.warmup={F % 0.25}", f"method.phase_length={F % 0.25}", f"method.final_dense={F % 0.0}",
             f"method.final_sparse={F % 0.25}"],
    "snip": [], "grasp": [], "synflow": ["method.iterations=3"],
    "lottery": ["method.n_rounds=1"],
}
# the methods that run sparse layers (the others run masked whatever `execution` says)
SPARSE = ("static", "sparse_momentum", "set", "dsr", "rigl", "gse", "snip", "grasp", "synflow")
CASES = [(m, "masked") for m in METHODS] + [(m, "sparse") for m in SPARSE]


def _digest(folder: Path) -> dict:
    ckpt = load_checkpoint(folder / "checkpoint.pt")
    model = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    masks = (ckpt["method"] or {}).get("masks") or {}
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = torch.tensor([r[k] for r in recs for k in sorted(r) if k in ("train/loss", "test/loss", "test/acc")],
                           dtype=torch.float64)
    return {"model": model, "masks": {n: m.bool() for n, m in zip(masks.get("names", []), masks.get("masks", []))
                      if m is not None},  # a sparse layer's mask is its structure, in the model
            "metrics": metrics}


@pytest.mark.parametrize("method,execution", tiered(CASES, every=4, ids=lambda c: f"{c[0]}-{c[1]}"))
def test_every_method_trains_what_it_trained(method, execution, tmp_path):
    cfg = compose([*BASE, f"method={method}", *METHODS[method], f"execution={execution}", f"paths.runs={tmp_path}"])
    run(cfg)
    got = _digest(tmp_path / cfg.run_name)
    path = HERE / f"{method}-{execution}.pt"
    if RECORD:
        HERE.mkdir(exist_ok=True)
        torch.save(got, path)
        pytest.skip(f"recorded {path.name}")
    want = torch.load(path, weights_only=True)
    assert set(got["masks"]) == set(want["masks"])
    for name, m in want["masks"].items():
        assert torch.equal(got["masks"][name].reshape(m.shape), m), f"{name}: the masks moved"
    assert set(got["model"]) == set(want["model"])
    for name, w in want["model"].items():  # weights, biases, norms; a sparse layer's values and structure
        g = got["model"][name]
        if not w.is_floating_point():
            assert torch.equal(g, w), f"{name} moved"
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"{name} moved")
    torch.testing.assert_close(got["metrics"], want["metrics"], rtol=1e-4, atol=1e-5)
