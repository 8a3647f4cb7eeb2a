"""Where metrics go: metrics.jsonl in the run folder, the console, and Weights & Biases.

The same names are used everywhere: ``train/loss``, ``train/acc``, ``val/acc``, ``test/acc``,
``test/loss``, ``density/achieved``, ``density/<layer>``, ``flops/*``; accuracies are fractions.

Records are of three kinds: mask updates (``"update": true``), epochs, and the last one
(``"final": true``); each carries ``step`` (optimizer steps done) and ``epoch``. In W&B the
update keys, ``density/*`` and ``flops/*`` are charted over ``step``, everything else over
``epoch`` (``define_metric`` per key, the first time a key is logged). W&B's own step is a
counter of logged records kept in ``wandb_step.txt``, never reset, so the segments of a resumed
run append to one history (offline folders too, synced together).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import secrets
import string
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError

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


#: W&B's folders under the home folder, and the variables that move them
_WANDB_HOME = {"WANDB_CACHE_DIR": ".cache/wandb", "WANDB_CONFIG_DIR": ".config/wandb",
               "WANDB_DATA_DIR": ".local/share/wandb"}


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except (OSError, RuntimeError):
        return False


def _wandb_home(run_dir: Path) -> list[str]:
    """W&B keeps a cache, its settings and staged files under the home folder; where that is not
    writable (a cluster job's HOME, a container) and the user set no place of their own, they go
    into the run folder. Returns the variables it set."""
    moved = []
    for var, rel in _WANDB_HOME.items():
        if os.environ.get(var):
            continue
        try:
            default = Path.home() / rel
        except RuntimeError:  # no home folder at all
            default = None
        if default is None or not _writable(default):
            os.environ[var] = str(run_dir / "wandb" / ".home" / rel)
            moved.append(var)
    return moved


def wandb_run_config(resolved: dict, provenance: dict, prunable_rule: dict) -> dict:
    """W&B's config of a run: the resolved config plus what a reader filters by that is not a
    config key (:data:`WANDB_EXTRAS`, which the tables strip again)."""
    return {**resolved, "experiment": provenance.get("experiment"), "prunable_rule": prunable_rule,
            "recipe_departures": provenance.get("recipe_departures"),
            "git_commit": (provenance.get("git") or {}).get("commit")}


#: the keys :func:`wandb_run_config` adds to a run's config
WANDB_EXTRAS = ("experiment", "prunable_rule", "recipe_departures", "git_commit")

STEP_AXIS_PREFIXES = ("density/", "flops/")
FLAGS = ("update", "final")


class MetricSink:
    """Appends one JSON line per record and mirrors every record to W&B when enabled."""

    def __init__(self, run_dir: Path, logger_cfg, run_name: str, group: str | None, tags: list[str],
                 config: dict, resume_epoch: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.wandb_info: dict | None = None
        self._defined: set[str] = set()
        self._step_file = Path(run_dir) / "wandb_step.txt"
        self._wb_step = 0
        self._truncate(resume_epoch)
        name = str(logger_cfg.get("name", "none"))
        if name == "wandb":
            self._start_wandb(run_dir, logger_cfg, run_name, group, tags, config)
        elif name != "none":
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
                # an update record carries the epoch in progress: those of the epoch being redone go
                if rec.get("epoch", 0) <= resume_epoch and not rec.get("final"):
                    keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def _wandb_failed(self, what: str, exc: BaseException) -> None:
        """A W&B call failed: one warning line, and the run goes on without W&B (its records stay
        in metrics.jsonl and results.json; a finished run's status and exit code do not change)."""
        log.warning(f"W&B could not {what} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"the run goes on without W&B, its records are in {self.path.name}")
        if self.wandb_info is not None:
            self.wandb_info["error"] = f"{what}: {type(exc).__name__}"
        wb, self.wandb = self.wandb, None
        if wb is not None:
            try:
                wb.finish(exit_code=1, quiet=True)
            except Exception:  # noqa: BLE001 - already failing: nothing more to say
                pass

    def _start_wandb(self, run_dir, cfg, run_name, group, tags, config) -> None:
        try:
            self._init_wandb(run_dir, cfg, run_name, group, tags, config)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - W&B's failure is never the run's
            if isinstance(exc, ConfigError):
                raise
            self._wandb_failed("start", exc)

    def _init_wandb(self, run_dir, cfg, run_name, group, tags, config) -> None:
        moved = _wandb_home(Path(run_dir))
        if moved:
            log.warning(f"W&B's folders under the home folder are not writable; its {', '.join(moved)} are in "
                        f"{Path(run_dir) / 'wandb' / '.home'} for this run")
        import wandb

        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text(errors="replace").strip() if id_file.exists() else new_run_id()
        if not re.fullmatch(r"[a-z0-9]{1,64}", run_id):
            raise ConfigError(f"{id_file} does not hold a W&B run id (lowercase letters and digits); remove it "
                              f"(the run then starts a new W&B run)")
        id_file.write_text(run_id + "\n")
        mode = wandb_mode(cfg.get("mode"))
        job_type = cfg.get("job_type", "train")
        self.wandb = wandb.init(
            project=str(cfg.get("project", "sparse_bench")),
            entity=cfg.get("entity"),
            name=run_name,
            group=group,
            job_type=str(job_type) if job_type else None,
            tags=[str(t) for t in tags] + [str(t) for t in (cfg.get("tags") or [])],
            config=config,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
        )
        try:
            saved = int(self._step_file.read_text().strip()) if self._step_file.exists() else 0
        except ValueError:
            saved = 0
        self._wb_step = max(saved, int(getattr(self.wandb, "step", 0) or 0))
        self.wandb_info = {"id": run_id, "mode": mode, "project": self.wandb.project,
                           "group": group, "job_type": job_type, "tags": list(self.wandb.tags or [])}
        self.wandb.define_metric("step")
        self.wandb.define_metric("epoch")

    def _axis(self, key: str, record: dict) -> str:
        if record.get("update") or key.startswith(STEP_AXIS_PREFIXES):
            return "step"
        return "epoch"

    @property
    def wants_steps(self) -> bool:
        """Whether per-step records (``log_step``) go anywhere: to W&B, when it is on."""
        return self.wandb is not None

    def log_step(self, record: dict) -> None:
        """A record of the training curve between epochs (step, train loss, LR; every ``log_every``
        steps) for W&B's charts only: metrics.jsonl keeps one record per epoch and update."""
        if self.wandb is None:
            return
        for key in record:
            if key not in self._defined and key not in ("step", "epoch"):
                self.wandb.define_metric(key, step_metric="step")
                self._defined.add(key)
        try:
            self.wandb.log(dict(record), step=self._wb_step)
        except Exception as exc:  # noqa: BLE001 - see _wandb_failed
            return self._wandb_failed("log a step record", exc)
        self._wb_step += 1
        self._step_file.write_text(f"{self._wb_step}\n")

    def log(self, record: dict, wandb_skip=()) -> None:
        """Append `record`; W&B gets it without the flags and without the keys in `wandb_skip`
        (already sent in an update record at the same step)."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is None:
            return
        payload = {k: v for k, v in record.items() if k not in FLAGS and k not in wandb_skip
                   and (isinstance(v, (int, float)) or k in ("step", "epoch"))}
        for key in payload:
            if key not in self._defined and key not in ("step", "epoch"):
                self.wandb.define_metric(key, step_metric=self._axis(key, record))
                self._defined.add(key)
        try:
            self.wandb.log(payload, step=self._wb_step)
        except Exception as exc:  # noqa: BLE001 - see _wandb_failed
            return self._wandb_failed("log a record", exc)
        self._wb_step += 1
        self._step_file.write_text(f"{self._wb_step}\n")

    def summary(self, values: dict) -> None:
        if self.wandb is None:
            return
        try:
            for k, v in values.items():
                if v is not None:
                    self.wandb.summary[k] = v
        except Exception as exc:  # noqa: BLE001 - see _wandb_failed
            self._wandb_failed("write the summary", exc)

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        """A W&B table (e.g. the final per-layer densities), logged once."""
        if self.wandb is None:
            return
        try:
            import wandb

            self.wandb.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])},
                           step=self._wb_step)
        except Exception as exc:  # noqa: BLE001 - see _wandb_failed
            return self._wandb_failed(f"log the table {key}", exc)
        self._wb_step += 1
        self._step_file.write_text(f"{self._wb_step}\n")

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code=exit_code)
            except Exception as exc:  # noqa: BLE001 - see _wandb_failed
                self._wandb_failed("finish", exc)
            finally:
                self.wandb = None


def _rate(samples_per_s: float) -> str:
    if samples_per_s >= 1e6:
        return f"{samples_per_s / 1e6:.1f}M/s"
    if samples_per_s >= 1e4:
        return f"{samples_per_s / 1e3:.0f}k/s"
    if samples_per_s >= 1e3:
        return f"{samples_per_s / 1e3:.1f}k/s"
    return f"{samples_per_s:.0f}/s"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def console_line(rec: dict) -> str:
    """One epoch in at most about 100 characters with the log prefix: train loss and accuracy,
    train_eval and val accuracy, density, lr and the epoch's time (full precision and throughput
    are in metrics.jsonl)."""
    epochs = rec.get("epochs")
    epoch = f"{rec['epoch']:>{len(str(epochs))}}/{epochs}" if epochs else f"{rec['epoch']:>3}"
    parts = [f"epoch {epoch}"]
    if "train/loss" in rec:
        parts.append(f"loss {rec['train/loss']:.4f} acc {rec.get('train/acc', float('nan')):.3f}")
    for key, label in (("train_eval/acc", "train_eval"), ("val/acc", "val"), ("test/acc", "test")):
        if key in rec:
            parts.append(f"{label} {rec[key]:.3f}")
    if "density/achieved" in rec:
        parts.append(f"density {rec['density/achieved']:.4f}")
    if "lr" in rec:
        parts.append(f"lr {rec['lr']:.3g}")
    if "time/epoch_s" in rec:
        parts.append(f"{rec['time/epoch_s']:.1f}s")
    return "  ".join(parts)


def _multiple(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.095 else f"{x:.3f}x"


def final_line(rec: dict) -> str:
    """The end of a run: test metrics, achieved density and the FLOP multiples."""
    parts = [f"test  loss {rec['test/loss']:.4f} acc {rec['test/acc']:.4f}",
             f"density {rec['density/achieved']:.4f}"]
    if rec.get("flops/train_multiple") is not None:
        parts.append(f"FLOPs vs dense: train {_multiple(rec['flops/train_multiple'])}")
    if rec.get("flops/test_multiple") is not None:
        parts.append(f"inference {_multiple(rec['flops/test_multiple'])}")
    return "  ".join(parts)


class Progress:
    """What a person watching an epoch sees.

    On a terminal: a tqdm bar with the running loss and accuracy (read from the device about
    once a second). Elsewhere (SLURM, nohup, CI): a log line every `log_every` batches with the
    running loss and accuracy, throughput and the time left in the epoch and in the run (none at
    the epoch's last batch: the epoch line follows). Disabled: nothing, and no host sync at all.
    """

    def __init__(self, epoch: int, epochs: int, n_batches: int, enabled: bool, log_every: int = 0,
                 tty: bool | None = None):
        self.epoch, self.epochs, self.n_batches = epoch, epochs, n_batches
        tty = sys.stderr.isatty() if tty is None else tty
        self.bar = None
        self.log_every = int(log_every) if enabled and not tty else 0
        self.t0 = self.last = time.perf_counter()
        if enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{epochs}", leave=False,
                            mininterval=1.0, dynamic_ncols=True)

    def update(self, done: int, loss_sum, correct, seen: int, step: int, total_steps: int) -> None:
        """`done` batches of this epoch are done (`seen` samples); `step` of `total_steps` in the run."""
        if self.bar is not None:
            self.bar.update(1)
            now = time.perf_counter()
            if now - self.last >= 1.0 or done == self.n_batches:
                self.last = now
                self.bar.set_postfix_str(f"loss {float(loss_sum) / max(seen, 1):.4f} "
                                         f"acc {float(correct) / max(seen, 1):.4f}", refresh=False)
        elif self.log_every and done % self.log_every == 0 and done < self.n_batches:  # the epoch line ends it
            loss, acc = float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1)  # one sync
            elapsed = time.perf_counter() - self.t0
            per_batch = elapsed / max(done, 1)
            width = len(str(self.n_batches))
            log.info(f"epoch {self.epoch}/{self.epochs} batch {done:>{width}}/{self.n_batches}  "
                     f"loss {loss:.4f} acc {acc:.4f}  {_rate(seen / elapsed if elapsed > 0 else 0.0)}  "
                     f"ETA epoch {_duration(per_batch * (self.n_batches - done))} "
                     f"run {_duration(per_batch * (total_steps - step))}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class NullSink:
    """What ranks other than 0 log to: nothing."""

    wandb_info = None

    def log(self, record: dict, wandb_skip=()) -> None:
        pass

    wants_steps = False

    def log_step(self, record: dict) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class ShortFormatter(logging.Formatter):
    """Console and log-file lines as ``[HH:MM:SS] message``; a warning says so
    (``[HH:MM:SS] warning: ...``), since the short format shows no level."""

    def __init__(self, format: str = "[%(asctime)s] %(message)s", datefmt: str | None = "%H:%M:%S"):  # noqa: A002
        super().__init__(format, datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.WARNING and not str(record.message).startswith("warning:"):
            record = logging.makeLogRecord({**record.__dict__, "message": f"warning: {record.message}"})
        return super().formatMessage(record)
