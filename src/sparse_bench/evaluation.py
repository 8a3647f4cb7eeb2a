"""``sparse-bench-eval PATH``: a trained model evaluated alone, exactly as its run evaluates it
(its config, data set, masks and execution restored from the checkpoint), the metrics printed and
written as JSON beside the checkpoint (``eval.json``, ``eval-best.json`` for ``best.pt``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ConfigError, RunFailed
from .modelio import checkpoint_file, fail
from .train.trainer import BEST


def evaluate(path, which: str = "last", device: str | None = None, splits=("val", "test")) -> dict:
    """Test (and validation) metrics of the model in a run folder or checkpoint, computed as the run
    computes them: its config, data set, masks and execution, restored from the checkpoint."""
    from omegaconf import OmegaConf

    from .run import build_parts, start_or_resume
    from .train.checkpoint import load_checkpoint

    src = checkpoint_file(Path(path), which)
    state = load_checkpoint(src, map_location="cpu")
    config = (state.get("run") or {}).get("config")
    if config is None and (src.parent / "config.json").is_file():
        config = json.loads((src.parent / "config.json").read_text())
    if config is None:
        raise ConfigError(f"{src} holds no run config and has no config.json beside it; pass a run folder")
    cfg = OmegaConf.create(config)
    cfg.logger = {"name": "none"}
    cfg.progress = False
    if device is not None:
        cfg.device = device
    parts = build_parts(cfg, src.parent, config, state=state)
    start_or_resume(parts, src.parent, quiet=True)
    out = {"checkpoint": str(src), "epoch": int(state["epoch"]), "step": int(state["step"])}
    for split in splits:
        loader = getattr(parts.data, split)
        if loader is not None:
            out[f"{split}/loss"], out[f"{split}/acc"] = parts.trainer.evaluate(loader)
    if parts.method.masks is not None:
        out["density/achieved"] = parts.method.density_logs().get("density/achieved")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparse-bench-eval",
        description="Evaluate a trained model (a run folder or checkpoint of this tool) on its data set's test and "
                    "validation splits, with its masks and execution, and write the metrics as JSON.")
    parser.add_argument("path", help="a run folder (its last checkpoint) or a checkpoint file (checkpoint.pt, best.pt)")
    parser.add_argument("--best", action="store_true", help="a run folder's best.pt instead of its last checkpoint")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the run's device setting)")
    parser.add_argument("--out", default=None, help="where to write the metrics (default: eval.json beside the "
                                                    "checkpoint, eval-best.json for best.pt)")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate(args.path, "best" if args.best else "last", args.device)
    except (ConfigError, RunFailed) as exc:
        return fail(exc)
    src = Path(metrics["checkpoint"])
    out = Path(args.out) if args.out else src.parent / ("eval-best.json" if src.name == BEST else "eval.json")
    from .train.checkpoint import atomic_write_json

    atomic_write_json(out, metrics)
    for k, v in metrics.items():
        print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")
    print(f"written to {out}")
    return 0


