"""Command line: check the command, then hand over to Hydra and `run(cfg)`.

Before Hydra creates a run folder, the command is checked with Hydra's own machinery, on the
same search path Hydra will use (the package's config, ``--config-dir``, ``hydra.searchpath``):
an unknown group option, an override that does not parse, a config that does not compose or a
value `validate` refuses ends in one line naming the key and the fix, and exit status 2, with
no folder left behind.

Inside a sweep, a job that fails does not end the sweep: its folder gets a results.json with
``status: failed`` and the reason, the other jobs run, and the sweep ends with exit status 1
naming the failed jobs, whatever the launcher.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback

from .confdir import conf_dir
from .errors import ConfigError, RunFailed, Terminated
from .identity import folder_name_excluded

log = logging.getLogger("sparse_bench")


# --- the check before Hydra ---------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__


def _hydra_for(args):
    """A Hydra instance on the search path `python -m sparse_bench` uses (plus --config-dir)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    search_path = create_automatic_config_search_path(None, __name__, args.config_path or str(conf_dir()))
    if args.config_dir is not None:
        folder = Path(args.config_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"--config-dir {args.config_dir}: no such folder; pass a folder of config groups")
        search_path.prepend(provider="command-line", path=f"file://{folder}",
                            anchor=SearchPathQuery(provider="schema"))
    return Hydra.create_main_hydra2(task_name="sparse_bench", config_search_path=search_path)


def _check_groups(hydra, config_name: str, parsed, searchpath_overrides: list[str]) -> None:
    """Every `group=option` (and each option of a `group=a,b` sweep) names an existing option."""
    from hydra.core.object_type import ObjectType

    for ov in parsed:
        key = ov.key_or_group
        if ov.is_delete() or "." in key:
            continue  # a config key, not a group (groups nest with '/')
        # the options of the group the override names (none: not a group); one lookup per
        # override, not a walk of every group Hydra knows (most of a refused command's time)
        options = hydra.config_loader.get_group_options(key, ObjectType.CONFIG, config_name, searchpath_overrides)
        if not options:
            continue
        if ov.is_sweep_override():
            if not hasattr(ov.value(), "list"):
                continue  # ranges and globs: Hydra reports those itself
            values = [str(v) for v in ov.value().list]
        else:
            values = [str(ov.value())]
        for v in values:
            if v not in options and v != "null":
                raise ConfigError(f"{key}={v} is unknown; choose one of: {', '.join(options)}")


def sweep_dirname_override(argv: list[str]) -> list[str]:
    """For a multirun: name job folders by the swept keys only (plus the run name), so a key
    fixed for the whole sweep does not lengthen every folder name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if not a.startswith("-")]
    if any(a.startswith("hydra.job.config.override_dirname") for a in overrides):
        return []
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.key_or_group for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    keys = list(dict.fromkeys([*folder_name_excluded(), *fixed]))
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]"]


def precheck(argv: list[str]) -> dict:
    """Check a command line as Hydra will run it. Returns what the run needs to know
    (``run_dir`` and whether it existed before, for a single run)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.shell_completion or args.info:
        return {}
    config_name = args.config_name or "config"
    GlobalHydra.instance().clear()
    try:
        hydra = _hydra_for(args)
        parser = OverridesParser.create()
        parsed = []
        for arg in args.overrides:
            try:
                parsed += parser.parse_overrides([arg])
            except HydraException as exc:
                reason = _one_line(exc).split(" See https://")[0]
                raise ConfigError(f"the override {arg} does not parse ({reason}); write key=value, "
                                  f"e.g. density=0.05 or method.end={{unit:epoch,value:120}}") from None
            if not parsed[-1].key_or_group:
                raise ConfigError(f"the override {arg} has no key; write key=value, e.g. density=0.05")
        searchpath = [o for o in args.overrides if o.lstrip("+~").startswith("hydra.searchpath")]
        _check_groups(hydra, config_name, parsed, searchpath)
        mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
        try:
            cfg = hydra.compose_config(config_name, args.overrides, run_mode=mode, with_log_configuration=False,
                                       validate_sweep_overrides=False)
        except MissingConfigException as exc:
            raise ConfigError(_one_line(exc)) from None
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            raise ConfigError(f"the config does not compose: {_one_line(exc)}") from None
        from .run import check_place, validate

        try:
            runs = Path(str(OmegaConf.select(cfg, "paths.runs")))
            if mode == RunMode.MULTIRUN:  # the sweep's folder (each job's is checked when it starts)
                sweep_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")))
                check_place(sweep_dir, "hydra.sweep.dir", within=runs)
                check_place(sweep_dir / str(OmegaConf.select(cfg, "run_name")), "the sweep's job folder")
                return {}
            run_dir = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
        except OmegaConfBaseException:
            return {}
        validate(cfg)
        check_place(run_dir, "hydra.run.dir", within=runs)
        run_dir = run_dir.resolve()
        new = [d for d in [run_dir, *run_dir.parents] if not d.exists()]
        return {"run_dir": run_dir, "existed": run_dir.exists(), "new_folders": new}
    finally:
        GlobalHydra.instance().clear()


# --- running a job ----------------------------------------------------------------------------
_STATE: dict = {"precheck": {}, "failures": []}


def _log_to_file(message: str, level: int = logging.ERROR) -> None:
    """Write `message` to the run's log file only (the console already shows it)."""
    record = logging.LogRecord("sparse_bench", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def _remove_if_new(run_dir: Path) -> None:
    """A single run refused at start leaves no folder: remove the one Hydra just made for it (run()
    calls this while it still holds the folder's lock, so no other process has begun there)."""
    from .run import LOCK, MARKER

    pre = _STATE["precheck"]
    if not pre or pre.get("existed", True) or Path(pre.get("run_dir", "")) != run_dir.resolve():
        return
    ours = {".hydra", "sparse_bench.log", LOCK, MARKER}
    if run_dir.is_dir() and all(p.name in ours for p in run_dir.iterdir()):
        for logger in (logging.getLogger(), log):  # this process's log files there are closed first
            for handler in list(logger.handlers):
                if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
                    handler.close()
                    logger.removeHandler(handler)
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in pre.get("new_folders", [])[1:]:  # parents made for it, while still empty
            try:
                folder.rmdir()
            except OSError:
                break


def _refused_at_start(run_dir: Path) -> None:
    """run()'s `on_refused`: the line goes to the run's log, then a folder made for it goes."""
    exc = sys.exc_info()[1]
    if exc is not None:
        _log_to_file(f"error: {exc}")
    _remove_if_new(run_dir)
    _STATE["refused"] = True


def run_job(cfg):
    """One job: `run(cfg)`; failures become one line (single runs) or a recorded failed job (sweeps)."""
    from omegaconf import OmegaConf

    from .run import record_failure, run, run_dir_of

    multirun = _is_multirun()
    run_dir = run_dir_of(cfg)
    metric = cfg.get("optimized_metric")
    failed = float("nan") if metric else None  # what a failed job gives a sweeper (Optuna: a failed trial)
    try:
        result = run(cfg, on_refused=None if multirun else _refused_at_start)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): one line, no traceback
        what = (str(exc) or "SIGTERM") if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
        message = (f"{what}: {run_dir} keeps its last finished epoch (the checkpoint is written after every "
                   f"epoch); run the same command again to resume it")
        print(f"\n{message}", file=sys.stderr)
        _log_to_file(message, logging.WARNING)
        sys.exit(128 + signal.Signals[str(exc) or "SIGTERM"].value if isinstance(exc, Terminated) else 130)
    except (ConfigError, RunFailed) as exc:
        message = str(exc)
        print(f"error: {message}", file=sys.stderr)
        if multirun:
            _log_to_file(f"error: {message}")
            record_failure(run_dir, OmegaConf.to_container(cfg, resolve=False), message)
            _STATE["failures"].append((run_dir, message))
            return failed
        if not (isinstance(exc, ConfigError) and _STATE.pop("refused", False)):
            _log_to_file(f"error: {message}")
            if isinstance(exc, ConfigError):  # refused before the run took its folder's lock
                _remove_if_new(run_dir)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    except Exception as exc:  # noqa: BLE001 - a bug: keep the traceback, but let the sweep go on
        if not multirun:
            _log_to_file(traceback.format_exc())
            raise
        message = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        _log_to_file(traceback.format_exc())
        record_failure(run_dir, OmegaConf.to_container(cfg, resolve=False), message)
        _STATE["failures"].append((run_dir, message))
        return failed
    if not metric:
        return None
    value = (result or {}).get(str(metric))
    if value is None:
        message = (f"optimized_metric={metric} is not among this run's final metrics "
                   f"({', '.join(sorted(result or {}))}); a validation metric needs dataset.val_fraction > 0")
        print(f"error: {message}", file=sys.stderr)
        _STATE["failures"].append((run_dir, message))
        return failed
    return float(value)


class SweepReport(Callback):
    """Hydra callback: after a sweep, collect the jobs whose results.json says ``failed``.

    It runs in the launching process for every launcher (basic, joblib, submitit), reading the
    job folders, so failures of jobs that ran in other processes are found too.
    """

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        found = []
        for path in sorted(sweep_dir.glob("*/results.json")):
            try:
                if path.stat().st_mtime + 1 < self.started:
                    continue  # from an earlier sweep into the same folder
                res = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if res.get("status") == "failed":
                found.append((path.parent, str(res.get("error", ""))))
        known = {Path(d).resolve() for d, _ in _STATE["failures"]}
        _STATE["failures"] += [(d, m) for d, m in found if d.resolve() not in known]


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _main(argv)
    # A torchrun worker. Once training uses DDP, torch keeps the process group (and Gloo's
    # threads) alive past destroy_process_group(), and tearing them down with the interpreter
    # can abort a process whose run has finished ("terminate called without an active
    # exception", exit -6). Everything is written and flushed by now, so the worker ends here
    # with its own exit status and skips that teardown.
    try:
        code = _main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:  # noqa: BLE001 - a bug: its traceback, then the same exit without the teardown
        traceback.print_exc()
        code = 1
    if "wandb" in sys.modules:  # what its exit hook would do: stop W&B's service process
        sys.modules["wandb"].teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _on_sigterm(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
        if "SUBMITIT_EXECUTOR" not in os.environ:  # under submitit its own handler checkpoints and requeues
            signal.signal(signal.SIGUSR1, _on_sigterm)  # SLURM's warning before the time limit (--signal=USR1@90)
    try:
        _STATE["precheck"] = precheck(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _STATE["failures"] = []

    import hydra

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _entry(cfg):
        return run_job(cfg)

    if "-m" in argv or "--multirun" in argv:
        argv = argv + sweep_dirname_override(argv)
    sys.argv = [sys.argv[0]] + argv
    _entry()
    failures = _STATE["failures"]
    if failures:
        print(f"error: {len(failures)} job(s) of the sweep failed:", file=sys.stderr)
        for folder, message in failures:
            print(f"  {folder}: {message}", file=sys.stderr)
        return 1
    return 0

