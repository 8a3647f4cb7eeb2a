"""Command line: check the overrides, then hand over to Hydra and `run(cfg)`.

Unknown config-group options are caught here, before Hydra composes anything, so the user gets
one line naming the key and the choices instead of a composition traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ConfigError

GROUPS = ("model", "dataset", "method", "schedule", "optimizer", "logger", "experiment")


def conf_dir() -> Path:
    """The package's own config folder (shipped inside the package, so it is found from any folder)."""
    return Path(__file__).resolve().parent / "conf"


def group_options(group: str, root: Path | None = None) -> list[str]:
    folder = (root or conf_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_overrides(argv: list[str], root: Path | None = None) -> None:
    """Raise ConfigError for `group=option` overrides whose option file does not exist."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in GROUPS or not value or any(c in value for c in "()[]{}$"):
            continue
        choices = group_options(key, root)
        for option in value.split(","):
            if option and option != "null" and option not in choices:
                raise ConfigError(f"{key}={option} is unknown; choose one of: {', '.join(choices)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_overrides(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import hydra
    from omegaconf import DictConfig

    from .run import run

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
    def _entry(cfg: DictConfig) -> float | None:
        try:
            result = run(cfg)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        return (result or {}).get("test/acc")

    sys.argv = [sys.argv[0]] + argv
    _entry()
    return 0
