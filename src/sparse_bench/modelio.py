"""Models in and out: a run that starts from saved weights (``init_from``), a trained model
evaluated alone (``sparse-bench-eval``) and exported (``sparse-bench-export``, read back by
:func:`load_exported`).

What ``init_from`` reads (local files only; nothing is downloaded):

* a run folder of this tool (its last checkpoint, ``checkpoint.pt``) or one of its checkpoints
  (``checkpoint.pt``, ``best.pt``): the weights as a masked model holds them (a layer that ran
  sparse is made dense again, zeros where it had no weight) and, with ``init_from_masks``, the masks;
* a model written by ``sparse-bench-export`` (either format);
* a plain state dict: ``torch.save(model.state_dict())`` files (``.pt``/``.pth``, read with
  ``weights_only=True``), timm's training checkpoints (their ``state_dict``), torchvision's weight
  files, and ``.safetensors`` files; a ``module.`` prefix (DataParallel / DDP) is taken off.

The file is read and checked before any data is read: a missing file, or one that holds no state
dict, is one line naming it. Names and shapes must then match the model exactly (a missing,
unexpected or differently shaped tensor is one line naming the first ones), checked as soon as
the model is built.

The export format (``--format safetensors``, the default) is one safetensors file: for every
prunable tensor ``<name>.values``, ``<name>.crow_indices`` and ``<name>.col_indices`` (CSR of the
weight viewed as ``[shape[0], rest]``), the other parameters and buffers under their own names,
and in the metadata the format's name, the run's config, the model's input shape and class count
and each prunable tensor's shape. ``--format dense`` writes an ordinary state dict with zeros
(``torch.save``, or safetensors when the file name ends in ``.safetensors``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, RunFailed
from .train.trainer import BEST, CHECKPOINT

#: the ``format`` entry of an exported file's metadata
EXPORT_FORMAT = "sparse_bench.export/1"


@dataclass
class Start:
    """Weights to start from: dense tensors by the masked model's names, masks where the file has them."""

    path: Path
    kind: str  # checkpoint | export | state_dict
    weights: dict
    masks: dict | None
    sha256: str

    def record(self, with_masks: bool) -> dict:
        """What provenance, W&B and the log say of it."""
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256, "masks": bool(with_masks)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_file(path: Path, which: str = "last") -> Path:
    """The checkpoint a path names: the file itself, or a run folder's last (``checkpoint.pt``) or best."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist; pass a run folder of this tool or a checkpoint file")
    if path.is_dir():
        name = BEST if which == "best" else CHECKPOINT
        if not (path / name).is_file():
            extra = " (keep one with checkpoint.keep_best=true)" if which == "best" else ""
            raise ConfigError(f"{path} holds no {name}{extra}; pass a run folder of this tool or a checkpoint file")
        return path / name
    return path


# --------------------------------------------------------------------------- reading weights


def _csr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape) -> tuple:
    """The dense tensor of `shape` and its bool mask from CSR parts over ``[shape[0], rest]``."""
    from .sparsity.execution.layers import linear_from_structure

    lin = linear_from_structure(crow, col, math.prod(shape) // max(crow.numel() - 1, 1))
    dense = torch.zeros(math.prod(shape), dtype=values.dtype)
    dense[lin] = values
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[lin] = True
    return dense.view(*shape), mask.view(*shape)


def dense_state(state: dict) -> tuple[dict, dict]:
    """A checkpoint's model as a masked model's state dict (a layer that ran sparse made dense,
    zeros where it has no weight) and its masks by parameter name."""
    weights = dict(state["model"])
    info = state.get("run") or {}
    saved = (state.get("method") or {}).get("masks")
    masks: dict = {}
    if saved is None:
        return weights, masks
    for name, mask in zip(saved["names"], saved["masks"]):
        if mask is not None:
            masks[name] = mask.to(torch.bool)
            continue
        prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
        shape = info.get("prunable", {}).get(name)
        if shape is None:
            raise ConfigError(f"the checkpoint holds {name} as a sparse layer but not its shape (written by an older "
                              f"version); evaluate or export it with the version that wrote it")
        values, crow, col = (weights.pop(prefix + k) for k in ("values", "indptr", "indices"))
        weights[name], masks[name] = _csr_to_dense(values.detach().cpu(), crow.cpu(), col.cpu(), shape)
    return weights, masks


def _unwrap(obj, path: Path) -> dict:
    """The state dict in what ``torch.load`` returned: the object itself, or the ``state_dict`` /
    ``model`` entry of a training checkpoint (timm's, torchvision's reference scripts')."""
    if isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise ConfigError(f"init_from={path} holds no state dict (a mapping of parameter names to tensors); pass a "
                          f"run folder, a checkpoint of this tool, or a file written by torch.save(model.state_dict())")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_start(path, key: str = "init_from") -> Start:
    """The weights (and masks, where the file has them) at `path`; one line naming `key` if unreadable."""
    from .train.checkpoint import CheckpointError, is_checkpoint, load_checkpoint

    path = Path(str(path)).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={path} does not exist; pass a run folder, a checkpoint or a state dict file "
                          f"(local files only: nothing is downloaded)")
    if path.is_dir():
        path = checkpoint_file(path)
    digest = _sha256(path)
    if is_checkpoint(path):
        try:
            state = load_checkpoint(path, map_location="cpu")
        except CheckpointError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        weights, masks = dense_state(state)
        return Start(path, "checkpoint", weights, masks, digest)
    if path.suffix == ".safetensors":
        weights, masks, meta = _read_safetensors(path, key)
        return Start(path, "export" if meta.get("format") == EXPORT_FORMAT else "state_dict", weights, masks, digest)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler says, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}={path} is not a state dict torch can load safely ({first[:120]}); pass a run "
                          f"folder, a checkpoint or a file written by torch.save(model.state_dict())") from None
    return Start(path, "state_dict", _unwrap(obj, path), None, digest)


def _read_safetensors(path: Path, key: str) -> tuple[dict, dict | None, dict]:
    """Weights, masks (an export's) and metadata of a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{key}={path} is not a readable safetensors file ({str(exc).splitlines()[0][:120]}); "
                          f"pass a state dict file") from None
    if meta.get("format") != EXPORT_FORMAT:
        return _unwrap(tensors, path), None, meta
    shapes = json.loads(meta["sparse"])
    weights = {k: v for k, v in tensors.items() if not any(k == f"{n}.{p}" for n in shapes
                                                            for p in ("values", "crow_indices", "col_indices"))}
    masks = {}
    for name, shape in shapes.items():
        weights[name], masks[name] = _csr_to_dense(tensors[f"{name}.values"], tensors[f"{name}.crow_indices"],
                                                   tensors[f"{name}.col_indices"], shape)
    return weights, masks, meta


def load_into(model: nn.Module, start: Start, key: str = "init_from") -> None:
    """Copy `start`'s weights into `model` (in place), names and shapes matching exactly; one line
    naming the first mismatched keys otherwise."""
    own = model.state_dict()
    if any(t.is_meta for t in own.values()):
        raise ConfigError(f"{key}: the model has layers built without a dense weight (too big for one); "
                          f"use execution=masked to start it from saved weights")
    missing = [k for k in own if k not in start.weights]
    unexpected = [k for k in start.weights if k not in own]
    shapes = [f"{k} ({list(start.weights[k].shape)} in the file, {list(own[k].shape)} in the model)"
              for k in own if k in start.weights and start.weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing in the file", missing), ("not in the model", unexpected),
                           ("shapes differ", shapes)):
            if keys:
                parts.append(f"{what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''} ({len(keys)})")
        raise ConfigError(f"{key}={start.path} does not fit this model: {'; '.join(parts)}; pass weights of the same "
                          f"model (model=..., and the data set's input shape and classes)")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(start.weights[k].to(dtype=t.dtype))


class StartMasks:
    """A hook around the method's ``setup``: once the method has drawn its masks, they are replaced by
    the start's (``init_from_masks``), before the execution engine builds its layers."""

    def __init__(self, start: Start, method) -> None:
        self.start, self.method = start, method

    def before(self, name: str, *args) -> None:
        pass

    def after(self, name: str, logs, *args):
        if name != "setup":
            return logs
        masks = self.method.masks
        absent = [n for n in masks.names if n not in (self.start.masks or {})]
        if absent:
            raise ConfigError(f"init_from_masks=true but {self.start.path} holds no mask for {', '.join(absent[:3])}; "
                              f"pass a run folder, checkpoint or export of this tool with the same prunable layers")
        masks.set_masks([self.start.masks[n] for n in masks.names])
        out = dict(logs or {})
        out["init/masks_from"] = str(self.start.path)
        return out


# --------------------------------------------------------------------------- export


def _csr(weight: torch.Tensor, mask: torch.Tensor) -> tuple:
    """(values, crow_indices, col_indices) of `weight` at `mask`, over ``[shape[0], rest]``."""
    from .sparsity.execution.layers import structure_from_linear

    lin = mask.reshape(-1).nonzero().squeeze(1)
    s = structure_from_linear(lin, weight.shape[0], mask[0].numel())
    return weight.reshape(-1)[lin].contiguous(), s["indptr"], s["indices"].long()


def export(path, out, fmt: str = "safetensors", which: str = "last") -> dict:
    """Write the model of a run folder or checkpoint to `out`; return what was written (nnz, density)."""
    from .train.checkpoint import load_checkpoint

    src = checkpoint_file(Path(path), which)
    state = load_checkpoint(src, map_location="cpu")
    info = state.get("run") or {}
    if "config" not in info:
        raise ConfigError(f"{src} holds no run config (written by an older version); export it with that version")
    weights, masks = dense_state(state)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = sum(m.numel() for m in masks.values())
    nnz = sum(int(m.sum()) for m in masks.values())
    if fmt == "dense":
        dense = {k: v.contiguous() for k, v in weights.items()}
        for name, m in masks.items():
            dense[name] = dense[name] * m
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(dense, str(out))
        else:
            torch.save(dense, out)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in weights.items() if k not in masks}
        for name, m in masks.items():
            tensors[f"{name}.values"], tensors[f"{name}.crow_indices"], tensors[f"{name}.col_indices"] = \
                _csr(weights[name], m)
        meta = {"format": EXPORT_FORMAT, "config": json.dumps(info["config"], default=str),
                "input_shape": json.dumps(list(info["input_shape"])), "num_classes": str(info["num_classes"]),
                "sparse": json.dumps({n: list(m.shape) for n, m in masks.items()}),
                "density": repr(nnz / total if total else 1.0), "epoch": str(state.get("epoch"))}
        save_file(tensors, str(out), metadata=meta)
    else:
        raise ConfigError(f"--format {fmt} is unknown; choose safetensors or dense")
    return {"file": str(out), "format": fmt, "nnz": nnz, "prunable": total,
            "density": nnz / total if total else 1.0, "checkpoint": str(src), "epoch": state.get("epoch")}


def load_exported(path, execution: str = "masked", device="cpu") -> nn.Module:
    """The model a ``sparse-bench-export`` file holds, ready for inference (eval mode): its prunable
    layers dense with zeros where the run had no weight (``execution="masked"``), or this tool's
    sparse layers holding only the active weights (``execution="sparse"``). The masks are on the
    module as ``model.exported_masks`` (parameter name -> bool tensor); the run's config as
    ``model.exported_config``."""
    from omegaconf import OmegaConf

    from .models import build_model

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: load_exported reads the safetensors files of sparse-bench-export; a dense export "
                          f"is an ordinary state dict (model.load_state_dict(torch.load(path, weights_only=True)))")
    weights, masks, meta = _read_safetensors(path, "load_exported")
    if meta.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path} was not written by sparse-bench-export (no {EXPORT_FORMAT} metadata)")
    config = json.loads(meta["config"])
    model = build_model(OmegaConf.create(config["model"]), tuple(json.loads(meta["input_shape"])),
                        int(meta["num_classes"]))
    load_into(model, Start(path, "export", weights, masks, ""), "load_exported")
    if execution == "sparse":
        from .sparsity.execution.engine import keep_sparse_layouts, replace_module
        from .sparsity.execution.layers import sparse_twin

        mods = {n: m for n, m in model.named_modules()}
        for name, mask in masks.items():
            owner = mods[name.rsplit(".", 1)[0]] if "." in name else model
            cls = sparse_twin(owner)
            if isinstance(cls, str):  # no sparse kernel for this layer type: it stays dense, with zeros
                continue
            replace_module(model, owner, cls.from_dense(owner, mask))
        keep_sparse_layouts(model)
    elif execution != "masked":
        raise ConfigError(f"execution={execution} is unknown; choose masked or sparse")
    model.exported_masks = masks
    model.exported_config = config
    return model.to(device).eval()


def fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1


def export_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-bench-export",
        description="Export the trained sparse model of a run folder or checkpoint: safetensors with each prunable "
                    "tensor's active values and CSR indices (read back by sparse_bench.load_exported), or an "
                    "ordinary dense state dict with zeros.")
    parser.add_argument("path", help="a run folder (its last checkpoint) or a checkpoint file")
    parser.add_argument("--out", required=True, help="the file to write (e.g. model.safetensors)")
    parser.add_argument("--format", default="safetensors", choices=("safetensors", "dense"),
                        help="safetensors: active values and indices (CSR); dense: a state dict with zeros "
                             "(torch.save, or safetensors if --out ends in .safetensors)")
    parser.add_argument("--best", action="store_true", help="a run folder's best.pt instead of its last checkpoint")
    args = parser.parse_args(argv)
    try:
        done = export(args.path, args.out, args.format, "best" if args.best else "last")
    except (ConfigError, RunFailed) as exc:
        return fail(exc)
    print(f"exported {done['checkpoint']} (epoch {done['epoch']}) to {done['file']} ({done['format']}): "
          f"{done['nnz']:,} of {done['prunable']:,} prunable weights active (density {done['density']:.4g})")
    return 0
