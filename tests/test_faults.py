"""The faults a cluster user meets, class by class: each case ends with its exit status, one line
and no traceback, leaves no folder or file where it should not, never claims success, and never
touches a file of the user's.

1 places checked before anything is created; 2 run folders confined to paths.runs; 3 (no empty
layers: tests/test_no_empty_layers.py); 4 empty or degenerate data; 5 side files read back checked;
6 folders the tool did not write; 7 one process per run folder; 8 W&B failures after the result;
9 the kernel cache; 10 signals and messages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data import make_arrays, write_dataset
from test_data_cifar_imagenet import inet_cfg, write_imagenet

from sparse_bench import cli, tables
from sparse_bench.errors import ConfigError, RunFailed
from sparse_bench.run import LOCK, MARKER, run

from conftest import compose

TINY = ["dataset=digits", "model=mlp", "schedule=constant", "schedule.epochs=1", "limit_train_batches=2",
        "logger=none", "progress=false", "device=cpu", "eval.train_samples=0"]


def over(*args: str) -> list[str]:
    """TINY with `args` on top (a later key=value replaces an earlier one)."""
    chosen = {}
    for a in [*TINY, *args]:
        chosen[a.split("=", 1)[0]] = a
    return list(chosen.values())


def _tree(root: Path) -> dict:
    """Every path below `root` with its bytes (files) or None (folders)."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(Path(root).rglob("*"))}


def _one_line_refusal(code: int, err: str, want: int = 2) -> str:
    err = err.strip()
    assert code == want, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


# --- 1, 2: the place of a run, checked before anything is created --------------------------------
def _places(tmp: Path) -> list:
    (tmp / "a_file").write_text("mine")
    return [
        ([f"paths.runs={tmp / 'a_file'}"], "is a file, not a folder"),
        ([f"paths.runs={tmp / 'a_file' / 'sub'}"], "is a file, not a folder"),
        (["paths.runs=/proc/sparse_bench_x"], "takes no new folders"),
        (["paths.runs=/sys/sparse_bench_x"], "/sys"),
        ([f"paths.runs={tmp / 'runs'}", "run_name=" + "x" * 300], "more than the 255"),
        ([f"paths.runs={tmp / 'runs'}", "hydra.run.dir=/proc/sbx"], "outside paths.runs"),
        ([f"paths.runs={tmp / 'runs'}", f"hydra.run.dir={tmp / 'elsewhere'}"], "outside paths.runs"),
        (["-m", "density=0.1,0.2", "paths.runs=/proc/sparse_bench_x"], "takes no new folders"),
        (["-m", "density=0.1,0.2", f"paths.runs={tmp / 'runs'}", "sweep_name=" + "y" * 300], "more than the 255"),
        (["-m", "density=0.1,0.2", f"paths.runs={tmp / 'runs'}", f"hydra.sweep.dir={tmp / 'sw'}"],
         "outside paths.runs"),
        (["-m", "density=0.1,0.2", f"paths.runs={tmp / 'runs'}", "run_name=" + "z" * 300], "more than the 255"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_an_unusable_place_is_refused_before_anything_is_created(case, tmp_path, capsys):
    args, named = _places(tmp_path)[case]
    before = _tree(tmp_path)
    code = cli.main([*(a for a in args if a == "-m"), *over(*(a for a in args if a != "-m"))])
    err = _one_line_refusal(code, capsys.readouterr().err)
    assert named in err, err
    assert _tree(tmp_path) == before, "nothing created, nothing touched"


def test_a_run_folder_inside_paths_runs_is_taken_as_given(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli.main([*over(f"paths.runs={runs}"), f"hydra.run.dir={runs / 'mine'}"]) == 0
    assert json.loads((runs / "mine" / "results.json").read_text())["status"] == "complete"


# --- 4: empty or degenerate data --------------------------------------------------------------
def test_an_empty_test_split_is_refused(tmp_path):
    arrays = make_arrays()
    arrays["t10k-images-idx3-ubyte"] = arrays["t10k-images-idx3-ubyte"][:0]
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:0]
    write_dataset(tmp_path / "mnist", arrays, gz=True)
    cfg = compose(over("dataset=mnist", "model=lenet300_100", f"dataset.root={tmp_path / 'mnist'}",
                       f"paths.runs={tmp_path / 'runs'}"))
    with pytest.raises(ConfigError) as exc:
        run(cfg)
    assert "the test split of dataset=mnist holds no samples" in str(exc.value) and "\n" not in str(exc.value)
    assert not list((tmp_path / "runs").rglob("results.json"))


@pytest.mark.parametrize("args,named", [
    (["dataset=synthetic", "dataset.n_train=10", "dataset.batch_size=32", "dataset.drop_last=true"],
     "holds no whole batch"),
    (["dataset=synthetic", "dataset.val_fraction=0", "optimized_metric=val/acc"], "needs a validation split"),
])
def test_data_that_trains_or_measures_nothing_is_refused_at_start(args, named, tmp_path):
    cfg = compose(over(*args, f"paths.runs={tmp_path}"))
    with pytest.raises(ConfigError, match=named) as exc:
        run(cfg)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / cfg.run_name / "metrics.jsonl").exists()


def test_an_image_folder_with_one_class_is_refused(tmp_path):
    write_imagenet(tmp_path)
    for split in ("train", "val"):
        for extra in sorted((tmp_path / split).iterdir())[1:]:
            for f in extra.iterdir():
                f.unlink()
            extra.rmdir()
    from sparse_bench.data import build_data

    with pytest.raises(ConfigError, match="has 1 class; a classifier needs at least 2"):
        build_data(inet_cfg(tmp_path), "cpu", seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_one_line_naming_it(workers, tmp_path):
    write_imagenet(tmp_path / "inet")
    bad = sorted((tmp_path / "inet" / "train").rglob("*.JPEG"))[0]
    bad.write_bytes(b"not an image at all")
    cfg = compose(over("dataset=imagenet", f"dataset.root={tmp_path / 'inet'}", "dataset.image_size=32",
                       f"dataset.num_workers={workers}", "dataset.batch_size=4", "dataset.test_batch_size=4",
                       f"paths.runs={tmp_path / 'runs'}", "limit_train_batches=null"))
    with pytest.raises(RunFailed) as exc:
        run(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"cannot read the image {bad}") and "Traceback" not in msg
    res = json.loads((tmp_path / "runs" / cfg.run_name / "results.json").read_text())
    assert res["status"] == "failed" and str(bad) in res["error"]


# --- 5: side files read back checked ------------------------------------------------------------
@pytest.fixture
def finished(tmp_path):
    cfg = compose(over(f"paths.runs={tmp_path}"))
    run(cfg)
    return cfg, tmp_path / cfg.run_name


SIDE_FILES = [
    ("results.json", '{"status": "comp'),           # truncated
    ("results.json", "[1, 2, 3]"),                   # not an object
    ("results.json", '{"status": "complete"}'),      # crafted: no config, no final metrics
    ("results.json", '{"status": "complete", "config": [], "final": 3}'),
    ("results.json", b"\xff\xfe garbage"),
]


@pytest.mark.parametrize("name,text", SIDE_FILES)
def test_a_damaged_results_file_is_one_line_naming_it(name, text, finished):
    cfg, folder = finished
    (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    kept = (folder / name).read_bytes()
    with pytest.raises(ConfigError) as exc:
        run(cfg)
    assert str(folder / name) in str(exc.value) and "\n" not in str(exc.value)
    assert (folder / name).read_bytes() == kept


@pytest.mark.parametrize("name,text,named", [
    ("config.json", '{"seed": 0', "config.json"),
    ("config.json", '"a string"', "config.json"),
    ("execution.json", '{"plan": 5}', "execution.json"),
    ("execution.json", "not json", "execution.json"),
])
def test_a_damaged_file_a_resume_reads_is_one_line_naming_it(name, text, named, tmp_path, monkeypatch):
    from sparse_bench.train import trainer as trainer_mod

    cfg = compose(over("schedule.epochs=2", f"paths.runs={tmp_path}", "method=static", "execution=sparse"))
    real = trainer_mod.Trainer.save

    def save_then_stop(self):
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(trainer_mod.Trainer, "save", real)
    folder = tmp_path / cfg.run_name
    (folder / name).write_text(text)
    with pytest.raises(ConfigError) as exc:
        run(cfg)
    assert named in str(exc.value) and "\n" not in str(exc.value)
    assert (folder / name).read_text() == text
    assert not (folder / "results.json").exists()


def test_a_damaged_wandb_id_is_one_line(tmp_path):
    cfg = compose(over("logger=wandb", f"paths.runs={tmp_path}"))
    (tmp_path / cfg.run_name).mkdir(parents=True)
    (tmp_path / cfg.run_name / MARKER).write_text("")
    (tmp_path / cfg.run_name / "wandb_id.txt").write_text("../../etc/passwd\n")
    with pytest.raises(ConfigError, match="does not hold a W&B run id"):
        run(cfg)


def test_the_tables_skip_a_damaged_run_with_a_note(finished, tmp_path, capsys):
    cfg, folder = finished
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model": ')
    (folder / "results.json").write_text('{"status": "complete", "config": {}}')
    assert tables.main([str(tmp_path), "--out", str(tmp_path / "t")]) == 2  # nothing left to tabulate
    err = capsys.readouterr().err
    assert f"note: {folder} skipped: its results.json says complete but holds no final metrics" in err
    assert f"note: {other} skipped: config.json is truncated or not a JSON object" in err
    assert "running" not in err


# --- 6: folders the tool did not write ----------------------------------------------------------
@pytest.mark.parametrize("resume", ["false", "auto"])
@pytest.mark.parametrize("name", ["results.json", "config.json", "checkpoint.pt", "metrics.jsonl"])
def test_a_folder_the_tool_did_not_write_is_never_overwritten(resume, name, tmp_path):
    folder = tmp_path / "runs" / "theirs"
    folder.mkdir(parents=True)
    (folder / name).write_text("someone else's")
    (folder / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(ConfigError, match="that this tool did not write") as exc:
        run(compose(over(f"paths.runs={tmp_path / 'runs'}", "run_name=theirs", f"resume={resume}")))
    assert "\n" not in str(exc.value)
    assert _tree(tmp_path) == before, "nothing written into their folder, not even a marker or a lock"


def test_a_folder_the_tool_wrote_before_the_marker_existed_is_still_its_own(finished):
    cfg, folder = finished
    (folder / MARKER).unlink()  # an older version's run folder: its provenance.json says whose it is
    run(compose(over(f"paths.runs={folder.parent}", "resume=false")))
    assert json.loads((folder / "results.json").read_text())["status"] == "complete"


# --- 7: one process per run folder ---------------------------------------------------------------
def test_three_processes_and_a_removed_folder_never_share_a_run_folder(tmp_path):
    # a holds the lock (as a run refused at start does, before it removes the folder it made);
    # b waits on it; the folder (lock file included) goes; c starts on an empty place; then a lets go.
    import fcntl

    args = over("schedule.epochs=30", "limit_train_batches=null", f"paths.runs={tmp_path / 'runs'}", "run_name=one")
    folder = tmp_path / "runs" / "one"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("")
    lock = open(folder / LOCK, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    b = subprocess.Popen([sys.executable, "-m", "sparse_bench", *args], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (folder / "sparse_bench.log").exists() or "waiting" not in (folder / "sparse_bench.log").read_text():
        assert time.time() < deadline and b.poll() is None, "b waits on the lock"
        time.sleep(0.1)
    shutil.rmtree(folder)  # what a refused run does to the folder it made, lock included
    c = subprocess.Popen([sys.executable, "-m", "sparse_bench", *args], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (folder / "metrics.jsonl").exists() or not (folder / "metrics.jsonl").read_text():
        assert time.time() < deadline + 60 and c.poll() is None, "c trains"
        time.sleep(0.05)
    fcntl.flock(lock, fcntl.LOCK_UN)  # c is training: b's lock (on the removed file) now comes free
    lock.close()
    out_b, out_c = b.communicate(timeout=300)[0], c.communicate(timeout=300)[0]
    assert b.returncode == 0 and c.returncode == 0, out_b + out_c
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in recs if "train/loss" in r]
    assert epochs == list(range(1, 31)), "one process trained, the other found its result"
    assert ("run already complete" in out_b) != ("run already complete" in out_c)


# --- 8: logging failures never change a finished run ---------------------------------------------
def test_an_unwritable_home_is_one_warning_and_the_run_completes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    env.update(HOME="/proc/sparse_bench_nohome", WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "sparse_bench", *over("logger=wandb", f"paths.runs={tmp_path}")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr
    res = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert res["status"] == "complete"


def test_wandb_failing_after_the_result_is_one_warning(tmp_path, monkeypatch, caplog):
    import logging

    from sparse_bench.train.logging import MetricSink

    class Broken:  # a W&B run whose writes fail (a full disk, a quota) once training has begun
        project, tags, step, summary = "p", [], 0, {}

        def define_metric(self, *a, **k):
            pass

        def log(self, *a, **k):
            raise OSError("disk quota exceeded")

        def finish(self, *a, **k):
            raise OSError("disk quota exceeded")

    def fake_init(self, run_dir, cfg, run_name, group, tags, config):
        self.wandb = Broken()
        self.wandb_info = {"id": "x", "mode": "offline"}

    monkeypatch.setattr(MetricSink, "_init_wandb", fake_init)
    cfg = compose(over("logger=wandb", f"paths.runs={tmp_path}"))
    with caplog.at_level(logging.WARNING, logger="sparse_bench"):
        final = run(cfg)
    assert final["test/acc"] >= 0
    warnings = [r.message for r in caplog.records if "W&B could not" in r.message]
    assert len(warnings) == 1 and "disk quota exceeded" in warnings[0]
    res = json.loads((tmp_path / cfg.run_name / "results.json").read_text())
    assert res["status"] == "complete" and "error" in res["wandb"]


# --- 9: the kernel cache --------------------------------------------------------------------------
@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    from sparse_bench.sparsity.execution import kernels

    monkeypatch.setenv("SPARSE_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    if kernels._compiler() is None:
        pytest.skip("no C compiler here")
    return kernels


def test_a_foreign_library_under_the_cache_name_is_rebuilt(fresh_kernels, tmp_path):
    kernels = fresh_kernels
    assert kernels._load() is not None
    built = next((tmp_path / "cache").glob("spkernels-*.so"))
    built.write_bytes(Path("/bin/true").read_bytes())  # someone else's binary, the right name
    kernels._tried, kernels._lib = False, None
    lib = kernels._load()
    assert lib is not None and lib.sb_key() == built.name[len("spkernels-"):-3].encode()
    assert built.read_bytes() != Path("/bin/true").read_bytes()


def test_a_library_that_cannot_be_rebuilt_falls_back_in_one_line(fresh_kernels, tmp_path, monkeypatch, caplog):
    import logging

    kernels = fresh_kernels
    assert kernels._load() is not None
    built = next((tmp_path / "cache").glob("spkernels-*.so"))
    built.write_bytes(b"\x7fELF not really")
    kernels._tried, kernels._lib = False, None
    monkeypatch.setattr(kernels, "_compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("cc: no space")))
    with caplog.at_level(logging.WARNING, logger="sparse_bench"):
        assert kernels._load() is None
    lines = [r.message for r in caplog.records if "sparse kernels" in r.message]
    assert len(lines) == 1 and "torch's CSR ops" in lines[0] and "\n" not in lines[0]


# --- 10: signals and messages --------------------------------------------------------------------
@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                           (signal.SIGTERM, 143, "SIGTERM"),
                                           (signal.SIGUSR1, 138, "SIGUSR1")])  # SLURM's warning before the limit
def test_a_signal_checkpoints_what_is_finished_and_says_how_to_resume(sig, code, said, tmp_path):
    args = over("schedule.epochs=100000", "limit_train_batches=null", f"paths.runs={tmp_path}", "run_name=r")
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "sparse_bench", *args], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "r" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(said) and "run the same command again to resume" in last
    assert not (tmp_path / "r" / "results.json").exists()  # nothing claims success or failure
    assert ckpt.exists()


def test_dsr_runs_on_a_one_step_schedule(tmp_path):
    final = run(compose(over("method=dsr", "limit_train_batches=1", f"paths.runs={tmp_path}")))
    assert final["density/achieved"] > 0


def test_a_tiny_normalisation_std_is_blamed_on_the_inputs_not_the_learning_rate(tmp_path):
    with pytest.raises(RunFailed) as exc:
        run(compose(over("dataset.normalize.std=[1e-45]", f"paths.runs={tmp_path}")))
    msg = str(exc.value)
    assert "training inputs themselves are not finite" in msg and "dataset.normalize" in msg
    assert "learning rate" not in msg
