"""Checkpoints that cannot lie, written atomically.

A checkpoint file is one header line of JSON, then the payload ``torch.save`` wrote:

    SBCKPT1 {"sha256": "...", "size": N, "fingerprint": "..."}\\n<N bytes>

* The payload holds tensors and plain data only (numbers, strings, lists, dicts), and is read
  back with ``torch.load(..., weights_only=True)``: a crafted file cannot run code.
* ``sha256`` and ``size`` detect a truncated or overwritten file before anything is unpickled.
* ``fingerprint`` is the hash of the run's config (the keys that must not change on resume), so
  a checkpoint copied from another run's folder, or left in a folder whose config changed, is
  refused instead of being resumed.

Every refusal is a :class:`CheckpointError`: one line naming the file and the fix.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the target, so
a crash never leaves a half-written checkpoint (or results.json) behind; files are created with
the permissions of ordinary files (0666 minus the umask, i.e. 0644 by default) so teammates on
shared storage can read them. Temporary files left by a killed process are removed by
:func:`clean_stale_temporaries`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, RunFailed

MAGIC = b"SBCKPT1 "
_TMP_PREFIX = "."  # temporary files are ".<name>.<random>" beside their target


class CheckpointError(ConfigError):
    """A checkpoint that is refused: corrupt, foreign, or not ours. The message is one line."""


class WriteError(RunFailed):
    """A run output that cannot be written once the run has started (a full disk, a folder made
    read-only): one line naming the path, exit status 1; the last good checkpoint stays."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file stands where a folder is needed"
    return exc.strerror or str(exc)


def atomic_write_bytes(path: Path, write) -> None:
    """Write via `write(fileobj)` to a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise WriteError(f"cannot write {path}: {describe_os_error(exc)}; free space or choose another "
                         f"folder with paths.runs=DIR") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp) -> None:
    if tmp is not None and os.path.exists(tmp):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def clean_stale_temporaries(folder: Path, names) -> list[Path]:
    """Remove the temporary files a killed writer left for `names` in `folder`; return them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for name in names:
        for p in folder.glob(f"{_TMP_PREFIX}{name}.*"):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def fingerprint(config: dict) -> str:
    """A stable hash of a (resolved, JSON-able) config."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path, state: dict, config_fingerprint: str = "") -> None:
    """`state` written to `path`, or to each of a sequence of paths in turn (serialised once)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    header = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload),
              "fingerprint": config_fingerprint}

    def write(f):
        f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
        f.write(payload)

    for target in ([path] if isinstance(path, (str, os.PathLike)) else path):
        atomic_write_bytes(target, write)


def is_checkpoint(path: Path) -> bool:
    """Whether `path` starts with this tool's checkpoint header (its payload is not read)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_header(path: Path) -> tuple[dict, bytes]:
    """The header and the verified payload bytes of a checkpoint file (CheckpointError if corrupt)."""
    path = Path(path)
    fix = "delete it or pass resume=false to start the run over"
    try:
        with open(path, "rb") as f:  # the header line, then the payload: one copy of it in memory
            head = f.readline()
            payload = f.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {describe_os_error(exc)}") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (a write was interrupted?); {fix}")
    if not head.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a sparse_bench checkpoint (or one from an older version); {fix}")
    try:
        if not head.endswith(b"\n"):
            raise ValueError("no end of header")
        header = json.loads(head[len(MAGIC):-1])
        size, digest = int(header["size"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has a damaged header; {fix}") from None
    if len(payload) != size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(payload)} of {size} bytes); {fix}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt (its checksum does not match); {fix}")
    return header, payload


def load_checkpoint(path: Path, map_location=None, config_fingerprint: str | None = None) -> dict:
    """The state dict in `path`, verified; with `config_fingerprint`, only if it is this run's."""
    header, payload = read_header(path)
    if config_fingerprint is not None and header.get("fingerprint") != config_fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to a run with another config (copied from another run folder, or "
            f"the config changed); pass resume=false to start over there, or run_name=NEW for a new folder")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a refusal, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} holds something other than tensors and plain data, or is "
                              f"damaged ({first[:160]}); it was not loaded") from None


def rng_state() -> dict:
    """The global RNG streams as tensors and plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys.cpu().numpy(), dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
