"""`python -m sparse_bench.tables`: run folders fabricated by hand -> Markdown, CSV, PNG."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_bench import tables

ROOT = Path(__file__).resolve().parents[1]

PAPER_SM = {
    "source": "Dettmers & Zettlemoyer 2019, Table 1",
    "metric": "test/acc",
    "table": "sm_mnist",
    # values as config.json stores them: density keys become strings
    "values": {"0.01": {"value": 97.64}, "0.05": {"value": 98.0, "pm": 0.02}, "0.1": {"value": 98.2}},
}
# test/acc fractions per (row, density): three seeds each
ACCS = {
    ("LeNet-300-100", 0.05): [0.9800, 0.9810, 0.9830],
    ("LeNet-300-100", 0.1): [0.9820, 0.9825, 0.9840],
    ("LeNet-5", 0.05): [0.9900, 0.9910, 0.9905],
    ("LeNet-5", 0.1): [0.9915, 0.9920, 0.9930],
}
MODELS = {"LeNet-300-100": "lenet300_100", "LeNet-5": "lenet5_caffe"}
PAPER_L5 = {"0.05": {"value": 99.0}, "0.1": {"value": 99.1, "pm": 0.05}}


def _config(model, method, density, seed, paper=None, dataset="mnist", epochs=5):
    cfg = {"model": {"name": model}, "dataset": {"name": dataset}, "method": {"name": method},
           "schedule": {"name": "sm_mnist", "epochs": epochs, "multiplier": 1}, "density": density, "seed": seed,
           "paths": {"runs": "/somewhere"}, "run_name": f"{dataset}-{model}-{method}-d{density}-s{seed}"}
    if paper is not None:
        cfg["paper"] = paper
    return cfg


def _write_run(folder: Path, cfg: dict, acc: float | None = None, epochs_done: int | None = None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    n = cfg["schedule"]["epochs"] if epochs_done is None else epochs_done
    lines = [{"epoch": e, "train/loss": 1.0 / e, "val/acc": 0.9, "step": 10 * e} for e in range(1, n + 1)]
    if acc is not None:
        lines.append({"epoch": n, "step": 10 * n, "test/acc": acc, "test/loss": 0.1, "final": True})
        results = {"status": "complete", "config": cfg,
                   "final": {"test/acc": acc, "test/loss": 0.1, "train/loss": 0.05, "val/acc": 0.98,
                             "density/achieved": cfg["density"]}}
        (folder / "results.json").write_text(json.dumps(results))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def sweep(tmp_path):
    """A sweep folder: 2 rows x 2 densities x 3 seeds, a running run, another table, plain runs."""
    root = tmp_path / "sweep"
    job = 0
    for (row, density), accs in ACCS.items():
        for seed, acc in enumerate(accs):
            paper = dict(PAPER_SM, row=row, values=PAPER_SM["values"] if row == "LeNet-300-100" else PAPER_L5)
            _write_run(root / f"{job}-run", _config(MODELS[row], "sparse_momentum", density, seed, paper), acc)
            job += 1
    # running: config and two epochs of metrics, no results.json
    paper = dict(PAPER_SM, row="LeNet-5", values=PAPER_L5)
    _write_run(root / "nested" / "running", _config("lenet5_caffe", "sparse_momentum", 0.02, 0, paper),
               epochs_done=2)
    # another table, reported as error
    other = {"source": "Somebody 2020", "metric": "test/error", "table": "other_tab", "row": "WRN",
             "values": {"0.2": {"value": 9.5}}}
    _write_run(root / "other", _config("wrn", "rigl", 0.2, 0, other, dataset="cifar10"), 0.9)
    # no paper block: grouped by dataset-model, rows by method; dense sits at density 1.0
    _write_run(root / "plain-dense", _config("mlp", "dense", 0.05, 0, dataset="digits"), 0.95)
    _write_run(root / "plain-static", _config("mlp", "static", 0.1, 0, dataset="digits"), 0.90)
    return root


def _mean_se(accs):
    pct = [100.0 * a for a in accs]
    n = len(pct)
    mean = sum(pct) / n
    se = math.sqrt(sum((p - mean) ** 2 for p in pct) / (n - 1)) / math.sqrt(n)
    return mean, se


def _md_rows(md: str) -> dict:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return header, rows


def _run_main(sweep, out, capsys, *extra):
    rc = tables.main([str(sweep), "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured


def test_markdown_cells_means_se_paper_delta(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    captured = _run_main(sweep, out, capsys)
    md = (out / "sm_mnist.md").read_text()
    assert md in captured.out  # printed too
    header, rows = _md_rows(md)
    # densities descending, each with ours / paper / delta
    assert header == ["row", "d=0.1", "paper", "Δ", "d=0.05", "paper", "Δ", "d=0.02", "paper", "Δ",
                      "d=0.01", "paper", "Δ"]
    assert set(rows) == {"LeNet-300-100", "LeNet-5"}
    paper = {"LeNet-300-100": {0.05: 98.0, 0.1: 98.2}, "LeNet-5": {0.05: 99.0, 0.1: 99.1}}
    col = {0.1: 1, 0.05: 4}
    for (row, density), accs in ACCS.items():
        mean, se = _mean_se(accs)
        cells = rows[row]
        assert cells[col[density]] == f"{mean:.2f} ± {se:.2f} (n=3)"
        assert cells[col[density] + 2] == f"{mean - paper[row][density]:+.2f}"
    # hand-checked once: 98.00, 98.10, 98.30 -> mean 98.1333, sd 0.15275, SE 0.08819
    assert rows["LeNet-300-100"][4] == "98.13 ± 0.09 (n=3)"
    assert rows["LeNet-300-100"][5] == "98.00 ± 0.02" and rows["LeNet-300-100"][6] == "+0.13"
    assert rows["LeNet-300-100"][2] == "98.20"
    assert rows["LeNet-5"][2] == "99.10 ± 0.05"
    # a published density without runs, and a running run
    assert rows["LeNet-300-100"][10:13] == ["missing", "97.64", ""]
    assert rows["LeNet-5"][7] == "running (epoch 2/5)"
    assert rows["LeNet-5"][10] == ""  # no published value, no run: empty
    assert "Dettmers & Zettlemoyer 2019, Table 1" in md


def test_other_tables_error_metric_and_plain_runs(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    _run_main(sweep, out, capsys)
    assert sorted(p.name for p in out.glob("*.md")) == ["digits-mlp.md", "other_tab.md", "sm_mnist.md"]
    md = (out / "other_tab.md").read_text()
    assert "test error (%)" in md
    header, rows = _md_rows(md)
    assert header == ["row", "d=0.2", "paper", "Δ"]
    assert rows["WRN"][1:] == ["10.00 (n=1)", "9.50", "+0.50"]  # error = 100 - 90.00; n=1: no ±
    header, rows = _md_rows((out / "digits-mlp.md").read_text())
    assert header == ["row", "d=1", "d=0.1"]  # no paper block: no paper/Δ columns
    assert rows["dense"][1:] == ["95.00 (n=1)", ""] and rows["static"][1:] == ["", "90.00 (n=1)"]
    assert "WRN" not in (out / "sm_mnist.md").read_text()


def test_csv_parses_back_to_the_same_numbers(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    _run_main(sweep, out, capsys)
    with open(out / "sm_mnist.csv", newline="") as f:
        recs = list(csv.DictReader(f))
    by = {(r["row"], float(r["density"])): r for r in recs}
    paper = {"LeNet-300-100": {0.05: 98.0, 0.1: 98.2}, "LeNet-5": {0.05: 99.0, 0.1: 99.1}}
    for (row, density), accs in ACCS.items():
        mean, se = _mean_se(accs)
        r = by[(row, density)]
        assert float(r["mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(r["se"]) == pytest.approx(se, abs=1e-9)
        assert int(r["n"]) == 3 and r["seeds"] == "0;1;2" and r["status"] == "complete"
        assert float(r["paper"]) == paper[row][density]
        assert float(r["delta"]) == pytest.approx(mean - paper[row][density], abs=1e-9)
        assert r["metric"] == "test/acc" and r["table"] == "sm_mnist"
    assert float(by[("LeNet-300-100", 0.05)]["paper_pm"]) == 0.02
    missing = by[("LeNet-300-100", 0.01)]
    assert missing["status"] == "missing" and missing["n"] == "0" and missing["mean"] == ""
    assert float(missing["paper"]) == 97.64
    running = by[("LeNet-5", 0.02)]
    assert running["status"] == "running" and running["running"] == "2/5" and running["n"] == "0"
    assert len(recs) == 6


def test_png_is_written(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    _run_main(sweep, out, capsys)
    for name in ("sm_mnist", "other_tab", "digits-mlp"):
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000


def test_running_only_and_partial_cells(tmp_path, capsys):
    root = tmp_path / "runs"
    paper = {"table": "t", "row": "r", "values": {"0.1": {"value": 90.0}}}
    _write_run(root / "a", _config("mlp", "set", 0.1, 0, paper), 0.91)
    _write_run(root / "b", _config("mlp", "set", 0.1, 1, paper), epochs_done=3)
    _write_run(root / "c", _config("mlp", "set", 0.1, 2, paper), epochs_done=0)
    _run_main(root, tmp_path / "out", capsys)
    _, rows = _md_rows((tmp_path / "out" / "t.md").read_text())
    assert rows["r"][1] == "91.00 (n=1); 2 running (epochs 3/5, 0/5)"
    assert rows["r"][3] == "+1.00"


def test_default_out_and_subprocess(sweep):
    proc = subprocess.run([sys.executable, "-m", "sparse_bench.tables", str(sweep)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "### sm_mnist" in proc.stdout and "running (epoch 2/5)" in proc.stdout
    for ext in ("md", "csv", "png"):
        assert (sweep / "tables" / f"sm_mnist.{ext}").is_file()
    # the script wrapper calls the same main; a second pass ignores the tables/ folder it wrote
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"), str(sweep)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "(n=3)" in proc.stdout


def test_no_runs_exits_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no runs here")
    assert tables.main([str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "no run folders" in captured.err
    assert not (empty / "tables").exists()
    assert tables.main([str(tmp_path / "does-not-exist")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_wandb_offline_is_skipped_with_one_line(sweep, tmp_path, capsys, monkeypatch):
    def no_network(project):
        raise AssertionError("the W&B API must not be called when offline")

    monkeypatch.setattr(tables, "_wandb_api_runs", no_network)
    monkeypatch.setenv("WANDB_MODE", "offline")
    captured = _run_main(sweep, tmp_path / "out", capsys, "--wandb-project", "me/proj")
    lines = [line for line in captured.err.splitlines() if "W&B" in line]
    assert lines == ["W&B runs of me/proj were not fetched (WANDB_MODE=offline); using run folders only"]
    assert (tmp_path / "out" / "sm_mnist.md").exists()
    # online but without credentials: skipped too
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(tables, "wandb_credentials", lambda: False)
    captured = _run_main(sweep, tmp_path / "out2", capsys, "--wandb-project", "me/proj")
    assert "were not fetched (no W&B credentials" in captured.err


class _FakeApiRun:
    def __init__(self, run_id, config, summary, state="finished"):
        self.id, self.config, self.summary, self.state = run_id, config, summary, state


def test_wandb_runs_are_merged_and_deduplicated(sweep, tmp_path, capsys, monkeypatch):
    paper = dict(PAPER_SM, row="LeNet-300-100")
    local_seed0 = json.loads((sweep / "0-run" / "config.json").read_text())
    fake = [
        # a new seed for LeNet-300-100 at 0.01 (the missing density), config flattened as W&B may give it
        _FakeApiRun("w1", {"method.name": "sparse_momentum", "model.name": "lenet300_100",
                           "dataset.name": "mnist", "schedule.epochs": 5, "density": 0.01, "seed": 0,
                           "paper": paper}, {"test/acc": 0.97}),
        # the same run as a local folder (same config and seed, other paths): counted once
        _FakeApiRun("w2", dict(local_seed0, paths={"runs": "/elsewhere"}), {"test/acc": 0.5}),
        _FakeApiRun("w3", _config("lenet300_100", "sparse_momentum", 0.01, 1, paper), {"test/acc": 0.2},
                    state="crashed"),
    ]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(tables, "wandb_credentials", lambda: True)
    monkeypatch.setattr(tables, "_wandb_api_runs", lambda project: fake)
    captured = _run_main(sweep, tmp_path / "out", capsys, "--wandb-project", "me/proj")
    assert "W&B: 2 run(s) fetched from me/proj" in captured.err
    assert "1 duplicate run(s)" in captured.err
    _, rows = _md_rows((tmp_path / "out" / "sm_mnist.md").read_text())
    assert rows["LeNet-300-100"][10:13] == ["97.00 (n=1)", "97.64", "-0.64"]
    mean, se = _mean_se(ACCS[("LeNet-300-100", 0.05)])
    assert rows["LeNet-300-100"][4] == f"{mean:.2f} ± {se:.2f} (n=3)"  # the W&B copy did not count


def test_running_label_uses_the_planned_epochs_the_trainer_records(tmp_path, capsys):
    # an iterative method (lottery) trains several rounds: 3 rounds x 5 epochs, recorded per epoch
    root = tmp_path / "runs"
    paper = {"table": "t", "row": "r", "values": {"0.1": {"value": 90.0}}}
    folder = root / "a"
    _write_run(folder, _config("mlp", "lottery", 0.1, 0, paper), epochs_done=7)
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps({**r, "epochs": 15}) + "\n" for r in recs))
    _run_main(root, tmp_path / "out", capsys)
    _, rows = _md_rows((tmp_path / "out" / "t.md").read_text())
    assert rows["r"][1] == "running (epoch 7/15)"


def _write_full(folder: Path, cfg: dict, acc: float, departures=None, flops=None):
    """A finished run as run.py writes it: results.json with provenance and FLOP figures."""
    _write_run(folder, cfg, acc)
    res = json.loads((folder / "results.json").read_text())
    res["provenance"] = {"experiment": "e" if "paper" in cfg else None, "recipe_departures": departures}
    if flops is not None:
        res["flops"] = {"train_multiple": flops[0], "test_multiple": flops[1], "train_total": 1.0}
    (folder / "results.json").write_text(json.dumps(res))


def test_runs_that_differ_in_more_than_the_seed_are_never_averaged(tmp_path, capsys):
    root = tmp_path / "runs"
    a = _config("mlp", "set", 0.1, 0, dataset="digits")
    b = dict(_config("mlp", "set", 0.1, 1, dataset="digits"))
    b["method"] = {"name": "set", "prune_rate": 0.5}
    _write_full(root / "a0", a, 0.90)
    _write_full(root / "a1", _config("mlp", "set", 0.1, 1, dataset="digits"), 0.92)
    _write_full(root / "b1", b, 0.50)
    # the same recipe from elsewhere (other data folder, other logger): averaged with the first two
    c = dict(_config("mlp", "set", 0.1, 2, dataset="digits"), logger={"name": "none"})
    c["dataset"] = {"name": "digits", "root": "/elsewhere"}
    _write_full(root / "c2", c, 0.94)
    captured = _run_main(root, tmp_path / "out", capsys)
    _, rows = _md_rows((tmp_path / "out" / "digits-mlp.md").read_text())
    assert rows["set [method.prune_rate=(unset)]"][1] == "92.00 ± 1.15 (n=3)"
    assert rows["set [method.prune_rate=0.5]"][1] == "50.00 (n=1)"
    assert "digits-mlp / set: runs that differ in method.prune_rate are shown as separate rows" in captured.err


def test_a_run_departing_from_its_recipe_gets_its_own_marked_row_without_paper(tmp_path, capsys):
    root = tmp_path / "runs"
    paper = {"table": "sm_mnist", "row": "LeNet-300-100", "metric": "test/acc", "source": "S",
             "values": {"0.05": {"value": 98.0}}}
    for seed, acc in enumerate([0.981, 0.983]):
        _write_full(root / f"r{seed}", _config("lenet300_100", "sparse_momentum", 0.05, seed, paper), acc,
                    departures=[], flops=(0.53, 0.05))
    away = _config("lenet300_100", "sparse_momentum", 0.05, 0, paper, dataset="fashion_mnist", epochs=1)
    _write_full(root / "away", away, 0.84, departures=["dataset=fashion_mnist", "schedule.epochs=1"],
                flops=(0.53, 0.05))
    captured = _run_main(root, tmp_path / "out", capsys)
    md = (tmp_path / "out" / "sm_mnist.md").read_text()
    header, rows = _md_rows(md)
    assert header == ["row", "d=0.05", "paper", "Δ", "FLOPs"]
    assert rows["LeNet-300-100"][1:] == ["98.20 ± 0.10 (n=2)", "98.00", "+0.20", "0.53× / 0.050×"]
    marked = "LeNet-300-100 † [dataset=fashion_mnist, schedule.epochs=1]"
    assert rows[marked][1:] == ["84.00 (n=1)", "", "", "0.53× / 0.050×"]
    assert list(rows)[-1] == marked  # after the rows that follow the recipe
    assert "† = departs from the experiment's recipe" in md
    assert "depart from the experiment's recipe (dataset=fashion_mnist, schedule.epochs=1)" in captured.err
    with open(tmp_path / "out" / "sm_mnist.csv", newline="") as f:
        by = {r["row"]: r for r in csv.DictReader(f)}
    assert by[marked]["departs"] == "yes" and by[marked]["paper"] == "" and by[marked]["delta"] == ""
    assert float(by["LeNet-300-100"]["train_flops_multiple"]) == 0.53


def test_timm_models_are_named_by_architecture(tmp_path, capsys):
    root = tmp_path / "runs"
    for i, arch in enumerate(["resnet18", "convnext_tiny"]):
        cfg = _config("timm", "static", 0.1, 0, dataset="cifar10")
        cfg["model"] = {"name": "timm", "arch": arch}
        _write_full(root / f"t{i}", cfg, 0.8 + 0.01 * i)
    _run_main(root, tmp_path / "out", capsys)
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.md")) == ["cifar10-convnext_tiny", "cifar10-resnet18"]
    _, rows = _md_rows((tmp_path / "out" / "cifar10-resnet18.md").read_text())
    assert rows["static"][1] == "80.00 (n=1)"


def test_figure_is_also_svg_and_says_what_its_bars_are(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    _run_main(sweep, out, capsys)
    svg = (out / "sm_mnist.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    # matplotlib writes the text of the figure into the SVG as comments/ids we can search
    assert "standard error" in svg and "n = 3 seeds per point" in svg
    assert "Dettmers" in svg and "test accuracy by density" in svg
    tables_mod = tables.build_tables([tables.read_run_folder(p) for p in tables.find_run_folders([sweep])])
    assert tables.title(tables_mod["digits-mlp"]) == "scikit-learn digits, MLP, 5 epochs"


def test_mask_update_records_do_not_count_as_finished_epochs(tmp_path):
    folder = tmp_path / "run"
    _write_run(folder, _config("mlp", "rigl", 0.1, 0), epochs_done=2)
    with (folder / "metrics.jsonl").open("a") as f:  # an update during epoch 3, then a crash
        f.write(json.dumps({"epoch": 3, "step": 25, "update": True, "mask/pruned": 4}) + "\n")
    assert tables.progress(folder / "metrics.jsonl")[:2] == (2, None)
    assert tables.read_run_folder(folder).epoch == 2


def test_a_failed_run_reads_failed_with_its_reason(tmp_path, capsys):
    root = tmp_path / "runs"
    _write_full(root / "ok", _config("mlp", "set", 0.1, 0, dataset="digits"), 0.9)
    bad = root / "bad"
    _write_run(bad, _config("mlp", "set", 0.1, 1, dataset="digits"), epochs_done=2)
    (bad / "results.json").write_text(json.dumps({"status": "failed", "error": "the training loss became non-finite",
                                                  "config": _config("mlp", "set", 0.1, 1, dataset="digits"),
                                                  "epochs": 2}))
    captured = _run_main(root, tmp_path / "out", capsys)
    _, rows = _md_rows((tmp_path / "out" / "digits-mlp.md").read_text())
    assert rows["set"][1] == "90.00 (n=1); failed (epoch 2/5)"
    assert "running" not in rows["set"][1]
    assert f"{bad} failed at epoch 2/5: the training loss became non-finite" in captured.err
    with open(tmp_path / "out" / "digits-mlp.csv", newline="") as f:
        rec = next(csv.DictReader(f))
    assert rec["status"] == "complete+failed" and rec["failed"] == "2/5"


def test_rows_that_differ_from_what_the_table_shares_say_how(tmp_path, capsys):
    root = tmp_path / "runs"
    for method in ("set", "rigl", "static"):
        _write_full(root / method, _config("mlp", method, 0.1, 0, dataset="digits", epochs=200), 0.9)
    _write_full(root / "short", _config("mlp", "rigl", 0.1, 1, dataset="digits", epochs=5), 0.5)
    _run_main(root, tmp_path / "out", capsys)
    md = (tmp_path / "out" / "digits-mlp.md").read_text()
    _, rows = _md_rows(md)
    assert set(rows) == {"set", "rigl", "static", "rigl [schedule.epochs=5]"}
    assert "scikit-learn digits, MLP, 200 epochs." in md  # the length most rows share
    # no length most rows share: every row says its own
    _write_full(root / "short2", _config("mlp", "set", 0.1, 1, dataset="digits", epochs=5), 0.5)
    _write_full(root / "short3", _config("mlp", "static", 0.1, 1, dataset="digits", epochs=5), 0.5)
    _run_main(root, tmp_path / "out2", capsys)
    md = (tmp_path / "out2" / "digits-mlp.md").read_text()
    _, rows = _md_rows(md)
    assert all("schedule.epochs=" in label for label in rows) and len(rows) == 6
    assert "epochs." not in md.splitlines()[2]


def test_figure_axes_hold_every_error_bar_and_label_flops_one_way(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    root = tmp_path / "runs"
    for seed, acc in enumerate([0.70, 0.99, 0.72]):  # a wide spread: the bar reaches past the means
        _write_full(root / f"a{seed}", _config("mlp", "set", 0.1, seed, dataset="digits"), acc, flops=(0.013, 0.1))
        _write_full(root / f"b{seed}", _config("mlp", "rigl", 0.1, seed, dataset="digits"), 0.9, flops=(0.03, 0.1))
    table = tables.build_tables([tables.read_run_folder(p) for p in tables.find_run_folders([root])])["digits-mlp"]
    fig = tables.plot(table, tmp_path / "f.png")
    ax, ax2 = fig.axes[:2]
    lo, hi = ax.get_ylim()
    for row in table.rows.values():
        cell = row.cells[0.1]
        assert lo <= cell.mean - cell.se and cell.mean + cell.se <= hi
    fig.canvas.draw()
    labels = [t.get_text() for t in ax2.get_xticklabels(minor=False) + ax2.get_xticklabels(minor=True)
              if t.get_text()]
    assert labels and all(label.endswith("×") and "^" not in label and "10" not in label.replace("0.", "")
                          for label in labels), labels


def test_per_layer_density_figures(tmp_path, capsys):
    root = tmp_path / "runs"
    for method, moving in (("sparse_momentum", True), ("static", False)):
        folder = root / method
        _write_full(folder, _config("mlp", method, 0.1, 0, dataset="digits", epochs=3), 0.9)
        res = json.loads((folder / "results.json").read_text())
        res["density"] = {"per_layer": {"net.0.weight": 0.05, "net.2.weight": 0.08, "net.4.weight": 0.6}}
        (folder / "results.json").write_text(json.dumps(res))
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        for rec in lines:
            if not rec.get("final"):
                e = rec["epoch"]
                rec.update({"density/net.0.weight": 0.05 + (0.01 * e if moving else 0), "density/net.2.weight": 0.08,
                            "density/net.4.weight": 0.6, "density/achieved": 0.1})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _run_main(root, tmp_path / "out", capsys)
    for name in ("digits-mlp-layers.png", "digits-mlp-layers.svg", "digits-mlp-layers-over-training.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000, name
    table = tables.build_tables([tables.read_run_folder(p) for p in tables.find_run_folders([root])])["digits-mlp"]
    fig = tables.plot_layers(table, tmp_path / "l.png")
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines() if line.get_label()[0] != "_"}
    assert lines == {"sparse_momentum": [0.05, 0.08, 0.6], "static": [0.05, 0.08, 0.6]}
    moves = tables.plot_moves(table, tmp_path / "m.png")
    assert [ax.get_title() for ax in moves.axes] == ["sparse_momentum, density 0.1"]  # static moves nothing
    # runs without per-layer records: no layer figures
    plain = tmp_path / "plain"
    _write_full(plain / "r", _config("mlp", "set", 0.1, 0, dataset="digits"), 0.9)
    _run_main(plain, tmp_path / "out2", capsys)
    assert not list((tmp_path / "out2").glob("*-layers*"))
