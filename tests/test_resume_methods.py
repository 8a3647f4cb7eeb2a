"""Every method's checkpoint holds all its state: a run killed after an epoch and resumed ends
bit-identical to one that was not killed (CPU), with mask updates happening in both halves."""

import pytest
import torch

from sparse_bench.run import run
from sparse_bench.train.checkpoint import load_checkpoint

from conftest import Crash, compose, killed_after, read_jsonl

BASE = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=4", "density=0.3",
        "limit_train_batches=6", "eval.train_samples=100", "logger=none", "progress=false", "device=cpu"]
# settings that make each method change its masks several times within 4 short epochs
METHODS = {
    "set": ["method.update_every=4"],
    "deepr": ["method.temperature=1e-6"],
    "dsr": ["method.update_every=4"],
    "rigl": ["method.update_every=4", "method.drop_noise=1e-5"],
    "topkast": ["method.update_every=4"],
    "gse": ["method.update_every=4", "method.sampling=graest", "method.end=null"],
    "gmp": ["method.frequency={unit:epoch,value:1}", "method.start={unit:epoch,value:1}",
            "method.end={unit:epoch,value:3}"],
    "acdc": ["method.warmup={unit:epoch,value:1}", "method.phase_length={unit:epoch,value:1}",
             "method.final_dense={unit:epoch,value:1}", "method.final_sparse={unit:epoch,value:1}"],
    "snip": [],
    "synflow": ["method.iterations=3"],
    "lottery": ["method.n_rounds=1", "method.rewind_epoch=0.5"],
    "sparse_momentum": ["method.growth=random", "method.update_every=5"],
    # the comparison papers' protocols: statistics batches drawn on both sides of the crash, the
    # exploration phase, the DSR code's DeepR
    "rigl:gse": ["method.update_every=4", "method.stat_batches=2", "method.scope=global", "method.exclude_pruned=true",
                 "method.init=er", "method.reinit=fan_in", "method.end={unit:epoch,value:4}"],
    "topkast:gse": ["method.update_every=4", "method.init=er", "method.explore_end={unit:epoch,value:3}",
                    "method.norm_penalty=1e-4", "method.promote=zero", "optimizer.weight_decay=0"],
    # mixed precision: autocast, and fp16's gradient scaler state in the checkpoint
    "rigl:bf16": ["method.update_every=4", "precision=bf16"],
    "sparse_momentum:fp16": ["method.update_every=5", "precision=fp16"],
    "rigl:ema": ["method.update_every=4", "eval.ema_decay=0.9"],  # the weight average in the checkpoint
    "deepr:dsr": ["method.l1_mode=loss", "method.noise_mode=gradient", "method.regrow_sign=first_update",
                  "method.exclude_pruned=true", "method.end={unit:epoch,value:3}",
                  "method.temperature={unit:epoch,points:[[0,1e-4],[2,1e-6]]}"],
}



def _strip(recs):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in recs]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_bit_identical(method, tmp_path, monkeypatch):
    over = [*BASE, f"method={method.split(':')[0]}", *METHODS[method]]
    a = compose([*over, f"paths.runs={tmp_path / 'a'}"])
    run(a)
    b = compose([*over, f"paths.runs={tmp_path / 'b'}"])
    crash_after = 2
    with killed_after(monkeypatch, crash_after), pytest.raises(Crash):
        run(b)
    run(b)

    fa, fb = tmp_path / "a" / a.run_name, tmp_path / "b" / b.run_name
    ra, rb = read_jsonl(fa / "metrics.jsonl"), read_jsonl(fb / "metrics.jsonl")
    assert _strip(ra) == _strip(rb)
    if method not in ("snip", "synflow"):  # one-shot methods never change their masks again
        assert any(r.get("mask/pruned", 0) > 0 or r.get("mask/grown", 0) > 0 for r in ra[crash_after:]), \
            "the resumed half must contain mask updates for this test to mean anything"
    ca = load_checkpoint(fa / "checkpoint.pt")
    cb = load_checkpoint(fb / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
