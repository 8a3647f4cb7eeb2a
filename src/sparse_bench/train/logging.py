"""Where metrics go: metrics.jsonl in the run folder, the console, and Weights & Biases.

The same names are used everywhere: ``train/loss``, ``train/acc``, ``val/acc``, ``test/acc``,
``test/loss``, ``density/achieved``, ``density/<layer>``; accuracies are fractions.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import string
from pathlib import Path

log = logging.getLogger("sparse_bench")


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


WANDB_MODES = ("online", "offline", "disabled", "dryrun", "shared", "run")


def wandb_mode(cfg_mode) -> str:
    """Explicit `logger.mode`, else $WANDB_MODE, else online with credentials, offline without.

    An empty $WANDB_MODE counts as unset (and is removed, since wandb itself rejects it); a mode
    wandb does not know is refused with one line.
    """
    if "WANDB_MODE" in os.environ and not os.environ["WANDB_MODE"].strip():
        del os.environ["WANDB_MODE"]
    mode = str(cfg_mode) if cfg_mode else os.environ.get("WANDB_MODE")
    if mode:
        if mode not in WANDB_MODES:
            from ..errors import ConfigError

            where = "logger.mode" if cfg_mode else "the environment variable WANDB_MODE"
            raise ConfigError(f"{where}={mode} is not a W&B mode; use one of: {', '.join(WANDB_MODES)}")
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        hosts = netrc.netrc().hosts
        if any("wandb" in h for h in hosts):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class MetricSink:
    """Appends one JSON line per epoch and mirrors every record to W&B when enabled."""

    def __init__(self, run_dir: Path, logger_cfg, run_name: str, group: str | None, tags: list[str],
                 config: dict, resume_epoch: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.wandb_info: dict | None = None
        self._truncate(resume_epoch)
        name = str(logger_cfg.get("name", "none"))
        if name == "wandb":
            self._start_wandb(run_dir, logger_cfg, run_name, group, tags, config)
        elif name != "none":
            from ..errors import ConfigError

            raise ConfigError(f"logger={name} is unknown; choose one of: wandb, none")

    def _truncate(self, resume_epoch: int) -> None:
        """On resume drop records written after the checkpoint; on a fresh run start empty."""
        if not self.path.exists():
            return
        keep = []
        if resume_epoch > 0:
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("epoch", 0) <= resume_epoch and not rec.get("final"):
                    keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def _start_wandb(self, run_dir, cfg, run_name, group, tags, config) -> None:
        import wandb

        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else new_run_id()
        id_file.write_text(run_id + "\n")
        mode = wandb_mode(cfg.get("mode"))
        self.wandb = wandb.init(
            project=str(cfg.get("project", "sparse_bench")),
            entity=cfg.get("entity"),
            name=run_name,
            group=group,
            tags=[str(t) for t in tags] + [str(t) for t in (cfg.get("tags") or [])],
            config=config,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )
        self.wandb_info = {"id": run_id, "mode": mode, "project": self.wandb.project,
                           "group": group, "tags": list(self.wandb.tags or [])}
        self.wandb.define_metric("epoch")
        self.wandb.define_metric("*", step_metric="epoch")

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            finally:
                self.wandb = None


def console_line(rec: dict) -> str:
    parts = [f"epoch {rec['epoch']:>3}"]
    for key, fmt in (("train/loss", "{:.4f}"), ("train/acc", "{:.4f}"), ("train_eval/acc", "{:.4f}"),
                     ("val/loss", "{:.4f}"),
                     ("val/acc", "{:.4f}"), ("density/achieved", "{:.4f}"), ("lr", "{:.4g}"),
                     ("throughput/samples_per_s", "{:.0f}")):
        if key in rec:
            parts.append(f"{key} " + fmt.format(rec[key]))
    return " | ".join(parts)


class NullSink:
    """What ranks other than 0 log to: nothing."""

    wandb_info = None

    def log(self, record: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass
