"""What defines a run: the views of a config that resume, provenance, the tables and sweep folder
names compare, all derived from the one declaration of each key's role in ``sparse_bench.schema``
(``RECIPE``, ``AXIS``, ``DETAIL``, ``VOLATILE``; see there).

* :func:`run_identity`: the keys that make two runs the same run (everything but the volatile
  keys; a dense run does not depend on ``density``). Resume refuses a folder whose run differs in
  one of them, the checkpoint carries their fingerprint, and the tables count runs that agree on
  all of them once.
* :func:`recipe`: the keys that say what is trained (the recipe keys only). An experiment run's
  departures from its recipe, and the table rows, compare these.
* :func:`folder_name_excluded`: the override keys a sweep job's folder name leaves out, because the
  run name says them already or they do not change a run (Hydra's ``exclude_keys``).
* :func:`diff`: the one config comparison (flattened, dotted keys).

Configs here are plain containers (``OmegaConf.to_container``) as run.py writes them to
``config.json`` and the tables read them back.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

from omegaconf import OmegaConf

from . import schema as S
from .resolvers import dense_methods

#: the group choices a run's name says (``run_name`` in config.yaml: dataset, model, architecture,
#: method, plus the density and seed, which are axes)
RUN_NAME_GROUPS = ("dataset", "model", "model.arch", "method")


def _fields(schema):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        yield f, S._plain(hints[f.name])


def _walk(schema, prefix: str, out: dict, inherited: str | None) -> None:
    """dotted key -> role for every key of `schema` (its own role, else `inherited`)."""
    for f, typ in _fields(schema):
        key = f"{prefix}{f.name}"
        role = f.metadata.get("role") or inherited
        if key in out and out[key] != role:
            raise AssertionError(f"{key} is declared both {out[key]} and {role}")
        out[key] = role
        if dataclasses.is_dataclass(typ):
            _walk(typ, f"{key}.", out, role)


@functools.cache
def roles() -> dict[str, str]:
    """Every key the schema knows (top level and inside each group option but the methods',
    whose keys are all recipe) with its role."""
    from . import data, models  # noqa: F401  (register their schemas; imported here, not by every importer)

    out: dict[str, str] = {}
    _walk(S.Root, "", out, None)
    for group, role in S.GROUP_ROLES.items():
        out[group] = role
        for schema in (S.GROUPS.get(group) or {}).values():
            _walk(schema, f"{group}.", out, role)
    return out


def role_of(key: str) -> str:
    """The role of a dotted key: its own, else that of the nearest parent the schema knows; a key
    the schema does not know (a user's implementation's option) is part of the recipe."""
    table = roles()
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        role = table.get(".".join(parts[:n]))
        if role is not None:
            return role
    return S.RECIPE


def flat(cfg, prefix: str = "") -> dict:
    """{dotted key: value}; an empty mapping stays one entry, so it is compared too."""
    if not isinstance(cfg, dict) or (not cfg and prefix):
        return {prefix[:-1]: cfg} if prefix else {}
    out = {}
    for k, v in cfg.items():
        out.update(flat(v, f"{prefix}{k}."))
    return out


def is_dense(cfg: dict) -> bool:
    return (cfg.get("method") or {}).get("name") in dense_methods()


def run_identity(cfg: dict) -> dict:
    """The flattened keys that make two runs the same run: all but the volatile ones, and without
    ``density`` for a dense run (it does not depend on it)."""
    dense = is_dense(cfg)
    return {k: v for k, v in flat(cfg).items()
            if role_of(k) != S.VOLATILE and not (dense and k == "density")}


def recipe(cfg: dict) -> dict:
    """The flattened keys that say what is trained (role ``recipe``)."""
    return {k: v for k, v in flat(cfg).items() if role_of(k) == S.RECIPE}


#: the value of a key a view does not have, in :func:`diff`'s answer
UNSET = object()


def diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every key where two flattened views differ, sorted by key;
    a key one side does not have is :data:`UNSET` there."""
    out = []
    for k in sorted(a.keys() | b.keys()):
        x, y = a.get(k, UNSET), b.get(k, UNSET)
        if (x is UNSET) != (y is UNSET) or x != y:
            out.append((k, x, y))
    return out


def shown(value) -> str:
    """A config value as a command line writes it (``[a,b]``, ``{k:v}``, ``0.1``; :data:`UNSET` is
    ``(unset)``): how departures, changed keys and table rows name values."""
    if value is UNSET:
        return "(unset)"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def folder_name_excluded() -> list[str]:
    """Override keys a sweep job's folder name leaves out: what the run name says already
    (:data:`RUN_NAME_GROUPS`, the axes) and every key that does not change a run (volatile)."""
    keys = [k for k, r in roles().items() if r in (S.AXIS, S.VOLATILE)]
    return list(dict.fromkeys([*RUN_NAME_GROUPS, *keys]))


def _register() -> None:
    # config.yaml: hydra.job.config.override_dirname.exclude_keys: ${sb.folder_name_excluded:}
    if not OmegaConf.has_resolver("sb.folder_name_excluded"):
        OmegaConf.register_new_resolver("sb.folder_name_excluded", folder_name_excluded)


_register()
