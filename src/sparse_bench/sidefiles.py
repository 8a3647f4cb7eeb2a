"""The JSON files of a run folder (results.json, config.json, provenance.json, execution.json),
read back checked: this tool never trusts a file it reads back."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError


def read_object(path: Path, required: bool = True, fix: str = "") -> dict | None:
    """A JSON object this tool wrote and reads back (results.json, config.json, execution.json,
    provenance.json): None when the file is not there; a file that is truncated, not JSON or not an
    object is refused in one line naming it (`required`), or read as None (not `required`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        if not required:
            return None
        raise ConfigError(f"cannot read {path} ({type(exc).__name__}); {fix or 'remove it'}") from None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        if not required:
            return None
        raise ConfigError(f"{path} is not a JSON object this tool wrote (truncated, or written by something else); "
                          f"{fix or 'remove it'}")
    return value
