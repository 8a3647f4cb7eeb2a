"""`run(cfg)`: build data, model, optimizer, method; train; write results.json."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from .data import DataBundle, build_data
from .errors import ConfigError, RunFailed
from .identity import diff, recipe, run_identity, shown
from .modelio import Start, StartMasks, load_into, read_start
from .models import build_model
from .provenance import provenance as make_provenance
from .results import model_label, write_results
from .sidefiles import read_object
from .sparsity.execution import Execution, build_model_for, execution_mode
from .sparsity.execution.engine import PLAN_FILE
from .sparsity.flops import build_meter
from .sparsity.methods import Method, MethodContext, build_method, call_hook
from .sparsity.structure import Structure
from .train import distributed as dist_util
from .train.checkpoint import atomic_write_json, clean_stale_temporaries, fingerprint, is_checkpoint, load_checkpoint
from .train.logging import MetricSink, NullSink, wandb_run_config
from .train.optim import LRSchedule, build_optimizer
from .train.trainer import BEST, CHECKPOINT, Trainer, TrainPlan
from .validation import check

log = logging.getLogger("sparse_bench")

def validate(cfg: DictConfig) -> DictConfig:
    """The config checked before any data is read: the schema (types, known keys, ranges; see
    `sparse_bench.schema`) and the checks that look at several keys or at the environment.
    Returns the typed config; each failure is one line naming the key and the fix."""
    typed = check(cfg)
    check_run_name("run_name", typed.run_name)
    check_run_name("sweep_name", typed.sweep_name)
    lr = typed.schedule.lr
    if lr.kind == "step" and lr.step_size <= 0:
        raise ConfigError(f"schedule.lr.step_size={lr.step_size} must be a positive number of iterations for "
                          f"schedule.lr.kind=step")
    if typed.logger.name == "wandb":
        from .train.logging import wandb_mode

        wandb_mode(typed.logger.get("mode"))
    return typed


def job_threads(cfg) -> int | None:
    """torch threads for this job: `threads`, or the cores shared by a joblib sweep's parallel jobs."""
    if cfg.get("threads") is not None:
        return int(cfg.threads)
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except (ImportError, ValueError):
        return None
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_jobs = int(launcher.get("n_jobs", -1) or -1)
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one
    return max(1, cores // min(parallel, cores))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    name = str(name)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N") from None


def run_dir_of(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.paths.runs) / str(cfg.run_name)


def _sweep_label(task: list[str], cfg: DictConfig) -> str:
    """What a sweep is about, from its command line (`multirun.yaml`'s unexpanded overrides):
    the experiment, else dataset-model-method (values not on the command line come from the
    config, where every job agrees)."""
    given = {}
    for o in task:
        key, _, value = o.partition("=")
        given[key.lstrip("+~")] = value
    if given.get("experiment"):
        return given["experiment"]
    parts = []
    for key in ("dataset", "model", "method"):
        value = given.get(key) or str(cfg[key].name)
        names = value.split(",")
        parts.append(",".join(names[:3]) + (f"+{len(names) - 3}" if len(names) > 3 else ""))
    return "-".join(parts)


def sweep_group(cfg: DictConfig | None = None) -> str | None:
    """The W&B group of a multirun job, None for single runs: `sweep_name` when it was given,
    else what the sweep runs followed by its time stamp (e.g. `sm_mnist_lenet300_100-2025-01-01_10-00-00`)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
    except (ImportError, ValueError):
        return None
    sweep_dir = Path(hc.sweep.dir)
    task = list(hc.overrides.task or [])
    try:
        saved = OmegaConf.load(sweep_dir / "multirun.yaml")
        task = list(saved.hydra.overrides.task)
    except Exception:  # no multirun.yaml (a launcher that does not write one): the job's overrides
        pass
    if any(o.split("=", 1)[0].lstrip("+~") == "sweep_name" for o in task) or cfg is None:
        return sweep_dir.name
    return f"{_sweep_label(task, cfg)}-{sweep_dir.name}"



def _changes(old: dict, new: dict) -> list[str]:
    """How the run in a folder differs from this one, in the keys that define a run."""
    return [f"{k}: {shown(a)} -> {shown(b)}" for k, a, b in diff(run_identity(old), run_identity(new))]


# files this tool writes into a run folder (resume=false removes these, and only these)
OWN_FILES = (CHECKPOINT, BEST, "results.json", "metrics.jsonl", "wandb_id.txt", "wandb_step.txt", "provenance.json",
             "config.json", "config.yaml", PLAN_FILE, "eval.json", "eval-best.json")
# the first file this tool writes into every run folder it makes or uses: the folder is its own
MARKER = ".sparse_bench"


def check_run_name(key: str, name: str) -> None:
    """A run or sweep name is a relative path that stays inside its parent folder."""
    parts = Path(str(name)).parts
    if not parts or not str(name).strip() or Path(str(name)).is_absolute() or ".." in parts:
        raise ConfigError(f"{key}={name!r} must be a plain name (or a relative path without '..') that "
                          f"stays inside paths.runs; pass e.g. {key}=my-run")


def check_place(folder: Path, key: str, within: Path | None = None) -> None:
    """Before anything is created: `folder` (a run or sweep folder, named by `key`) can be made
    and written. It stays inside `within` (``paths.runs``), every name in it fits the file
    system's limit, no file stands where a folder is needed, and the nearest folder that exists
    takes a new folder (probed by making and removing one). One line naming the path otherwise."""
    folder = Path(os.path.abspath(folder))
    fix = "choose a writable folder with paths.runs=DIR"
    if within is not None:
        root = Path(os.path.abspath(within))
        if folder != root and root not in folder.parents:
            raise ConfigError(f"{key}={folder} is outside paths.runs={root}; runs stay under paths.runs: set "
                              f"paths.runs=DIR (and run_name=NAME or sweep_name=NAME) instead")
    place = folder
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise ConfigError(f"cannot create {folder}: {place} is a file, not a folder; {fix}")
    try:
        name_max, path_max = os.pathconf(place, "PC_NAME_MAX"), os.pathconf(place, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for part in folder.relative_to(place).parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"cannot create a folder named {part[:40]}... under {place}: the name is "
                              f"{len(os.fsencode(part))} bytes, more than the {name_max} the file system allows; "
                              f"choose a shorter run_name (or sweep_name)")
    if len(os.fsencode(str(folder))) >= path_max:
        raise ConfigError(f"cannot create {str(folder)[:60]}...: the path is longer than the {path_max} bytes its "
                          f"file system allows; choose a shorter paths.runs or run_name")
    from .train.checkpoint import describe_os_error

    try:  # what exists takes a new folder (root bypasses permission bits, so only trying tells)
        os.rmdir(tempfile.mkdtemp(prefix=".sparse_bench-probe-", dir=place))
    except OSError as exc:
        why = "it takes no new folders" if exc.errno == errno.ENOENT else describe_os_error(exc)
        raise ConfigError(f"cannot create {folder}: {why} ({place}); {fix}") from None


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder, make sure this process can write there (one line if not), and mark
    it as this tool's (``MARKER``, the first file written into it)."""
    from .train.checkpoint import describe_os_error

    check_place(run_dir, "the run folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / MARKER).write_text("a run folder of sparse_bench: it may remove the files it wrote here\n")
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder {run_dir}: {describe_os_error(exc)}; choose a "
                          f"writable folder with paths.runs=DIR") from None


def record_failure(run_dir: Path, resolved: dict, message: str, epochs_done: int | None = None) -> None:
    """results.json with status failed and the reason (never over a finished run's results, nor
    over the record of this same failure that the run itself wrote with its resolved config)."""
    path = run_dir / "results.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
        if old.get("status") == "complete" or (old.get("status") == "failed" and old.get("error") == message):
            return
    except (OSError, ValueError):
        pass
    try:
        atomic_write_json(path, {"status": "failed", "error": message, "config": resolved,
                                 "epochs": epochs_done})
    except (ConfigError, RunFailed, OSError):
        pass  # the folder itself is what failed; the message still reaches the console and log


def written_here(run_dir: Path) -> bool:
    """Whether this tool wrote the files in `run_dir`: its marker (the first file it writes into
    every run folder), a provenance.json of its own, or a checkpoint with its header."""
    if (run_dir / MARKER).is_file():
        return True
    prov = read_object(run_dir / "provenance.json", required=False)
    if isinstance(prov, dict) and "sparse_bench" in (prov.get("versions") or {}):
        return True
    return is_checkpoint(run_dir / CHECKPOINT)


def _check_foreign(run_dir: Path, ours: bool) -> None:
    """Files with this tool's names in a folder it did not write are never read as its own nor
    overwritten (resume=auto or false alike): one line, and nothing is touched."""
    present = [n for n in OWN_FILES if (run_dir / n).exists()] + (["wandb/"] if (run_dir / "wandb").exists() else [])
    if present and not ours:
        raise ConfigError(f"run folder {run_dir} holds {', '.join(present[:4])} that this tool did not write (no "
                          f"{MARKER}, provenance.json or checkpoint of its own); choose another run_name or move "
                          f"those files away")


def _start_over(run_dir: Path) -> None:
    """resume=false: remove what an earlier run of this tool left in this exact folder (the caller
    has made sure the folder is this tool's)."""
    for name in OWN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "wandb", ignore_errors=True)


LOCK = ".sparse_bench.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path, main: bool):
    """Hold an exclusive lock on the run folder: two processes given the same run (identical
    jobs of a parallel sweep) take turns, and the second finds the first one's results.

    The lock is a file in the folder, and a run refused at start removes the folder it made
    (lock included) while others may wait on it: a process that gets the lock checks that its
    file is still the one in the folder, and if not (removed, or made again by a third process)
    makes the folder again and waits on the lock that is there now, so two processes never hold
    one folder at once."""
    if not main:
        yield
        return
    path = run_dir / LOCK
    said = False
    while True:
        if not (run_dir / MARKER).exists():  # removed while this process waited: made again
            prepare_run_dir(run_dir)
            _reopen_logs(run_dir)
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not said:
                log.info(f"another process is running {run_dir}; waiting for it to finish")
                said = True
            fcntl.flock(f, fcntl.LOCK_EX)
        held = os.fstat(f.fileno())
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        if here is not None and (here.st_ino, here.st_dev) == (held.st_ino, held.st_dev):
            break
        f.close()  # a lock on a file no longer in the folder locks nothing: take the current one
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _reopen_logs(run_dir: Path) -> None:
    """A run folder removed while this process waited for its lock is made again; log files this
    process had open in it are opened again, so its log is not written into a removed file."""
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            if not Path(handler.baseFilename).exists():
                handler.acquire()
                try:
                    if handler.stream is not None:
                        handler.stream.close()
                    handler.stream = handler._open()
                finally:
                    handler.release()


def run(cfg: DictConfig, on_refused=None) -> dict:
    """Train one configuration; return the final test metrics. `on_refused(run_dir)` runs when the
    run is refused (ConfigError) while it still holds the folder's lock (the command line removes
    a folder it made for a run refused at start)."""
    cfg = validate(cfg)
    run_dir = run_dir_of(cfg)
    ours = written_here(run_dir)
    _check_foreign(run_dir, ours)  # before anything (a marker, a lock) is written into their folder
    prepare_run_dir(run_dir)
    with run_lock(run_dir, dist_util.from_env().is_main):
        try:
            return _run(cfg, run_dir)
        except ConfigError:
            if on_refused is not None:
                on_refused(run_dir)
            raise


def _finished(path: Path) -> dict | None:
    """A finished run's results.json (None if there is none or the run did not finish), every
    part the resume decision reads checked: one line naming the file otherwise."""
    fix = "remove it (a checkpoint beside it resumes the run) or pass resume=false to start over"
    done = read_object(path, fix=fix)
    if done is None or done.get("status") != "complete":
        return None
    if not isinstance(done.get("config"), dict) or not isinstance(done.get("final"), dict):
        raise ConfigError(f"{path} says complete but holds no config or final metrics; {fix}")
    return done


@dataclass
class Parts:
    """Everything one run trains with, built by :func:`build_parts` in a fixed order (the order of
    the seeded draws: data, then the model, then the method's set-up)."""

    dist: dist_util.Dist
    device: torch.device
    data: DataBundle
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    method: Method
    execution: Execution  # masked or sparse layers (execution=...): a hook run around the method's hooks
    trainer: Trainer
    rule: dict  # which parameters are prunable (``prunable``)
    density: float
    state: dict | None = None  # the checkpoint to resume from (dropped once restored)
    start: Start | None = None  # init_from: the weights the model started from (None: a random start)
    start_masks: bool = False  # init_from_masks: the method's first masks replaced by the start's


def _run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.perf_counter()
    clean_stale_temporaries(run_dir, (CHECKPOINT, BEST, "results.json", "config.json"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    done = decide_resume(cfg, run_dir, resolved)
    if done is not None:
        return done
    parts = build_parts(cfg, run_dir, resolved)
    start_or_resume(parts, run_dir)
    prov = record_config(cfg, resolved, parts, run_dir)
    return fit_and_record(cfg, resolved, parts, prov, run_dir, started)


def decide_resume(cfg: DictConfig, run_dir: Path, resolved: dict) -> dict | None:
    """What the folder holds decides: a finished run of this config returns its final metrics;
    a finished or started run of another config is refused; ``resume=false`` starts over.
    None: train (from the checkpoint, if there is one)."""
    resume = str(cfg.resume).lower()
    results_path, ckpt_path = run_dir / "results.json", run_dir / CHECKPOINT
    if resume == "false":
        _start_over(run_dir)
    elif (done := _finished(results_path)) is not None:
        changed = _changes(done["config"], resolved)
        if not changed:
            log.info(f"run already complete: {results_path} (test/acc "
                     f"{done['final'].get('test/acc')}); pass resume=false to train again")
            return done["final"]
        raise ConfigError(
            f"run folder {run_dir} holds a finished run with another config ({'; '.join(changed[:3])}); "
            f"pass run_name=NEW for a new folder, or resume=false to replace it")
    if resume != "false" and ckpt_path.exists():
        old_cfg = read_object(run_dir / "config.json",
                              fix="remove the run folder's config.json and checkpoint.pt, or pass resume=false")
        if old_cfg is not None:
            changed = _changes(old_cfg, resolved)
            if changed:
                raise ConfigError(
                    f"run folder {run_dir} holds a run with another config ({'; '.join(changed[:3])}); "
                    f"pass resume=false to start over there, or run_name=NEW for a new folder"
                )
    elif resume == "true":
        raise ConfigError(f"resume=true but there is no {CHECKPOINT} in {run_dir}; drop resume=true to start a new run")
    return None


def _saved_state(cfg: DictConfig, run_dir: Path, device: torch.device, config_fp: str, state: dict | None
                 ) -> tuple[dict | None, Start | None]:
    """The checkpoint to resume from (`state` when given, else the run folder's unless resume=false)
    and, for a fresh run, the weights ``init_from`` names: both read and checked before any data."""
    ckpt_path = run_dir / CHECKPOINT
    if state is None and str(cfg.resume).lower() != "false" and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device, config_fingerprint=config_fp)
    start = read_start(cfg.init_from) if cfg.get("init_from") and state is None else None
    if start is not None and cfg.init_from_masks and not start.masks:
        raise ConfigError(f"init_from_masks=true but init_from={start.path} holds no masks (a plain state dict); pass "
                          f"a run folder, checkpoint or export of this tool, or set init_from_masks=false")
    return state, start


def _best_metric(cfg: DictConfig, data: DataBundle) -> str:
    """What the best epoch is chosen by (``optimized_metric``, else val/acc), refused in one line
    before a single step when it needs a validation split the data set does not hold out."""
    metric = cfg.get("optimized_metric")
    fix = f"set e.g. dataset.val_fraction=0.1 (dataset={cfg.dataset.name} holds none out)"
    if metric and str(metric).startswith("val/") and data.val is None:
        raise ConfigError(f"optimized_metric={metric} needs a validation split; {fix}")
    best = str(metric or "val/acc")
    if cfg.checkpoint.keep_best and best.startswith("val/") and data.val is None:
        raise ConfigError(f"checkpoint.keep_best=true chooses the best epoch by {best}, which needs a validation "
                          f"split; {fix}")
    return best


def build_parts(cfg: DictConfig, run_dir: Path, resolved: dict, state: dict | None = None) -> Parts:
    """Threads, device and process group, then data, model, optimizer, schedule, method, its
    execution and the trainer, each seeded as before; a checkpoint to resume from is loaded (and
    refused if corrupt, foreign or of another config) before any data is read, and so is the file
    a fresh run starts from (``init_from``). `state`: a checkpoint already read (sparse-bench-eval)."""
    seed = int(cfg.seed)
    threads = job_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    dist = dist_util.from_env()
    device = pick_device(cfg.device, dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config_fp = fingerprint(run_identity(resolved))
    ckpt_state, start = _saved_state(cfg, run_dir, device, config_fp, state)
    dist_util.init(dist, device)
    density = float(cfg.density)
    torch.manual_seed(seed)
    data = build_data(cfg.dataset, device, seed)
    best_metric = _best_metric(cfg, data)
    torch.manual_seed(seed)
    rule = OmegaConf.to_container(cfg.prunable, resolve=True)
    # as build_model(...).to(device); under execution=sparse a layer too big to hold densely gets no dense weight
    model = build_model_for(execution_mode(cfg), lambda: build_model(cfg.model, data.input_shape, data.num_classes),
                            device, rule)
    if start is not None:
        load_into(model, start)  # names and shapes checked: one line naming the first that differ
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # 4-d weights only; the parameters stay the same objects
    optimizer = build_optimizer(cfg.optimizer, model)

    multiplier = float(cfg.schedule.get("multiplier", 1))
    epochs = max(1, int(round(cfg.schedule.epochs * multiplier)))
    limit = cfg.get("limit_train_batches")
    steps_per_epoch = len(data.train) if limit is None else min(len(data.train), int(limit))
    lr_schedule = LRSchedule(cfg.schedule, float(cfg.optimizer.lr), steps_per_epoch, epochs, multiplier)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.loss.get("label_smoothing", 0.0)))

    def batches(n: int, key: int):
        # statistics batches from their own seeded stream: never the epoch in progress
        return data.train.draw(n, key)

    ctx = MethodContext(model=model, optimizer=optimizer, density=density, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, device=device,
                        generator=torch.Generator().manual_seed(seed + 1), prunable=rule, batches=batches,
                        loss_fn=loss_fn, multiplier=multiplier, structure=Structure.from_config(cfg.get("structure")))
    method = build_method(cfg.method, ctx)
    flops = build_meter(model, data.input_shape, method, device)
    # masked or sparse layers (execution=...): runs around the method's hooks, converts layers after setup
    # execution=auto: one measured plan per configuration (recipe, density, device kind) under paths.runs
    shared_plan = Path(cfg.paths.runs) / ".execution-plans" / (
        fingerprint({"recipe": recipe(resolved), "density": density, "device": device.type})[:24] + ".json")
    execution = Execution(method, execution_mode(cfg), optimizer, model, dist, run_dir, batches, loss_fn, shared_plan)
    plan = TrainPlan(epochs=epochs * method.rounds, steps_per_epoch=steps_per_epoch,
                     base_epochs=int(cfg.schedule.epochs),
                     train_eval_samples=int(cfg.eval.get("train_samples", 0) or 0),
                     test_every_epoch=bool(cfg.eval.get("test_every_epoch", False)),
                     ema_decay=cfg.eval.get("ema_decay"), best_metric=best_metric,
                     keep_best=bool(cfg.checkpoint.keep_best), test_on=str(cfg.eval.test_on),
                     precision=str(cfg.precision), clip_grad_norm=cfg.optimizer.get("clip_grad_norm"),
                     channels_last=bool(cfg.channels_last), compile=bool(cfg.compile),
                     compile_backend=str(cfg.compile_backend),
                     log_every=int(cfg.get("log_every", 0) or 0), progress=bool(cfg.progress), fingerprint=config_fp)
    trainer = Trainer(model, optimizer, lr_schedule, method, data, device, loss_fn, run_dir, plan, dist=dist,
                      flops=flops, hooks=[execution])
    # what a checkpoint carries to be evaluated, exported or started from without this run's folder
    trainer.run_info = {"config": resolved, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                        "prunable": _prunable(method)["prunable"]}
    if start is not None and cfg.init_from_masks and method.masks is None:
        raise ConfigError(f"init_from_masks=true with method={cfg.method.name}, which has no masks; set "
                          f"init_from_masks=false or choose a sparse method")
    return Parts(dist, device, data, model, optimizer, method, execution, trainer, rule, density, ckpt_state,
                 start, bool(start is not None and cfg.init_from_masks))


def start_or_resume(parts: Parts, run_dir: Path, quiet: bool = False) -> None:
    """Restore the checkpoint's state, or run the method's set-up (masks drawn, or taken from
    ``init_from`` with ``init_from_masks``; broadcast to every rank); under torchrun, wrap the
    model in DDP."""
    method, trainer, dist = parts.method, parts.trainer, parts.dist
    state, parts.state = parts.state, None
    if state is not None:
        parts.execution.convert(resume=True)
        trainer.load_state(state)
        del state
        if dist.is_main and not quiet:
            log.info(f"resuming {run_dir} after epoch {trainer.epoch} (step {trainer.step})")
    else:
        first = [StartMasks(parts.start, method)] if parts.start_masks else []
        setup_logs = call_hook(method, [*first, *trainer.hooks], "setup") or {}
        dist_util.broadcast_masks(method, parts.optimizer, dist)
        if setup_logs and dist.is_main:
            log.info(" | ".join(f"{k} {v}" for k, v in setup_logs.items()))
    if dist.enabled:
        parts.execution.prepare_ddp(parts.model)
        trainer.train_model = DistributedDataParallel(
            parts.model, device_ids=[parts.device.index] if parts.device.type == "cuda" else None)


def record_config(cfg: DictConfig, resolved: dict, parts: Parts, run_dir: Path) -> dict:
    """Write the run's config and provenance (main process) and say in one line what trains;
    return the provenance (empty on the other ranks)."""
    dist, method = parts.dist, parts.method
    prov = make_provenance(resolved) if dist.is_main else {}
    if not dist.is_main:
        return prov
    if parts.start is not None:
        prov["init_from"] = parts.start.record(parts.start_masks)
        log.info(f"init_from {parts.start.path} ({parts.start.kind}, sha256 {parts.start.sha256[:12]})"
                 + (", with its masks" if parts.start_masks else ""))
    atomic_write_json(run_dir / "config.json", resolved)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_json(run_dir / "provenance.json", prov)
    if prov.get("recipe_departures"):
        log.info(f"experiment={prov['experiment']} with departures from its recipe: "
                 f"{', '.join(prov['recipe_departures'])}; tables show this run in its own row")
    prunable = _prunable(method)
    sparsity = (f"density {parts.density} over {prunable['total']} prunable weights in "
                f"{len(prunable['prunable'])} tensors" if method.masks is not None else "dense (no masks)")
    log.info(f"run folder {run_dir} | {cfg.method.name} on {cfg.model.name}/{cfg.dataset.name} | "
             f"{sparsity} | {parts.trainer.epochs} epochs x {parts.trainer.max_steps} steps | {parts.device}"
             + (f" x {dist.world} processes" if dist.enabled else "")
             + f" | {torch.get_num_threads()} threads")
    return prov


def _prunable(method) -> dict:
    return method.masks.describe() if method.masks is not None else {"prunable": {}, "total": 0}


def fit_and_record(cfg: DictConfig, resolved: dict, parts: Parts, prov: dict, run_dir: Path, started: float) -> dict:
    """Train to the end with the run's metric sink, then write results.json (main process); a run
    that fails records why in results.json. Returns the final metrics."""
    dist, method, trainer = parts.dist, parts.method, parts.trainer
    tags = [f"method:{cfg.method.name}", f"density:{parts.density}", f"model:{model_label(resolved)}",
            f"dataset:{cfg.dataset.name}"] + ([f"experiment:{prov['experiment']}"] if prov.get("experiment") else [])
    sink = (MetricSink(run_dir, cfg.logger, str(cfg.run_name), sweep_group(cfg), tags,
                       wandb_run_config(resolved, prov, parts.rule), resume_epoch=trainer.epoch)
            if dist.is_main else NullSink())
    ok = False
    try:
        try:
            final = trainer.fit(sink)
        except Exception as exc:
            if dist.is_main:
                text = str(exc) if isinstance(exc, (RunFailed, ConfigError)) else f"{type(exc).__name__}: {exc}"
                record_failure(run_dir, resolved, text, trainer.epoch)
            raise
        if dist.is_main:
            target = parts.density if method.masks is not None else 1.0
            out = write_results(run_dir, resolved, final, trainer, _prunable(method), target, prov, sink, started)
        else:
            out = {k: final[k] for k in ("test/acc", "test/loss", "density/achieved")}
        ok = True
        return out
    finally:
        sink.finish(exit_code=0 if ok else 1)
        # the DDP wrapper's reducer holds the process group: drop it first, so destroying the
        # group really joins Gloo's threads now and not during interpreter teardown (an abort)
        trainer.train_model = parts.model
        dist_util.shutdown(dist, wait=ok)
