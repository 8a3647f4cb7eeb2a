"""torchrun with two CPU processes (Gloo) gives the single-process result."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ARGS = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=2", "density=0.3",
        "logger=none", "progress=false", "device=cpu"]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29561", "-m", "sparse_bench", *ARGS,
                          f"paths.runs={tmp_path / 'ddp'}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "sparse_bench", *ARGS, f"paths.runs={tmp_path / 'one'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    name = "digits-mlp-sparse_momentum-d0.3-s0"
    a = json.loads((tmp_path / "ddp" / name / "results.json").read_text())
    b = json.loads((tmp_path / "one" / name / "results.json").read_text())
    assert a["density"]["achieved"] == b["density"]["achieved"]
    assert a["final"]["test/acc"] == pytest.approx(b["final"]["test/acc"], abs=0.02)
    assert a["final"]["train/loss"] == pytest.approx(b["final"]["train/loss"], rel=1e-3)
    # only rank 0 writes: one metrics record per epoch plus the final test record (and the update's)
    recs = [json.loads(line) for line in (tmp_path / "ddp" / name / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if not r.get("update")]) == 3
    assert len([r for r in recs if r.get("update")]) == 1  # sparse momentum after epoch 1 of 2
