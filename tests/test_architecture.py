"""The package's shape: its modules import each other without a cycle (counting imports inside
functions, which is how cycles used to be held apart), no module imports another's private name,
and the run reads as short steps."""

from __future__ import annotations

import ast
from pathlib import Path

import sparse_bench

PACKAGE = Path(sparse_bench.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module of this package, names taken from it, line) for every import in the module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{target}.{alias.name}"
                out.append((sub, [], node.lineno) if sub in MODULES else (target, [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
    return [(_owner(t), names, line) for t, names, line in out if _owner(t)]


def _owner(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    return {name: {t for t, _, _ in _imports(name) if t != name} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_even_through_imports_inside_functions():
    # every edge counts, a package's import of its own modules included: a module that takes a
    # name from its package's __init__ while that __init__ imports the module is a cycle too
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_name():
    taken = [f"{name}:{line} takes {n} from {target}" for name in MODULES for target, names, line in _imports(name)
             for n in names if n.startswith("_") and not n.startswith("__") and target != name]
    assert taken == []


def test_the_run_reads_as_short_steps():
    tree = ast.parse((PACKAGE / "run.py").read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 >= 80}
    assert long == {}
    imported = {t for t, _, _ in _imports("sparse_bench.run")}
    assert "sparse_bench.tables" not in imported and "sparse_bench.cli" not in imported


METHOD_MODULE = '''
"""A throw-away method: a uniform random mask at the run's density, kept fixed."""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from ... import schema as S
from .base import Method, register


@dataclass
class FixedDrawSchema:
    name: str = MISSING
    draws: int = S.count(ge=1, hint="e.g. method.draws=1")


@register("fixed_draw", schema=FixedDrawSchema)
class FixedDraw(Method):
    def setup(self):
        for _ in range(self.cfg.draws):
            self.masks.draw_random(self.ctx.density, "uniform", self.ctx.generator)
        return {"init/draws": self.cfg.draws}
'''

DATA_MODULE = '''
"""A throw-away data set: two Gaussian blobs in 16 dimensions."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_bench import schema as S
from sparse_bench.data.common import device_bundle


@dataclass
class BlobsSchema(S.DataSchema):
    n: int = S.count(ge=10, hint="e.g. dataset.n=200")


def build_blobs(cfg, device, seed):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(cfg.n) % 2
    x = torch.randn(cfg.n, 16, generator=gen) + 3.0 * y[:, None]
    half = cfg.n // 2
    return device_bundle(cfg, seed, (x[:half].to(device), y[:half].to(device), x[half:].to(device),
                                     y[half:].to(device)), num_classes=2)


S.register("dataset", "blobs", build_blobs, BlobsSchema)
BUILDERS = {"blobs": build_blobs}
'''


def test_a_method_and_a_data_set_are_one_module_and_a_yaml_each(tmp_path):
    """Added as a built-in one is (in a copy of the package): a module in sparsity/methods/ and
    one in data/, a YAML in conf/method/ and conf/dataset/; nothing else names them."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from sparse_bench.confdir import conf_dir

    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "sparse_bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(conf_dir(), site / "sparse_bench" / "conf", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    (site / "sparse_bench" / "sparsity" / "methods" / "fixed_draw.py").write_text(METHOD_MODULE)
    (site / "sparse_bench" / "data" / "blobs.py").write_text(DATA_MODULE)
    (site / "sparse_bench" / "conf" / "method" / "fixed_draw.yaml").write_text("name: fixed_draw\ndraws: 1\n")
    (site / "sparse_bench" / "conf" / "dataset" / "blobs.yaml").write_text(
        "name: blobs\nn: 200\nval_fraction: 0.0\nbatch_size: 20\ntest_batch_size: 100\ndrop_last: false\n"
        "normalize: null\n")
    env = dict(os.environ, PYTHONPATH=str(site), WANDB_MODE="offline")
    common = ["dataset=blobs", "model=mlp", "model.hidden=[32]", "schedule=constant", "schedule.epochs=2",
              "logger=none", "progress=false", "density=0.25", "paths.runs=runs"]

    def sparse_bench(*args, env=env):
        return subprocess.run([sys.executable, "-m", "sparse_bench", *common, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    proc = sparse_bench("method=fixed_draw", "method.draws=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = (tmp_path / "runs").glob("*/results.json")
    res = json.loads(found.read_text())
    assert res["status"] == "complete" and res["config"]["method"]["draws"] == 2
    n = res["prunable"]["total"]
    assert res["density"]["achieved"] == round(0.25 * n) / n
    bad = sparse_bench("method=fixed_draw", "method.draws=0")  # the schema beside the method checks it
    assert bad.returncode == 2 and "method.draws=0" in bad.stderr, bad.stderr[-2000:]
    bad = sparse_bench("method=fixed_draw", "dataset.n=3")  # and the data set's
    assert bad.returncode == 2 and "dataset.n=3" in bad.stderr, bad.stderr[-2000:]
    # the package itself does not know them: the copy's two modules and two YAMLs were all it took
    without = sparse_bench("method=fixed_draw", env=dict(os.environ, WANDB_MODE="offline"))
    assert without.returncode == 2 and "dataset=blobs is unknown" in without.stderr, without.stderr[-2000:]
