"""Run folders (and optionally a W&B project) -> the papers' tables, beside the published numbers.

    python -m sparse_bench.tables RUN_OR_SWEEP_DIR [...] [--out DIR] [--wandb-project ENTITY/PROJECT]

Every folder under the inputs that holds a ``config.json`` (or a ``results.json``) is a run. A run
with ``results.json`` and ``status: complete`` is finished; one whose results.json says ``status:
failed`` is shown as ``failed (epoch k/N)`` with its reason in a note; any other run is shown as
``running (epoch k/N)``, k being the last epoch in its ``metrics.jsonl`` and N
``schedule.epochs x schedule.multiplier`` (a killed run looks the same: it is never dropped).

Grouping. A run whose config has a top-level ``paper:`` block goes to table ``paper.table``, row
``paper.row`` (default ``<model>/<method>``), and brings the published values of that row::

    paper:
      source: "Dettmers & Zettlemoyer 2019, Table 1"
      metric: test/acc          # or test/error (error % = 100 - accuracy %)
      table: sm_mnist
      row: LeNet-300-100
      values: {0.01: {value: 97.64}, 0.05: {value: 98.47, pm: 0.02}}   # density -> percent

Runs without one go to table ``<dataset>-<model>`` with one row per method, metric test/acc
(a timm model is named by its ``model.arch``). ``method=dense`` runs sit at density 1.0 whatever
``density`` says.

Only like runs share a row. Runs are grouped into rows by their recipe (``identity.recipe``: the
keys whose role is ``recipe``, so not the seed, the density or what does not change what is
trained: where the data lives, logging, device, measurement extras): a cell averages runs that
differ in the seed alone. When one row label would hold runs that differ otherwise, each group
gets its own row, labelled with the settings that tell it apart from what most of them share
(``set [method.prune_rate=0.5]``), and a note says so. In a table of runs of no paper row, a row
whose recipe differs from what most of the table's rows share (another length, another learning
rate) says so the same way, and the title names the length most rows share. A run of
an experiment whose config departs from the experiment's recipe (its ``provenance`` lists
``recipe_departures``: another dataset, fewer epochs, other method options ...) is shown in its
own row marked ``†`` with the departures, and is never given a paper value or difference.

Layout. One row per row label (sorted by name), one column group per density, densities in
DESCENDING order (dense on the left, sparsest on the right, i.e. sparsity grows left to right).
Each density has an ``ours`` cell, ``mean ± SE (n=k)`` in percent with two decimals, where SE is
the sample standard deviation over seeds divided by sqrt(n) (n=1: no ±); tables with published
values add ``paper`` (``value`` or ``value ± pm``) and ``Δ`` (ours - paper, in the table's metric)
columns per density, and tables whose runs counted FLOPs add ``FLOPs`` (training / inference
FLOPs as multiples of dense, RigL's convention, ``sparsity/flops.py``; means over the cell's
runs). A published density without any run reads ``missing``; unfinished runs read
``running (epoch k/N)`` (after the mean when finished seeds exist too).

Outputs, per table, in ``--out`` (default: ``tables/`` inside the first input folder):
``<table>.md`` (the Markdown printed to stdout too), ``<table>.csv`` (tidy: one line per row and
density, numbers at full precision) and ``<table>.png`` with the same figure as ``<table>.svg``:
the metric against density on a log axis ordered as the table (dense on the left, sparser to the
right), ours as points with ±1 SE bars joined by a line per row, the seeds per point in the
caption, published values as hollow markers on dashed lines in the same colour, and dense runs
as a horizontal band (mean ± SE) across the plot. ``<table>-layers.png`` shows the final density of
every prunable layer per row and density, and ``<table>-layers-over-training.png`` (for rows whose
method moves weights between layers) each layer's density over the epochs of one run per row.

W&B. ``--wandb-project ENTITY/PROJECT`` also reads that project's finished runs (their config and
summary carry the same keys as the run folders) when wandb is importable, ``WANDB_MODE`` is not
offline/disabled and credentials exist; otherwise, or when the API fails, one line says so and
the tables are made from the run folders alone. A W&B run that is also a local run folder (same
W&B id, or the same config and seed) is counted once.

Exit status: 0 on success, 2 (one line on stderr) when there is nothing to tabulate.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import netrc
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import identity
from .errors import ConfigError
from .identity import shown
from .resolvers import dense_methods
from .results import METRICS, model_label, paper_values, run_density
from .sidefiles import read_object
from .train.logging import WANDB_EXTRAS

DAGGER = "†"
LAYER_PREFIX = "density/"  # density/<tensor> in the run's records: one prunable tensor's density


class NothingToTabulate(Exception):
    """No run folders and no W&B runs: one line, exit status 2."""


class WandbUnavailable(Exception):
    """W&B runs cannot be fetched now; the message says why (one line)."""


# ----------------------------------------------------------------------------------------------
# reading runs


@dataclass
class RunRecord:
    """One run, from a run folder or from W&B."""

    source: str                      # folder path or wandb:<entity/project>/<id>
    config: dict
    complete: bool
    acc: float | None = None         # test/acc as a fraction (complete runs)
    epoch: int = 0                   # epochs finished (running runs)
    epochs: int | None = None        # epochs planned
    wandb_id: str | None = None
    local: bool = True
    flops: dict = field(default_factory=dict)           # train_multiple, test_multiple (complete runs)
    departures: list | None = None                     # from the experiment's recipe; None = unknown
    error: str | None = None                           # why it failed (results.json status failed)
    layers: dict = field(default_factory=dict)         # final density per prunable tensor (complete runs)
    history: list = field(default_factory=list)        # (epoch, {tensor: density}) per epoch record

    @property
    def failed(self) -> bool:
        return self.error is not None


class Unreadable(Exception):
    """A run folder whose results.json or config.json is not a JSON object this tool wrote (one
    note, and the run is left out rather than shown as running)."""


def _read_json(path: Path):
    """The JSON object in `path`, None when there is none; Unreadable when the file is there but
    truncated, not JSON or not an object."""
    try:
        return read_object(path)
    except ConfigError:
        raise Unreadable(f"{Path(path).name} is truncated or not a JSON object") from None


def planned_epochs(config: dict) -> int | None:
    sched = config.get("schedule") or {}
    try:
        return max(1, int(round(float(sched["epochs"]) * float(sched.get("multiplier", 1) or 1))))
    except (KeyError, TypeError, ValueError):
        return None


def progress(metrics_path: Path) -> tuple[int, int | None, list]:
    """The last finished training epoch in metrics.jsonl (0 when none), the planned total the
    trainer records with it (None in older files; iterative methods train several rounds), and
    the per-layer densities of every epoch record that has them: [(epoch, {tensor: density})]."""
    epoch, planned, history = 0, None, []
    try:
        lines = Path(metrics_path).read_text().splitlines()
    except OSError:
        return 0, None, []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if (isinstance(rec, dict) and not rec.get("final") and not rec.get("update")
                and isinstance(rec.get("epoch"), (int, float))):
            epoch = max(epoch, int(rec["epoch"]))
            if isinstance(rec.get("epochs"), int):
                planned = rec["epochs"]
            layers = _densities({k[len(LAYER_PREFIX):]: v for k, v in rec.items()
                                 if k.startswith(LAYER_PREFIX) and k != "density/achieved"})
            if layers:
                history.append((int(rec["epoch"]), layers))
    return epoch, planned, history



def read_run_folder(folder: Path) -> RunRecord:
    """The run in `folder` (Unreadable with the reason when its files cannot be trusted)."""
    folder = Path(folder)
    results = _read_json(folder / "results.json")
    config = _read_json(folder / "config.json")
    if config is None:
        config = results.get("config") if results is not None else None
    if not isinstance(config, dict):
        raise Unreadable("no config.json, and no config in its results.json")
    if results is not None and results.get("status") == "complete" and not isinstance(results.get("final"), dict):
        raise Unreadable("its results.json says complete but holds no final metrics")
    wandb_id = None
    if isinstance(results, dict) and isinstance(results.get("wandb"), dict):
        wandb_id = results["wandb"].get("id")
    elif (folder / "wandb_id.txt").exists():
        wandb_id = (folder / "wandb_id.txt").read_text().strip() or None
    epochs = planned_epochs(config)
    prov = results.get("provenance") if isinstance(results, dict) else None
    if not isinstance(prov, dict):
        prov = read_object(folder / "provenance.json", required=False)
    departures = prov.get("recipe_departures") if isinstance(prov, dict) else None
    departures = list(departures) if isinstance(departures, list) else None
    done, planned, history = progress(folder / "metrics.jsonl")
    if isinstance(results, dict) and results.get("status") == "complete":
        acc = (results.get("final") or {}).get("test/acc")
        flops = results.get("flops") if isinstance(results.get("flops"), dict) else {}
        layers = (results.get("density") or {}).get("per_layer") if isinstance(results.get("density"), dict) else {}
        if isinstance(acc, (int, float)):
            return RunRecord(str(folder), config, True, acc=float(acc), epoch=epochs or 0, epochs=epochs,
                             wandb_id=wandb_id, flops=_flop_multiples(flops), departures=departures,
                             layers=_densities(layers), history=history)
    error = None
    if isinstance(results, dict) and results.get("status") == "failed":
        error = str(results.get("error") or "no reason recorded")
        if isinstance(results.get("epochs"), int):
            done = max(done, results["epochs"])
    return RunRecord(str(folder), config, False, epoch=done, epochs=planned or epochs, wandb_id=wandb_id,
                     departures=departures, error=error, history=history)


def _densities(per_layer) -> dict:
    if not isinstance(per_layer, dict):
        return {}
    return {str(k): float(v) for k, v in per_layer.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _flop_multiples(flops: dict, prefix: str = "") -> dict:
    out = {}
    for key in ("train_multiple", "test_multiple"):
        value = flops.get(prefix + key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def find_run_folders(inputs: list[Path]) -> list[Path]:
    """Every folder at or below the inputs that holds config.json or results.json."""
    found: dict[Path, None] = {}
    for root in inputs:
        root = Path(root)
        candidates = [root] if root.is_dir() else []
        for name in ("config.json", "results.json"):
            candidates += [p.parent for p in sorted(root.rglob(name))] if root.is_dir() else []
        for folder in candidates:
            if (folder / "config.json").is_file() or (folder / "results.json").is_file():
                found.setdefault(folder.resolve(), None)
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# W&B


def _unflatten(cfg: dict) -> dict:
    """W&B configs may come back flat ("method.name") or wrapped ({"value": ...}); nest them."""
    out: dict = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
            value = value["value"]
        if isinstance(value, dict):
            value = _unflatten(value)
        node = out
        parts = str(key).split(".") if "." in str(key) and not _is_number(key) else [str(key)]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return any("wandb" in host for host in netrc.netrc().hosts)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _wandb_api_runs(project: str) -> list:
    """The project's runs from the public API (the one function here that touches the network)."""
    import wandb

    return list(wandb.Api(timeout=30).runs(project))


def fetch_wandb_runs(project: str) -> list[RunRecord]:
    """Finished (and running) runs of a W&B project; raises WandbUnavailable with the reason."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise WandbUnavailable(f"WANDB_MODE={mode}")
    if not wandb_credentials():
        raise WandbUnavailable("no W&B credentials (WANDB_API_KEY or ~/.netrc)")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbUnavailable("wandb is not installed") from None
    try:
        api_runs = _wandb_api_runs(project)
    except Exception as exc:  # network, auth, unknown project: all mean "not fetched"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WandbUnavailable(msg[:200]) from None
    out = []
    for r in api_runs:
        config = _unflatten(dict(getattr(r, "config", {}) or {}))
        summary = getattr(r, "summary", {}) or {}
        summary = dict(getattr(summary, "_json_dict", None) or summary)
        state = str(getattr(r, "state", ""))
        run_id = str(getattr(r, "id", ""))
        source = f"wandb:{project}/{run_id}"
        epochs = planned_epochs(config)
        acc = summary.get("test/acc")
        deps = config.get("recipe_departures")
        deps = list(deps) if isinstance(deps, list) else None
        for key in WANDB_EXTRAS:  # not config keys: what run.py adds for W&B's filters
            config.pop(key, None)
        if state == "finished" and isinstance(acc, (int, float)):
            out.append(RunRecord(source, config, True, acc=float(acc), epoch=epochs or 0, epochs=epochs,
                                 wandb_id=run_id, local=False, flops=_flop_multiples(summary, "flops/"),
                                 departures=deps))
        elif state in ("running", "failed"):  # "crashed": killed, perhaps to be resumed; not counted
            epoch = summary.get("epoch")
            out.append(RunRecord(source, config, False, epoch=int(epoch) if isinstance(epoch, (int, float)) else 0,
                                 epochs=epochs, wandb_id=run_id, local=False, departures=deps,
                                 error=None if state == "running" else "the W&B run failed"))
    return out


# ----------------------------------------------------------------------------------------------
# grouping


def _name(config: dict, group: str) -> str:
    if group == "model":
        return model_label(config)
    return str((config.get(group) or {}).get("name", "?"))


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)     # percent, in the row's metric
    seeds: list = field(default_factory=list)
    running: list[tuple[int, int | None]] = field(default_factory=list)
    failed: list[tuple[int, int | None]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    train_flops: list[float] = field(default_factory=list)  # multiples of dense, per finished run
    test_flops: list[float] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)        # final density per tensor, per finished run
    histories: list[list] = field(default_factory=list)     # [(epoch, {tensor: density})] per finished run

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def se(self) -> float | None:
        if len(self.values) < 2:
            return None
        return statistics.stdev(self.values) / math.sqrt(len(self.values))


@dataclass
class Row:
    label: str
    metric: str = "test/acc"
    paper: dict = field(default_factory=dict)             # density -> (value, pm or None)
    cells: dict = field(default_factory=dict)             # density -> Cell
    departs: bool = False                                 # departs from the experiment's recipe
    method: str = ""


@dataclass
class Table:
    id: str
    source: str = ""
    rows: dict = field(default_factory=dict)              # label -> Row
    dataset: str = ""
    model: str = ""
    epochs: set = field(default_factory=set)              # planned epochs of its runs
    common_epochs: int | None = None                      # the planned epochs most of its rows share

    @property
    def has_flops(self) -> bool:
        return any(c.train_flops or c.test_flops for row in self.rows.values() for c in row.cells.values())

    @property
    def has_departures(self) -> bool:
        return any(row.departs for row in self.rows.values())

    @property
    def densities(self) -> list[float]:
        ds = set()
        for row in self.rows.values():
            ds |= set(row.cells) | set(row.paper)
        return sorted(ds, reverse=True)

    @property
    def has_paper(self) -> bool:
        return any(row.paper for row in self.rows.values())

    @property
    def metrics(self) -> list[str]:
        return sorted({row.metric for row in self.rows.values()})


def placement(config: dict, notes: list[str], where: str) -> tuple[str, str, str, str, dict]:
    """(table id, row label, metric, source, published values) of a run."""
    dataset, model, method = _name(config, "dataset"), _name(config, "model"), _name(config, "method")
    paper = config.get("paper")
    if not isinstance(paper, dict):
        return f"{dataset}-{model}", method, "test/acc", "", {}
    metric = str(paper.get("metric", "test/acc"))
    if metric not in METRICS:
        notes.append(f"note: paper.metric={metric} in {where} is unknown (test/acc or test/error); using test/acc")
        metric = "test/acc"
    table = str(paper.get("table") or f"{dataset}-{model}")
    row = str(paper.get("row") or f"{model}/{method}")
    return table, row, metric, str(paper.get("source") or ""), paper_values(paper.get("values"))


def _fingerprint(config: dict) -> str:
    """What a run computed: the keys that define a run (``identity.run_identity``)."""
    return json.dumps(identity.run_identity(config), sort_keys=True, default=str)


def dedupe(runs: list[RunRecord], notes: list[str]) -> list[RunRecord]:
    """Drop copies of one run (same W&B id, or the same config and seed): local before W&B,
    finished before unfinished, the most advanced unfinished one otherwise."""
    def rank(r: RunRecord):
        return (r.complete, r.local, r.epoch)

    best: dict[str, RunRecord] = {}
    ids: dict[str, str] = {}
    dropped = 0
    for r in runs:
        key = _fingerprint(r.config)
        if r.wandb_id and r.wandb_id in ids:
            key = ids[r.wandb_id]
        if key in best:
            dropped += 1
            if rank(r) > rank(best[key]):
                best[key] = r
        else:
            best[key] = r
        if r.wandb_id:
            ids.setdefault(r.wandb_id, key)
    if dropped:
        notes.append(f"note: {dropped} duplicate run(s) (same W&B id, or same config and seed) counted once")
    return list(best.values())


def _recipe_flat(config: dict) -> dict:
    """The keys that can split a row: those that say what is trained (``identity.recipe``)."""
    return identity.recipe(config)


def _same_recipe(a: dict, b: dict, lenient: bool = False) -> bool:
    """Flat configs agree on every key; `lenient` (a run from W&B, whose config may come back
    without some keys): on every key both have."""
    keys = a.keys() & b.keys() if lenient else a.keys() | b.keys()
    return all(k in a and k in b and json.dumps(a[k], default=str) == json.dumps(b[k], default=str) for k in keys)


def _listing(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", …" if len(items) > n else "")


@dataclass
class _Group:
    """Runs of one row: same table and label, same recipe but for seed and density."""

    table: str
    label: str
    metric: str
    source: str
    published: dict
    departures: list | None
    flat: dict
    runs: list = field(default_factory=list)
    local: bool = True


def _value_key(flat: dict, key: str) -> str:
    return json.dumps(flat[key], sort_keys=True, default=str) if key in flat else "(unset)"


def _majority(values: list):
    """The value more than half of `values` hold, else None."""
    keyed = [json.dumps(v, sort_keys=True, default=str) for v in values]
    for v, k in zip(values, keyed):
        if keyed.count(k) * 2 > len(keyed):
            return v
    return None


def _by(groups: list[_Group], key, keep) -> list[list[_Group]]:
    out: dict = {}
    for g in groups:
        if keep(g):
            out.setdefault(key(g), []).append(g)
    return list(out.values())


def _shared(gs: list[_Group], skip: str | None = None) -> dict[str, str | None]:
    """The recipe keys in which groups differ, each with the value a strict majority of them holds
    (None where no majority does); keys under `skip` are left out."""
    out = {}
    for key in set().union(*(g.flat for g in gs)):
        if skip is not None and key.split(".")[0] == skip:
            continue
        values = [_value_key(g.flat, key) for g in gs]
        if len(set(values)) > 1:
            out[key] = _majority(values)
    return out


def _differences(sets: list[list[_Group]], skip: str | None = None, fallback=None) -> dict[int, set]:
    """For each group in each set of groups that share a table (or a row label): the recipe keys in
    which it differs from what the set shares (:func:`_shared`; where no majority of the set shares
    a value, ``fallback(group, key)``'s, else every group says the key); keys under `skip` (the
    method's own options, which the row label says) are left out. So runs of another length or
    learning rate sitting in one table say how they differ, and the runs behind one label are told
    apart."""
    out: dict[int, set] = {}
    for gs in sets:
        if len(gs) < 2:
            continue
        for key, common in _shared(gs, skip).items():
            if common is None and fallback is not None:
                common = fallback(gs[0], key)
            for g in gs:
                if _value_key(g.flat, key) != common:
                    out.setdefault(id(g), set()).add(key)
    return out


def build_tables(runs: list[RunRecord], notes: list[str] | None = None) -> dict[str, Table]:
    notes = [] if notes is None else notes
    groups: list[_Group] = []
    for r in dedupe(runs, notes):
        tid, label, metric, source, published = placement(r.config, notes, r.source)
        flat = _recipe_flat(r.config)
        deps = r.departures
        home = None
        for g in groups:
            if (g.table == tid and g.label == label and (g.departures or []) == (deps or [])
                    and _same_recipe(g.flat, flat, lenient=not (r.local and g.local))):
                home = g
                break
        if home is None:
            home = _Group(tid, label, metric, source, published, deps, flat, local=r.local)
            groups.append(home)
        elif deps is not None and home.departures is None:
            home.departures = deps
        home.flat = {**flat, **home.flat}
        home.runs.append(r)

    tables: dict[str, Table] = {}
    by_label: dict[tuple[str, str], list[_Group]] = {}
    for g in groups:
        by_label.setdefault((g.table, g.label), []).append(g)
    # what the table's rows of no paper row differ in, and what tells the groups of one label apart
    free = _by(groups, lambda g: g.table, lambda g: not isinstance(g.runs[0].config.get("paper"), dict))
    said = _differences(free, skip="method")
    table_shares = {gs[0].table: _shared(gs, skip="method") for gs in free}
    said_in_label = _differences(_by(groups, lambda g: (g.table, g.label), lambda g: not g.departures),
                                 fallback=lambda g, key: table_shares.get(g.table, {}).get(key))
    for (tid, label), gs in by_label.items():
        keys = sorted(set().union(*(said_in_label.get(id(g), set()) for g in gs)))
        if keys:
            notes.append(f"note: {tid} / {label}: runs that differ in {_listing(keys, 4)} are shown as separate rows")
        for g in gs:
            shown_keys = sorted(said_in_label.get(id(g), set()) | said.get(id(g), set()))
            if g.departures:
                row_label = f"{label} {DAGGER} [{_listing(g.departures)}]"
            elif shown_keys:
                values = [f"{k}={shown(g.flat.get(k, identity.UNSET))}" for k in shown_keys]
                row_label = f"{label} [{_listing(values)}]"
            else:
                row_label = label
            table = tables.setdefault(tid, Table(tid))
            first = g.runs[0].config
            table.dataset = table.dataset or _name(first, "dataset")
            table.model = table.model or _name(first, "model")
            table.source = table.source or g.source
            table.epochs |= {r.epochs for r in g.runs if r.epochs}
            table.common_epochs = _majority([planned_epochs(x.runs[0].config) for x in groups if x.table == tid])
            row = table.rows.setdefault(row_label, Row(row_label, g.metric, departs=bool(g.departures),
                                                       method=_name(first, "method")))
            # published values only for runs that follow the recipe (or whose recipe is unknown and
            # that are alone under their label)
            if g.published and not g.departures and (g.departures is not None or not keys):
                row.metric = g.metric
                row.paper.update(g.published)
            for r in g.runs:
                d = run_density(r.config)
                cell = row.cells.setdefault(d, Cell())
                cell.sources.append(r.source)
                if r.complete:
                    pct = 100.0 * r.acc
                    cell.values.append(100.0 - pct if row.metric == "test/error" else pct)
                    if r.layers:
                        cell.layers.append(r.layers)
                        cell.histories.append(r.history)
                    cell.seeds.append(r.config.get("seed"))
                    if "train_multiple" in r.flops:
                        cell.train_flops.append(r.flops["train_multiple"])
                    if "test_multiple" in r.flops:
                        cell.test_flops.append(r.flops["test_multiple"])
                elif r.failed:
                    cell.failed.append((r.epoch, r.epochs))
                    notes.append(f"note: {tid} / {row_label} d={fmt_density(d)}: {r.source} failed at epoch "
                                 f"{r.epoch}/{r.epochs or '?'}: {r.error}")
                else:
                    cell.running.append((r.epoch, r.epochs))
    for (tid, _label), gs in by_label.items():
        for g in gs:
            if g.departures:
                notes.append(f"note: {tid} / {g.label}: {len(g.runs)} run(s) depart from the experiment's recipe "
                             f"({_listing(g.departures, 6)}); own row, no paper comparison")
    for table in tables.values():
        table.rows = dict(sorted(table.rows.items(), key=lambda kv: (kv[1].departs, kv[0].lower())))
    return dict(sorted(tables.items()))


# ----------------------------------------------------------------------------------------------
# formatting


def fmt_density(d: float) -> str:
    return f"{d:g}"


def _running_text(running: list[tuple[int, int | None]], what: str = "running") -> str:
    parts = [f"{k}/{n}" if n else f"{k}" for k, n in sorted(running, reverse=True)]
    if len(parts) == 1:
        return f"{what} (epoch {parts[0]})"
    return f"{len(parts)} {what} (epochs {', '.join(parts)})"


def ours_text(row: Row, d: float) -> str:
    cell = row.cells.get(d)
    if cell is None or (not cell.values and not cell.running and not cell.failed):
        return "missing" if d in row.paper else ""
    parts = []
    if cell.values:
        text = f"{cell.mean:.2f}"
        if cell.se is not None:
            text += f" ± {cell.se:.2f}"
        parts.append(f"{text} (n={cell.n})")
    if cell.running:
        parts.append(_running_text(cell.running))
    if cell.failed:
        parts.append(_running_text(cell.failed, "failed"))
    return "; ".join(parts)


def paper_text(row: Row, d: float) -> str:
    if d not in row.paper:
        return ""
    value, pm = row.paper[d]
    return f"{value:.2f}" + (f" ± {pm:.2f}" if pm is not None else "")


def delta(row: Row, d: float) -> float | None:
    cell = row.cells.get(d)
    if d not in row.paper or cell is None or not cell.values:
        return None
    return cell.mean - row.paper[d][0]


def delta_text(row: Row, d: float) -> str:
    value = delta(row, d)
    return "" if value is None else f"{value:+.2f}"


def metric_words(metric: str) -> str:
    return "test error (%)" if metric == "test/error" else "test accuracy (%)"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                 "imagenet": "ImageNet", "digits": "scikit-learn digits", "synthetic": "synthetic data"}
MODEL_NAMES = {"lenet300_100": "LeNet-300-100", "lenet5_caffe": "LeNet-5-Caffe", "mlp": "MLP",
               "alexnet_s": "AlexNet-s", "alexnet_b": "AlexNet-b", "vgg16_c": "VGG16-C", "vgg16_d": "VGG16-D",
               "vgg16_like": "VGG16-like", "vgg16_small": "VGG-16 (small)", "wrn16_8": "WRN-16-8",
               "wrn16_10": "WRN-16-10", "wrn22_8": "WRN-22-8", "wrn28_2": "WRN-28-2", "wrn28_10": "WRN-28-10",
               "resnet50": "ResNet-50", "resnet56": "ResNet-56", "vit_cifar": "ViT (CIFAR)"}


def title(table: Table) -> str:
    """A human title: the paper source for experiment tables, else "<dataset>, <model>"."""
    if table.source:
        return table.source
    if table.dataset and table.model:
        text = f"{DATASET_NAMES.get(table.dataset, table.dataset)}, {MODEL_NAMES.get(table.model, table.model)}"
        if table.common_epochs:  # rows of another length say theirs
            text += f", {table.common_epochs} epochs"
        return text
    return table.id


def _mult(x: float) -> str:
    return f"{x:.2f}×" if x >= 0.095 else f"{x:.3f}×"


def flops_text(row: Row, d: float) -> str:
    cell = row.cells.get(d)
    if cell is None or not (cell.train_flops or cell.test_flops):
        return ""
    train = _mult(statistics.fmean(cell.train_flops)) if cell.train_flops else "?"
    test = _mult(statistics.fmean(cell.test_flops)) if cell.test_flops else "?"
    return f"{train} / {test}"


def markdown(table: Table) -> str:
    metrics = table.metrics
    mixed = len(metrics) > 1
    what = metric_words(metrics[0]) if not mixed else "test accuracy or error (%), per row"
    lines = [f"### {table.id}", ""]
    desc = f"{title(table)}. " if not table.source else ""
    desc += f"{what}: mean ± SE over seeds (n = seeds); densities descending"
    if table.has_paper:
        desc += "; paper = published" + (f" ({table.source})" if table.source else "") + "; Δ = ours − paper"
    if table.has_flops:
        desc += "; FLOPs = training / inference FLOPs as multiples of dense (RigL's convention)"
    if table.has_departures:
        desc += f"; {DAGGER} = departs from the experiment's recipe (in brackets), not compared with the paper"
    lines += [desc, ""]
    header = ["row"]
    for d in table.densities:
        header.append(f"d={fmt_density(d)}")
        if table.has_paper:
            header += ["paper", "Δ"]
        if table.has_flops:
            header.append("FLOPs")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in table.rows.values():
        label = row.label + (" [error]" if mixed and row.metric == "test/error" else "")
        cells = [_md_escape(label)]
        for d in table.densities:
            cells.append(ours_text(row, d))
            if table.has_paper:
                cells += [paper_text(row, d), delta_text(row, d)]
            if table.has_flops:
                cells.append(flops_text(row, d))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("table", "row", "metric", "density", "mean", "se", "n", "seeds", "status", "running", "failed",
              "paper", "paper_pm", "delta", "train_flops_multiple", "test_flops_multiple", "departs", "source")


def _seed_order(seed):
    return (0, float(seed), "") if isinstance(seed, (int, float)) else (1, 0.0, str(seed))


def _num(x) -> str:
    return "" if x is None else repr(float(x))


def _epochs_field(runs: list[tuple[int, int | None]]) -> str:
    return ";".join(f"{k}/{n}" if n else str(k) for k, n in sorted(runs, reverse=True))


def csv_text(table: Table) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in table.rows.values():
        for d in table.densities:
            cell = row.cells.get(d) or Cell()
            if not cell.values and not cell.running and not cell.failed and d not in row.paper:
                continue
            status = "+".join(s for s, have in (("complete", cell.values), ("running", cell.running),
                                                ("failed", cell.failed)) if have) or "missing"
            value, pm = row.paper.get(d, (None, None))
            w.writerow({
                "table": table.id, "row": row.label, "metric": row.metric, "density": repr(d),
                "mean": _num(cell.mean), "se": _num(cell.se), "n": cell.n,
                "seeds": ";".join(str(s) for s in sorted(cell.seeds, key=_seed_order)), "status": status,
                "running": _epochs_field(cell.running), "failed": _epochs_field(cell.failed),
                "paper": _num(value), "paper_pm": _num(pm), "delta": _num(delta(row, d)),
                "train_flops_multiple": _num(statistics.fmean(cell.train_flops) if cell.train_flops else None),
                "test_flops_multiple": _num(statistics.fmean(cell.test_flops) if cell.test_flops else None),
                "departs": "yes" if row.departs else "",
                "source": table.source,
            })
    return buf.getvalue()


def _is_dense_row(row: Row) -> bool:
    return row.method in dense_methods() and set(row.cells) == {1.0} and not row.paper


def _main_range(values: list[float]) -> tuple[float, float]:
    """The y-range that shows the bulk of the points: a value far below the others (a collapsed
    run, e.g. static training at 1%) would squash every difference that matters into a few
    pixels, so it is left out of the range (and drawn at the axis' edge with its value)."""
    vals = sorted(values)
    while len(vals) >= 3:
        rest = vals[1:]
        span = max(rest) - min(rest)
        if rest[0] - vals[0] > 2.0 * max(span, 0.5):
            vals = rest
        else:
            break
    lo, hi = min(vals), max(vals)
    pad = max(0.15 * (hi - lo), 0.3)
    return lo - pad, hi + pad


def _log_labels(axis, suffix: str = "") -> None:
    """One plain label format (``0.05``, ``0.1×``) on both tick levels of a log axis, minor ticks
    labelled at 2x and 5x a power of ten only (matplotlib's default labels them ``2x10^-2``)."""
    from matplotlib.ticker import FuncFormatter

    def minor(x, _pos=None):
        if x <= 0:
            return ""
        mantissa = x / 10 ** math.floor(math.log10(x) + 1e-9)
        return f"{x:g}{suffix}" if round(mantissa, 6) in (2.0, 5.0) else ""

    axis.set_major_formatter(FuncFormatter(lambda x, _pos=None: f"{x:g}{suffix}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def plot(table: Table, path: Path, also: tuple[str, ...] = ()):
    """The metric against density, ordered as the table (dense on the left, sparsest on the right),
    on a log axis; beside it, when the runs counted FLOPs, the metric against training FLOPs.

    Ours: mean with ±1 SE bars over seeds, one solid line per row, rows nudged sideways so their
    bars do not hide each other; the seeds per point are in the caption (or beside each point
    when they differ). Published values: hollow squares on dashed lines in the row's colour.
    A dense row is a horizontal band (mean ± SE) across the plot. A point far below all others is
    drawn as a triangle on the lower edge with its value, so the others keep a readable scale.
    The figure is saved to `path` and to the same name with each suffix in `also` (e.g. ".svg"),
    and returned.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = list(table.rows.values())
    flops = table.has_flops
    fig = Figure(figsize=(11.5 if flops else 8.0, 4.8), dpi=130)
    ax = fig.add_subplot(1, 2 if flops else 1, 1)
    ax2 = fig.add_subplot(1, 2, 2, sharey=ax) if flops else None
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    ns = {c.n for row in rows for c in row.cells.values() if c.values}
    one_n = len(ns) == 1
    curves = [row for row in rows if not _is_dense_row(row)]
    values = [c.mean for row in rows for c in row.cells.values() if c.values]
    values += [v for row in rows for v, _ in row.paper.values()]
    lo, hi = _main_range(values) if values else (0.0, 1.0)
    # every error bar of a point inside the range stays inside the plot
    bars = [(c.mean, c.se or 0.0) for row in rows for c in row.cells.values() if c.values]
    bars += [(v, pm or 0.0) for row in rows for v, pm in row.paper.values()]
    pad = 0.02 * (hi - lo)
    for y, e in bars:
        if y >= lo:
            lo, hi = min(lo, y - e - pad), max(hi, y + e + pad)
    off_axis: list[tuple] = []  # (axis, x, y, color, text)

    def draw(axis, xs, ys, es, color, **kw):
        inside = [(x, y, e) for x, y, e in zip(xs, ys, es) if y >= lo]
        for x, y, e in zip(xs, ys, es):
            if y < lo:
                off_axis.append((axis, x, y, e, color))
        line_x = [x if y >= lo else x for x, y in zip(xs, ys)]
        line_y = [y if y >= lo else lo for y in ys]
        axis.plot(line_x, line_y, color=color, linestyle=kw.pop("linestyle", "-"), linewidth=1.5,
                  alpha=kw.pop("line_alpha", 1.0))
        if inside:
            ix, iy, ie = zip(*inside)
            axis.errorbar(ix, iy, yerr=ie if any(ie) else None, fmt=kw.pop("fmt", "o"), color=color, capsize=3,
                          markersize=kw.pop("markersize", 5), **kw)

    plotted = False
    for i, row in enumerate(rows):
        color = colors[i % len(colors)]
        if _is_dense_row(row) and row.cells[1.0].values:
            c = row.cells[1.0]
            for axis in (ax, ax2) if flops else (ax,):
                axis.axhline(c.mean, color=color, linestyle=":", linewidth=1.5)
                if c.se:
                    axis.axhspan(c.mean - c.se, c.mean + c.se, color=color, alpha=0.12, linewidth=0)
            ax.plot([], [], color=color, linestyle=":", linewidth=1.5, label=row.label + (
                f" (n={c.n})" if not one_n else ""))
            if flops and c.train_flops:
                ax2.errorbar([statistics.fmean(c.train_flops)], [c.mean], yerr=[c.se or 0.0], fmt="D", color=color,
                             capsize=3, markersize=5)
            plotted = True
            continue
        k = curves.index(row)
        nudge = 1.0 + 0.02 * (k - (len(curves) - 1) / 2)  # sideways, in log space
        ours = sorted((d, c.mean, c.se or 0.0, c.n, c) for d, c in row.cells.items() if c.values)
        if ours:
            xs, ys, es, n, cells = zip(*ours)
            draw(ax, [x * nudge for x in xs], ys, es, color)
            ax.plot([], [], "o-", color=color, label=row.label if not row.paper else f"{row.label} (ours)")
            if not one_n:
                for x, y, kk in zip(xs, ys, n):
                    if y >= lo:
                        # rows sharing a density: each row's labels at its own height, not on top of another's
                        ax.annotate(f"n={kk}", (x * nudge, y), textcoords="offset points", xytext=(4, 4 - 9 * (k % 3)),
                                    fontsize=7, color=color)
            if flops:
                pts = [(statistics.fmean(c.train_flops), c.mean, c.se or 0.0) for c in cells if c.train_flops]
                if pts:
                    fx, fy, fe = zip(*sorted(pts))
                    draw(ax2, fx, fy, fe, color)
            plotted = True
        pub = sorted((d, v, pm or 0.0) for d, (v, pm) in row.paper.items())
        if pub:
            xs, ys, es = zip(*pub)
            draw(ax, [x * nudge for x in xs], ys, es, color, fmt="s", mfc="none", markersize=6, linestyle="--",
                 line_alpha=0.9)
            ax.plot([], [], "s--", color=color, mfc="none", label=f"{row.label} (paper)")
            plotted = True
    for axis, x, y, e, color in off_axis:
        axis.plot([x], [lo], marker="v", color=color, markersize=8, clip_on=False, zorder=5)
        axis.annotate(f"{y:.1f}" + (f" ± {e:.1f}" if e else ""), (x, lo), textcoords="offset points",
                      xytext=(6, 3), fontsize=8, color=color)
    ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    densities = [d for d in table.densities if any(d in row.cells or d in row.paper for row in curves)]
    densities = densities or table.densities
    if densities:
        ax.set_xticks(densities)
        ax.set_xticklabels([fmt_density(d) for d in densities])
        ax.minorticks_off()
        dmin, dmax = min(densities), max(densities)
        ax.set_xlim(dmax * 1.35, dmin / 1.35)  # inverted: dense on the left, as in the table
    ax.set_xlabel("density (fraction of prunable weights kept, log scale)")
    ax.set_ylabel(metric_words(table.metrics[0]) if len(table.metrics) == 1 else "test accuracy / error (%)")
    what = "test error" if table.metrics == ["test/error"] else "test accuracy"
    ax.grid(True, which="major", alpha=0.3)
    if flops:
        ax2.set_xscale("log")
        _log_labels(ax2.xaxis, "×")
        ax2.set_xlabel("training FLOPs (multiple of dense training, log scale)")
        ax2.grid(True, which="major", alpha=0.3)
        ax2.tick_params(labelleft=False)
        ax.set_title("by density", fontsize=10)
        ax2.set_title("by training cost (RigL's FLOP convention)", fontsize=10)
        fig.suptitle(f"{title(table)}: {what}", fontsize=12)
    else:
        ax.set_title(f"{title(table)}: {what} by density", fontsize=11)
    caption = ("points: mean over seeds, bars: ±1 standard error"
               + (f", n = {next(iter(ns))} seed{'s' if next(iter(ns)) != 1 else ''} per point" if one_n else
                  " (n = seeds, beside each point)"))
    if any(row.paper for row in rows):
        caption += "; hollow squares, dashed: published"
    if any(_is_dense_row(row) for row in rows):
        caption += "; dotted line and band: dense (mean ± SE)"
    if off_axis:
        caption += "; ▼ below the axis, with its value"
    fig.text(0.01, 0.01, caption, fontsize=8, color="0.3", ha="left", va="bottom")
    if plotted:
        (ax2 or ax).legend(*ax.get_legend_handles_labels(), fontsize=8, loc="upper left",
                           bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    else:
        ax.text(0.5, 0.5, "no finished runs yet", transform=ax.transAxes, ha="center", va="center")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path, also)
    return fig


def safe_name(table_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", table_id).strip("._") or "table"


def write_tables(tables: dict[str, Table], out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables.values():
        stem = safe_name(table.id)
        md, csv_path, png = out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.png"
        md.write_text(markdown(table))
        csv_path.write_text(csv_text(table))
        plot(table, png, also=(".svg",))
        written += [md, csv_path, png, png.with_suffix(".svg")]
        for name, draw in ((f"{stem}-layers.png", plot_layers), (f"{stem}-layers-over-training.png", plot_moves)):
            if draw(table, out / name, also=(".svg",)) is not None:
                written += [out / name, (out / name).with_suffix(".svg")]
    return written


def _short_layer(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return (Figure(figsize=(width, height), dpi=130),
            matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"]))


def _save(fig, path: Path, also: tuple[str, ...]) -> None:
    fig.savefig(path)
    for suffix in also:
        fig.savefig(Path(path).with_suffix(suffix), metadata={"Date": None} if suffix == ".svg" else {})


def plot_layers(table: Table, path: Path, also: tuple[str, ...] = ()):
    """Where each row puts its weights: the final density of every prunable tensor (model order,
    log scale), mean over the cell's finished runs, one line per row, one panel per density (the
    four sparsest when there are more). Returns the figure, or None (and writes nothing) when no
    finished run recorded per-layer densities."""
    rows = [row for row in table.rows.values() if not _is_dense_row(row)]
    densities = [d for d in table.densities if d < 1.0 and any(row.cells.get(d) and row.cells[d].layers
                                                                 for row in rows)][-4:]
    if not densities:
        return None
    fig, colors = _figure(min(5.0 * len(densities), 16.0) + 2.5, 4.6)
    axes = [fig.add_subplot(1, len(densities), i + 1) for i in range(len(densities))]
    for ax, d in zip(axes, densities):
        names: list[str] = []
        for i, row in enumerate(table.rows.values()):
            cell = row.cells.get(d)
            if row not in rows or cell is None or not cell.layers:
                continue
            layer_names = list(cell.layers[0])
            names = names if len(names) >= len(layer_names) else layer_names
            ys = [statistics.fmean(run.get(n, float("nan")) for run in cell.layers) for n in layer_names]
            ax.plot(range(len(ys)), ys, "o-", color=colors[i % len(colors)], markersize=3, linewidth=1.2,
                    label=row.label)
        ax.axhline(d, color="0.5", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        _log_labels(ax.yaxis)
        step = max(1, math.ceil(len(names) / 30))
        ax.set_xticks(range(0, len(names), step))
        ax.set_xticklabels([_short_layer(n) for n in names[::step]], rotation=90, fontsize=6)
        ax.set_title(f"density {fmt_density(d)} (dotted)", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("final density of the layer (log scale)")
    fig.suptitle(f"{title(table)}: final density per layer", fontsize=12)
    handles = {}
    for ax in axes:  # every row once, whichever panel has it
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[-1].legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                    frameon=False)
    fig.text(0.01, 0.01, "points: mean over the cell's finished runs; dotted: the run's overall density",
             fontsize=8, color="0.3", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path, also)
    return fig


def plot_moves(table: Table, path: Path, also: tuple[str, ...] = ()):
    """For the rows whose method moves weights between layers during training: each layer's
    density over the epochs of one run (the first finished one at the row's sparsest density), one
    panel per row (six at most). Returns the figure, or None when no row's layer densities change."""
    panels = []
    for row in table.rows.values():
        for d in sorted(row.cells):
            hist = next((h for h in row.cells[d].histories if h), None)
            if hist and any(max(v.get(n, 0.0) for _, v in hist) - min(v.get(n, 0.0) for _, v in hist) > 1e-9
                            for n in hist[0][1]):
                panels.append((row, d, hist))
                break
    if not panels:
        return None
    panels = panels[:6]
    import matplotlib

    fig, _ = _figure(max(7.0, min(4.2 * len(panels), 17.0) + 1.0), 4.6)
    cmap = matplotlib.colormaps["viridis"]
    for k, (row, d, hist) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        names = list(hist[0][1])
        epochs = [e for e, _ in hist]
        for j, n in enumerate(names):
            ax.plot(epochs, [v.get(n, float("nan")) for _, v in hist], color=cmap(j / max(1, len(names) - 1)),
                    linewidth=1.0, label=_short_layer(n) if len(names) <= 10 else None)
        ax.set_yscale("log")
        _log_labels(ax.yaxis)
        ax.set_xlabel("epoch")
        ax.set_title(f"{row.label}, density {fmt_density(d)}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        if len(names) <= 10:
            ax.legend(fontsize=6, loc="best", frameon=False)
    fig.axes[0].set_ylabel("density of the layer (log scale)")
    fig.suptitle(f"{title(table)}: density per layer during training\n(one run per row; colour: layer depth, "
                 f"dark = first)", fontsize=10)
    fig.tight_layout()
    _save(fig, path, also)
    return fig


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        prog="python -m sparse_bench.tables",
        description="Tables (Markdown, CSV, PNG) from run folders, sweep folders and optionally a W&B project, "
                    "beside the published numbers of each experiment's `paper:` block.")
    p.add_argument("inputs", nargs="*", type=Path, metavar="RUN_DIRS_OR_SWEEP_DIR",
                   help="run folders, or folders searched recursively for run folders (config.json)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: tables/ in the first input)")
    p.add_argument("--wandb-project", default=None, metavar="ENTITY/PROJECT",
                   help="also gather finished runs of this W&B project (skipped when offline)")
    return p.parse_args(argv)


def gather(inputs: list[Path], wandb_project: str | None, notes: list[str]) -> list[RunRecord]:
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise NothingToTabulate(f"no such folder: {', '.join(missing)}")
    runs = []
    for folder in find_run_folders(inputs):
        try:
            runs.append(read_run_folder(folder))
        except Unreadable as exc:
            notes.append(f"note: {folder} skipped: {exc}")
    if wandb_project:
        try:
            fetched = fetch_wandb_runs(wandb_project)
            notes.append(f"W&B: {len(fetched)} run(s) fetched from {wandb_project}")
            runs += fetched
        except WandbUnavailable as exc:
            notes.append(f"W&B runs of {wandb_project} were not fetched ({exc}); using run folders only")
    if not runs:
        where = ", ".join(str(p) for p in inputs) or "(no folders given)"
        raise NothingToTabulate(f"no run folders (folders with config.json) found under {where}")
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    try:
        if not args.inputs and not args.wandb_project:
            raise NothingToTabulate("give run or sweep folders (or --wandb-project ENTITY/PROJECT)")
        try:
            runs = gather(args.inputs, args.wandb_project, notes)
        finally:
            for line in notes:
                print(line, file=sys.stderr)
            notes.clear()
    except NothingToTabulate as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tables = build_tables(runs, notes)
    for line in notes:
        print(line, file=sys.stderr)
    out = args.out if args.out is not None else (Path(args.inputs[0]) / "tables" if args.inputs else Path("tables"))
    write_tables(tables, out)
    print("\n".join(markdown(t) for t in tables.values()), end="")
    n_runs = sum(len(c.sources) for t in tables.values() for r in t.rows.values() for c in r.cells.values())
    print(f"{len(tables)} table(s) from {n_runs} run(s) written to {out}/ (.md, .csv, .png, .svg)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
