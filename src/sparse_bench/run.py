"""`run(cfg)`: build data, model, optimizer, method; train; write results.json."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .data import build_data
from .errors import ConfigError, RunFailed
from .identity import UNSET, diff, recipe, run_identity
from .tables import model_label, paper_comparison
from .models import build_model
from .provenance import provenance as make_provenance
from .sparsity.flops import build_meter
from .sparsity.execution import Execution, build_model_for, execution_mode
from .sparsity.methods import MethodContext, build_method
from .train.checkpoint import atomic_write_json, clean_stale_temporaries, fingerprint, load_checkpoint
from .train import distributed as dist_util
from .train.logging import MetricSink, NullSink, wandb_run_config
from .train.optim import LRSchedule, build_optimizer
from .train.trainer import CHECKPOINT, Trainer

log = logging.getLogger("sparse_bench")

def validate(cfg: DictConfig) -> DictConfig:
    """The config checked before any data is read: the schema (types, known keys, ranges; see
    `sparse_bench.schema`) and the checks that look at several keys or at the environment.
    Returns the typed config; each failure is one line naming the key and the fix."""
    from .schema import check

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
    return [f"{k}: {_shown(a)} -> {_shown(b)}" for k, a, b in diff(run_identity(old), run_identity(new))]


def _shown(value) -> str:
    return "(unset)" if value is UNSET else repr(value)


# files this tool writes into a run folder (resume=false removes these, and only these)
OWN_FILES = (CHECKPOINT, "results.json", "metrics.jsonl", "wandb_id.txt", "wandb_step.txt", "provenance.json",
             "config.json", "config.yaml")


def check_run_name(key: str, name: str) -> None:
    """A run or sweep name is a relative path that stays inside its parent folder."""
    parts = Path(str(name)).parts
    if not parts or not str(name).strip() or Path(str(name)).is_absolute() or ".." in parts:
        raise ConfigError(f"{key}={name!r} must be a plain name (or a relative path without '..') that "
                          f"stays inside paths.runs; pass e.g. {key}=my-run")


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run folder and make sure this process can write there (one line if not)."""
    from .train.checkpoint import describe_os_error

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
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


def _start_over(run_dir: Path) -> None:
    """resume=false: remove what an earlier run of this tool left in this exact folder."""
    if not (run_dir / "config.json").exists() and not (run_dir / CHECKPOINT).exists():
        return  # not one of our run folders (or empty): touch nothing
    ours_wandb = (run_dir / "wandb_id.txt").exists()  # the W&B folder is ours only with our id file
    for name in OWN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    if ours_wandb:
        shutil.rmtree(run_dir / "wandb", ignore_errors=True)


@contextlib.contextmanager
def run_lock(run_dir: Path, main: bool):
    """Hold an exclusive lock on the run folder: two processes given the same run (identical
    jobs of a parallel sweep) take turns, and the second finds the first one's results."""
    if not main:
        yield
        return
    with open(run_dir / ".sparse_bench.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info(f"another process is running {run_dir}; waiting for it to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(cfg: DictConfig) -> dict:
    """Train one configuration; return the final test metrics."""
    cfg = validate(cfg)
    run_dir = run_dir_of(cfg)
    prepare_run_dir(run_dir)
    with run_lock(run_dir, dist_util.from_env().is_main):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict:
    t_start = time.perf_counter()
    clean_stale_temporaries(run_dir, (CHECKPOINT, "results.json", "config.json"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    config_fp = fingerprint(run_identity(resolved))
    results_path = run_dir / "results.json"
    ckpt_path = run_dir / CHECKPOINT
    resume = str(cfg.resume).lower()

    if resume == "false":
        _start_over(run_dir)
    elif results_path.exists():
        try:
            done = json.loads(results_path.read_text())
        except ValueError:
            done = {}
        if done.get("status") == "complete":
            changed = _changes(done.get("config", {}), resolved)
            if not changed:
                log.info(f"run already complete: {results_path} (test/acc "
                         f"{done['final'].get('test/acc')}); pass resume=false to train again")
                return done["final"]
            raise ConfigError(
                f"run folder {run_dir} holds a finished run with another config ({'; '.join(changed[:3])}); "
                f"pass run_name=NEW for a new folder, or resume=false to replace it")
    if resume != "false" and ckpt_path.exists():
        old_cfg = run_dir / "config.json"
        if old_cfg.exists():
            changed = _changes(json.loads(old_cfg.read_text()), resolved)
            if changed:
                raise ConfigError(
                    f"run folder {run_dir} holds a run with another config ({'; '.join(changed[:3])}); "
                    f"pass resume=false to start over there, or run_name=NEW for a new folder"
                )
    elif resume == "true":
        raise ConfigError(f"resume=true but there is no {CHECKPOINT} in {run_dir}; drop resume=true to start a new run")

    seed = int(cfg.seed)
    threads = job_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    dist = dist_util.from_env()
    device = pick_device(cfg.device, dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a corrupt, foreign or mismatched checkpoint is refused before any data is read
    ckpt_state = (load_checkpoint(ckpt_path, map_location=device, config_fingerprint=config_fp)
                  if resume != "false" and ckpt_path.exists() else None)
    dist_util.init(dist, device)
    density = float(cfg.density)
    torch.manual_seed(seed)
    data = build_data(cfg.dataset, device, seed)
    torch.manual_seed(seed)
    rule = OmegaConf.to_container(cfg.prunable, resolve=True)
    rule["exclude"] = list(rule.get("exclude", [])) + list(cfg.model.get("dense_params", []) or [])
    # as build_model(...).to(device); under execution=sparse a layer too big to hold densely gets no dense weight
    model = build_model_for(execution_mode(cfg), lambda: build_model(cfg.model, data.input_shape, data.num_classes),
                            device, rule)
    optimizer = build_optimizer(cfg.optimizer, model)

    multiplier = float(cfg.schedule.get("multiplier", 1))
    epochs = max(1, int(round(cfg.schedule.epochs * multiplier)))
    if len(data.train) == 0:
        n = getattr(data.train, "num_samples", 0)
        raise ConfigError(f"the training split of dataset={cfg.dataset.name} holds no samples; check dataset.root"
                          if not n else
                          f"the training split ({n} samples) holds no whole batch of dataset.batch_size="
                          f"{cfg.dataset.batch_size} with dataset.drop_last=true; lower dataset.batch_size or set "
                          f"dataset.drop_last=false")
    limit = cfg.get("limit_train_batches")
    steps_per_epoch = len(data.train) if limit is None else min(len(data.train), int(limit))
    lr_schedule = LRSchedule(cfg.schedule, float(cfg.optimizer.lr), steps_per_epoch, epochs, multiplier)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.loss.get("label_smoothing", 0.0)))

    generator = torch.Generator().manual_seed(seed + 1)

    def batches(n: int, key: int):
        # statistics batches from their own seeded stream: never the epoch in progress
        return data.train.draw(n, key)

    ctx = MethodContext(model=model, optimizer=optimizer, density=density, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, device=device, generator=generator,
                        prunable=rule, batches=batches, loss_fn=loss_fn, multiplier=multiplier)
    method = build_method(cfg.method, ctx)
    flops = build_meter(model, data.input_shape, method, device)
    # masked or sparse layers (execution=...): wraps the method's hooks, converts layers after setup
    # execution=auto: one measured plan per configuration (recipe, density, device kind) under paths.runs
    shared_plan = Path(cfg.paths.runs) / ".execution-plans" / (
        fingerprint({"recipe": recipe(resolved), "density": density, "device": device.type})[:24] + ".json")
    method = Execution(method, execution_mode(cfg), optimizer, model, dist, run_dir, batches, loss_fn, shared_plan)
    trainer = Trainer(model, optimizer, lr_schedule, method, data, device, epochs * method.rounds, loss_fn,
                      run_dir, progress=bool(cfg.progress), max_steps_per_epoch=steps_per_epoch, dist=dist,
                      train_eval_samples=int(cfg.eval.get("train_samples", 0) or 0),
                      test_every_epoch=bool(cfg.eval.get("test_every_epoch", False)),
                      fingerprint=config_fp, log_every=int(cfg.get("log_every", 0) or 0), flops=flops,
                      base_epochs=int(cfg.schedule.epochs))

    if ckpt_state is not None:
        method.convert(resume=True)
        trainer.load_state(ckpt_state)
        del ckpt_state
        if dist.is_main:
            log.info(f"resuming {run_dir} after epoch {trainer.epoch} (step {trainer.step})")
    else:
        setup_logs = method.setup() or {}
        dist_util.broadcast_masks(method, optimizer, dist)
        if setup_logs and dist.is_main:
            log.info(" | ".join(f"{k} {v}" for k, v in setup_logs.items()))
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        method.prepare_ddp(model)

        trainer.train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    prov = make_provenance(resolved) if dist.is_main else {}
    if dist.is_main:
        atomic_write_json(run_dir / "config.json", resolved)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(run_dir / "provenance.json", prov)
        if prov.get("recipe_departures"):
            log.info(f"experiment={prov['experiment']} with departures from its recipe: "
                     f"{', '.join(prov['recipe_departures'])}; tables show this run in its own row")

    prunable = method.masks.describe() if method.masks is not None else {"prunable": {}, "total": 0}
    if dist.is_main:
        sparsity = (f"density {density} over {prunable['total']} prunable weights in "
                    f"{len(prunable['prunable'])} tensors" if method.masks is not None else "dense (no masks)")
        log.info(f"run folder {run_dir} | {cfg.method.name} on {cfg.model.name}/{cfg.dataset.name} | "
                 f"{sparsity} | {epochs * method.rounds} epochs x "
                 f"{steps_per_epoch} steps | {device}" + (f" x {dist.world} processes" if dist.enabled else "")
                 + f" | {torch.get_num_threads()} threads")

    tags = [f"method:{cfg.method.name}", f"density:{density}", f"model:{model_label(resolved)}",
            f"dataset:{cfg.dataset.name}"]
    if prov.get("experiment"):
        tags.append(f"experiment:{prov['experiment']}")
    wandb_config = wandb_run_config(resolved, prov, rule)
    sink = (MetricSink(run_dir, cfg.logger, str(cfg.run_name), sweep_group(cfg), tags, wandb_config,
                       resume_epoch=trainer.epoch) if dist.is_main else NullSink())
    ok = False
    try:
        try:
            final = trainer.fit(sink)
        except Exception as exc:
            if dist.is_main:
                text = str(exc) if isinstance(exc, (RunFailed, ConfigError)) else f"{type(exc).__name__}: {exc}"
                record_failure(run_dir, resolved, text, trainer.epoch)
            raise
        if not dist.is_main:
            ok = True
            return {"test/acc": final["test/acc"], "test/loss": final["test/loss"],
                    "density/achieved": final["density/achieved"]}
        last_train = {}
        metrics_file = run_dir / "metrics.jsonl"
        for line in metrics_file.read_text().splitlines():
            rec = json.loads(line)
            if "train/loss" in rec:
                last_train = rec
        final_metrics = {
            "test/acc": final["test/acc"],
            "test/loss": final["test/loss"],
            "train/loss": last_train.get("train/loss"),
            "train/acc": last_train.get("train/acc"),
            "val/acc": last_train.get("val/acc"),
            "density/achieved": final["density/achieved"],
        }
        flop_figures = trainer.flop_summary()
        per_layer = {k[len("density/"):]: v for k, v in final.items()
                     if k.startswith("density/") and k != "density/achieved"}
        paper = paper_comparison(resolved, final["test/acc"], prov.get("recipe_departures"))
        results = {
            "status": "complete",
            "config": resolved,
            "final": final_metrics,
            "best": trainer.best,
            "density": {
                "target": density if method.masks is not None else 1.0,
                "achieved": final["density/achieved"],
                "per_layer": per_layer,
            },
            "flops": {k[len("flops/"):]: v for k, v in flop_figures.items()},
            "paper": paper,
            "prunable": prunable,
            "epochs": trainer.epoch,
            "steps": trainer.step,
            "train_time_s": trainer.train_time,
            "wall_time_s": time.perf_counter() - t_start,
            "wandb": sink.wandb_info,
            "provenance": prov,
        }
        atomic_write_json(results_path, results)
        sink.summary({**final_metrics, **{k: v for k, v in flop_figures.items() if v is not None},
                      **{f"paper/{k}": v for k, v in (paper or {}).items()},
                      "experiment": prov.get("experiment")})
        shapes = prunable["prunable"]
        rows = []
        for name, d in per_layer.items():
            shape = [int(x) for x in shapes.get(name, [])]
            rows.append([name, "x".join(map(str, shape)), math.prod(shape), round(d * math.prod(shape)), d])
        sink.table("density/final_per_layer", ["layer", "shape", "weights", "active", "density"], rows)
        ok = True
        return final_metrics
    finally:
        sink.finish(exit_code=0 if ok else 1)
        # the DDP wrapper's reducer holds the process group: drop it first, so destroying the
        # group really joins Gloo's threads now and not during interpreter teardown (an abort)
        trainer.train_model = model
        dist_util.shutdown(dist, wait=ok)
