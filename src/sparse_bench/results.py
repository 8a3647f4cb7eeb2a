"""What a finished run's record says: its final metrics, its ``results.json`` and the W&B summary,
and the published value of its paper row beside ours. The tables read runs with the same helpers
(``model_label``, ``run_density``, ``paper_values``), so a run and the table agree on which row
and density it is."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import identity
from .train.checkpoint import atomic_write_json

#: the metrics a paper row may be published in
METRICS = ("test/acc", "test/error")


def density_key(density) -> float:
    """A density as a dictionary key (rounded, so 0.1 from YAML and from arithmetic are one key)."""
    return round(float(density), 10)


def run_density(config: dict) -> float:
    """The density a run is read at: 1 for a dense method, whatever `density` says."""
    if identity.is_dense(config):
        return 1.0
    return density_key(config.get("density", 1.0))


def model_label(config: dict) -> str:
    """The model's name; a timm model goes by its architecture (``model.arch``)."""
    model = config.get("model") or {}
    name = str(model.get("name", "?"))
    if name == "timm" and model.get("arch"):
        return str(model["arch"])
    return name


def paper_values(values) -> dict:
    """``{density: (value, pm or None)}`` of a ``paper.values`` block (entries that are no number left out)."""
    out = {}
    if not isinstance(values, dict):
        return out
    for density, entry in values.items():
        try:
            d = density_key(density)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict):
            value, pm = entry.get("value"), entry.get("pm")
        else:
            value, pm = entry, None
        if isinstance(value, (int, float)):
            out[d] = (float(value), float(pm) if isinstance(pm, (int, float)) else None)
    return out


def paper_comparison(config: dict, acc: float, departures) -> dict | None:
    """The published value of an experiment run's row at its density and ours beside it (percent, in
    the row's metric), for the W&B summary and results.json; None for runs without a `paper:`
    block, at densities the paper does not report, or that depart from the recipe."""
    paper = config.get("paper")
    if not isinstance(paper, dict) or departures:
        return None
    metric = str(paper.get("metric", "test/acc"))
    value = paper_values(paper.get("values")).get(run_density(config))
    if value is None or metric not in METRICS:
        return None
    ours = 100.0 * float(acc)
    ours = 100.0 - ours if metric == "test/error" else ours
    return {"metric": metric, "value": value[0], "pm": value[1], "ours": ours, "diff": ours - value[0],
            "table": paper.get("table"), "row": paper.get("row")}


def last_train_record(metrics_file: Path) -> dict:
    """The last record of ``metrics.jsonl`` with a training loss (lines that are no record skipped:
    the file is appended to, never trusted)."""
    last = {}
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "train/loss" in rec:
            last = rec
    return last


def write_results(run_dir: Path, resolved: dict, final: dict, trainer, prunable: dict, target: float,
                  prov: dict, sink, started: float) -> dict:
    """Write a finished run's ``results.json`` and its W&B summary and per-layer table; return the
    final metrics. `final` is what ``Trainer.fit`` returned, `prunable` the masks' description,
    `target` the density asked for (1 for a dense run), `started` the run's ``perf_counter`` start."""
    last_train = last_train_record(run_dir / "metrics.jsonl")
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
        "density": {"target": target, "achieved": final["density/achieved"], "per_layer": per_layer},
        "flops": {k[len("flops/"):]: v for k, v in flop_figures.items()},
        "paper": paper,
        "prunable": prunable,
        "epochs": trainer.epoch,
        "steps": trainer.step,
        "train_time_s": trainer.train_time,
        "throughput": dict(getattr(trainer, "throughput", {}) or {}),  # the last epoch's
        "wall_time_s": time.perf_counter() - started,
        "wandb": sink.wandb_info,
        "provenance": prov,
    }
    atomic_write_json(run_dir / "results.json", results)
    sink.summary({**final_metrics, **{k: v for k, v in flop_figures.items() if v is not None},
                  **{f"paper/{k}": v for k, v in (paper or {}).items()}, "experiment": prov.get("experiment")})
    shapes = prunable["prunable"]
    rows = []
    for name, d in per_layer.items():
        shape = [int(x) for x in shapes.get(name, [])]
        rows.append([name, "x".join(map(str, shape)), math.prod(shape), round(d * math.prod(shape)), d])
    sink.table("density/final_per_layer", ["layer", "shape", "weights", "active", "density"], rows)
    return final_metrics
