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


def test_ddp_is_set_up_from_a_slurm_jobs_variables():
    """srun without torchrun: rank, world and local rank from SLURM's variables, the first node
    of the job as the master, a port from the job id (submitit's reader)."""
    from sparse_bench.train import distributed as dist_util

    saved = dict(os.environ)  # the export writes the torchrun variables into this process's environment
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "SUBMITIT_EXECUTOR"):
            os.environ.pop(key, None)
        os.environ.update({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"})
        d = dist_util.from_env()
        assert (d.rank, d.world, d.local_rank) == (3, 4, 1)
        assert os.environ["MASTER_ADDR"] == "gpu07" and 20000 <= int(os.environ["MASTER_PORT"]) <= 60000
        assert "SUBMITIT_EXECUTOR" not in os.environ
        os.environ["SLURM_NTASKS"] = "1"  # a one-task job is a single process
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
        assert dist_util.from_env().world == 1
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _task_pids(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "submitit.core._submit" in cmd and str(folder) in cmd:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_preempted_two_process_slurm_style_job_is_requeued_and_resumes(tmp_path):
    """Hydra's submitit launcher (its local executor, as a SLURM job runs): one job of two
    processes trained together under DDP; preempted (submitit's signal) after an epoch, the job is
    requeued and resumes from its last checkpoint, ending as an uninterrupted job does."""
    import signal

    common = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
              "hydra.launcher.timeout_min=5", "dataset=digits", "model=mlp", "method=rigl", "method.update_every=4",
              "schedule=constant", "schedule.epochs=30", "density=0.3", "logger=none", "progress=false", "device=cpu",
              "eval.train_samples=0", "sweep_name=s"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)

    def launch(folder: Path):
        return subprocess.Popen([sys.executable, "-m", "sparse_bench", *common, f"paths.runs={folder}"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight = launch(tmp_path / "a")
    out_a, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out_a[-3000:]
    preempted = launch(tmp_path / "b")
    ckpt = None
    deadline = time.time() + 300
    while ckpt is None:
        assert time.time() < deadline
        assert preempted.poll() is None, preempted.communicate()[0][-3000:]
        found = list((tmp_path / "b").glob("multirun/s/*/checkpoint.pt"))
        ckpt = found[0] if found else None
        time.sleep(0.2)
    pids = _task_pids(tmp_path / "b")
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)  # what SLURM sends (submitit asks for it) before a time limit or preemption
    out_b, _ = preempted.communicate(timeout=600)
    assert preempted.returncode == 0, out_b[-3000:]
    (run_a,) = (tmp_path / "a").glob("multirun/s/*/results.json")
    (run_b,) = (tmp_path / "b").glob("multirun/s/*/results.json")
    logs = "".join(p.read_text() for p in (tmp_path / "b").glob("multirun/s/.submitit/*/*_0_log.*"))
    assert "Requeued job" in logs and "resuming" in logs and "x 2 processes" in logs
    ra, rb = json.loads(run_a.read_text()), json.loads(run_b.read_text())
    assert ra["status"] == rb["status"] == "complete"
    assert ra["final"]["test/acc"] == rb["final"]["test/acc"] and ra["final"]["test/loss"] == rb["final"]["test/loss"]
