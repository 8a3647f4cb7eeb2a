"""torchrun with two CPU processes (Gloo) gives the single-process result, for any batch split."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_in_process


def _torchrun(tmp_path, args, port, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return subprocess.Popen([torchrun, "--nproc_per_node=2", f"--master_port={port}", "-m", "sparse_bench", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_odd_batches_and_mask_updates_match_one_process(tmp_path):
    """Batch 65 splits 33/32 and the last batch (58 of 1293) 29/29; RigL's growth reads the
    averaged gradient every 4 steps: masks must be identical and weights equal to float error."""
    from sparse_bench.train.checkpoint import load_checkpoint

    args = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=2", "density=0.3",
            "dataset.batch_size=65", "method=rigl", "method.update_every=4", "logger=none", "progress=false",
            "device=cpu", "run_name=r"]
    proc = _torchrun(tmp_path, [*args, f"paths.runs={tmp_path / 'ddp'}"], 29563)
    run_in_process([*args, f"paths.runs={tmp_path / 'one'}"])  # the reference, while torchrun runs
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    a = load_checkpoint(tmp_path / "ddp" / "r" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "one" / "r" / "checkpoint.pt")
    for ma, mb in zip(a["method"]["masks"]["masks"], b["method"]["masks"]["masks"]):
        assert torch.equal(ma, mb)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4), k
    ra = json.loads((tmp_path / "ddp" / "r" / "results.json").read_text())
    rb = json.loads((tmp_path / "one" / "r" / "results.json").read_text())
    assert ra["final"]["train/loss"] == pytest.approx(rb["final"]["train/loss"], rel=1e-4)
    assert ra["final"]["test/acc"] == pytest.approx(rb["final"]["test/acc"], abs=1e-3)
    # only rank 0 writes: a record per epoch, the final test record and one per mask update
    recs = [json.loads(line) for line in (tmp_path / "ddp" / "r" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if not r.get("update")]) == 3
    assert [r["step"] for r in recs if r.get("update")] == [r["step"] for r in ones if r.get("update")] != []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_a_dead_rank_ends_the_job_within_seconds(tmp_path):
    args = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=200", "density=0.3",
            "logger=none", "progress=false", "device=cpu", f"paths.runs={tmp_path}"]
    proc = _torchrun(tmp_path, args, 29565)
    lines = []
    for line in proc.stdout:  # wait until training is under way
        lines.append(line)
        if "epoch   2" in line:
            break
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert len(children) == 2, "".join(lines)
    os.kill(children[-1], 9)
    t0 = time.monotonic()
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 60


def _verify_worker(rank, world, store_path, result_path):
    import torch.distributed as tdist

    from sparse_bench.errors import RunFailed
    from sparse_bench.train import distributed as du

    tdist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)

    class FakeMasks:
        names = ["a.weight", "b.weight"]
        masks = [torch.tensor([True, False, True]), torch.tensor([True, True, False, False])]

        def __len__(self):
            return len(self.masks)

        def active_indices(self, i):
            return self.masks[i].nonzero().squeeze(1)

    class FakeMethod:
        masks = FakeMasks()

    du.verify_masks(FakeMethod(), du.Dist(rank, world), step=7)  # identical: passes
    if rank == 1:
        FakeMethod.masks.masks[1] = torch.tensor([True, False, True, False])  # same count, other place
    try:
        du.verify_masks(FakeMethod(), du.Dist(rank, world), step=8)
        outcome = "passed"
    except RunFailed as exc:
        outcome = str(exc)
    Path(f"{result_path}.{rank}").write_text(outcome)
    tdist.destroy_process_group()


def test_ranks_whose_masks_differ_stop_with_one_line(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_verify_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"out.{rank}").read_text()
        assert "masks differ between processes after the mask update at step 8" in text
        assert "b.weight" in text and "\n" not in text


@pytest.mark.parametrize("outcome, code", [(0, 0), (3, 3), ("exit2", 2), ("bug", 1)])
def test_a_torchrun_worker_ends_with_its_status_and_skips_the_teardown(monkeypatch, outcome, code):
    """Under torchrun (WORLD_SIZE > 1) main() ends the process itself, with the job's exit status
    (from a return, sys.exit or an uncaught bug), instead of returning into interpreter teardown."""
    from sparse_bench import cli

    def job(argv):
        if outcome == "exit2":
            sys.exit(2)
        if outcome == "bug":
            raise RuntimeError("a bug")
        return outcome

    class Exited(Exception):
        pass

    def fake_exit(status):
        raise Exited(status)

    monkeypatch.setattr(cli, "_main", job)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)  # leave this process's W&B alone
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exited) as info:
        cli.main([])
    assert info.value.args == (code,)
    monkeypatch.setenv("WORLD_SIZE", "1")
    if outcome == 0:
        assert cli.main([]) == 0  # one process: main() returns as before
