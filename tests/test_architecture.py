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
