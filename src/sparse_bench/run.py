"""`run(cfg)`: build data, model, optimizer, method; train; write results.json."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .data import build_data
from .errors import ConfigError
from .models import build_model
from .sparsity.execution import Execution, build_model_for, execution_mode
from .sparsity.methods import MethodContext, build_method
from .train.checkpoint import atomic_write_json
from .train import distributed as dist_util
from .train.logging import MetricSink, NullSink
from .train.optim import LRSchedule, build_optimizer
from .train.trainer import CHECKPOINT, Trainer

log = logging.getLogger("sparse_bench")

# keys that may differ between a run and its resumption
_VOLATILE = ("resume", "logger", "progress", "device", "paths", "run_name", "sweep_name")


def _float(cfg, key: str) -> float:
    try:
        return float(cfg[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={cfg[key]!r} is not a number; pass e.g. {key}=0.05") from None


def validate(cfg: DictConfig) -> None:
    """Checks that need no data or model; each failure is one line naming the key and the fix."""
    density = _float(cfg, "density")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density={density} is outside (0, 1]; pass e.g. density=0.05")
    if str(cfg.resume) not in ("auto", "True", "False", "true", "false"):
        raise ConfigError(f"resume={cfg.resume} must be auto, true or false")
    epochs = cfg.schedule.get("epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"schedule.epochs={epochs} must be a positive whole number")
    mult = float(cfg.schedule.get("multiplier", 1))
    if mult <= 0:
        raise ConfigError(f"schedule.multiplier={mult} must be positive")
    limit = cfg.get("limit_train_batches")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit_train_batches={limit} must be null or a positive whole number")
    execution_mode(cfg)


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


def sweep_group() -> str | None:
    """The W&B group: the sweep folder's name for multirun jobs, None for single runs."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except (ImportError, ValueError):
        pass
    return None


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _VOLATILE}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def run(cfg: DictConfig) -> dict:
    """Train one configuration; return the final test metrics."""
    validate(cfg)
    t_start = time.perf_counter()
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    results_path = run_dir / "results.json"
    ckpt_path = run_dir / CHECKPOINT
    resume = str(cfg.resume).lower()

    if resume == "false":
        for name in (CHECKPOINT, "results.json", "metrics.jsonl", "wandb_id.txt"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "wandb", ignore_errors=True)
    elif results_path.exists():
        done = json.loads(results_path.read_text())
        if done.get("status") == "complete":
            changed = _diff(_comparable(done.get("config", {})), _comparable(resolved))
            if not changed:
                log.info(f"run already complete: {results_path} (test/acc "
                         f"{done['final'].get('test/acc')}); pass resume=false to train again")
                return done["final"]
    if resume != "false" and ckpt_path.exists():
        old_cfg = run_dir / "config.json"
        if old_cfg.exists():
            changed = _diff(_comparable(json.loads(old_cfg.read_text())), _comparable(resolved))
            if changed:
                raise ConfigError(
                    f"run folder {run_dir} holds a run with another config ({'; '.join(changed[:3])}); "
                    f"pass resume=false to start over there, or run_name=NEW for a new folder"
                )
    elif resume == "true":
        raise ConfigError(f"resume=true but there is no {CHECKPOINT} in {run_dir}; drop resume=true to start a new run")

    seed = int(cfg.seed)
    dist = dist_util.from_env()
    device = pick_device(cfg.device, dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
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
    limit = cfg.get("limit_train_batches")
    steps_per_epoch = len(data.train) if limit is None else min(len(data.train), int(limit))
    lr_schedule = LRSchedule(cfg.schedule, float(cfg.optimizer.lr), steps_per_epoch, epochs, multiplier)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(cfg.loss.get("label_smoothing", 0.0)))

    generator = torch.Generator().manual_seed(seed + 1)

    def batches(n: int) -> list:
        out = []
        for i, b in enumerate(data.train):
            if i >= n:
                break
            out.append(b)
        return out

    ctx = MethodContext(model=model, optimizer=optimizer, density=density, epochs=epochs,
                        steps_per_epoch=steps_per_epoch, device=device, generator=generator,
                        prunable=rule, batches=batches, loss_fn=loss_fn, multiplier=multiplier)
    method = build_method(cfg.method, ctx)
    # masked or sparse layers (execution=...): wraps the method's hooks, converts layers after setup
    method = Execution(method, execution_mode(cfg), optimizer, model, dist, run_dir, batches, loss_fn)
    trainer = Trainer(model, optimizer, lr_schedule, method, data, device, epochs * method.rounds, loss_fn,
                      run_dir, progress=bool(cfg.progress), max_steps_per_epoch=steps_per_epoch, dist=dist,
                      train_eval_samples=int(cfg.eval.get("train_samples", 0) or 0),
                      test_every_epoch=bool(cfg.eval.get("test_every_epoch", False)))

    if resume != "false" and ckpt_path.exists():
        method.convert(resume=True)
        trainer.load(ckpt_path)
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
    if dist.is_main:
        atomic_write_json(run_dir / "config.json", resolved)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    prunable = method.masks.describe() if method.masks is not None else {"prunable": {}, "total": 0}
    if dist.is_main:
        log.info(f"run folder {run_dir} | {cfg.method.name} on {cfg.model.name}/{cfg.dataset.name} | "
                 f"density {density} over {prunable['total']} prunable weights in "
                 f"{len(prunable['prunable'])} tensors | {epochs * method.rounds} epochs x "
                 f"{steps_per_epoch} steps | {device}" + (f" x {dist.world} processes" if dist.enabled else ""))

    tags = [f"method:{cfg.method.name}", f"density:{density}", f"model:{cfg.model.name}",
            f"dataset:{cfg.dataset.name}"]
    sink = (MetricSink(run_dir, cfg.logger, str(cfg.run_name), sweep_group(), tags, resolved,
                       resume_epoch=trainer.epoch) if dist.is_main else NullSink())
    ok = False
    try:
        final = trainer.fit(sink)
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
        results = {
            "status": "complete",
            "config": resolved,
            "final": final_metrics,
            "best": trainer.best,
            "density": {
                "target": density if method.masks is not None else 1.0,
                "achieved": final["density/achieved"],
                "per_layer": {k[len("density/"):]: v for k, v in final.items()
                              if k.startswith("density/") and k != "density/achieved"},
            },
            "prunable": prunable,
            "epochs": trainer.epoch,
            "steps": trainer.step,
            "train_time_s": trainer.train_time,
            "wall_time_s": time.perf_counter() - t_start,
            "wandb": sink.wandb_info,
        }
        atomic_write_json(results_path, results)
        sink.summary(final_metrics)
        ok = True
        return final_metrics
    finally:
        sink.finish(exit_code=0 if ok else 1)
        dist_util.shutdown(dist)
