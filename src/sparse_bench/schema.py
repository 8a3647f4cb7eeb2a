"""One typed schema for the whole config, checked in one place before any data is read.

Every config group option has a dataclass (its keys, their types and their allowed ranges): here for
the top level, the data sets, models, optimizers, schedules and loggers, and beside each method in
``sparsity/methods/`` (registered here by the method's ``@register``, see :func:`register`); the YAML
files in ``conf/`` give the values. ``sparse_bench.validation.check`` merges the composed config
into the schema in OmegaConf's struct mode, so

* a value of the wrong type (``seed=abc``, ``optimizer.lr=abc``) is refused, naming the key;
* a key the schema does not know (``+densty=0.1``, ``method.prune_rat=0.3``) is refused;
* a value outside its range (``optimizer.lr=-1``, ``optimizer.momentum=1.5``,
  ``loss.label_smoothing=1.0``, ``model.hidden=[0]``, ...) is refused;

each with one line naming the key and the fix (:class:`~sparse_bench.errors.ConfigError`). The
result is the typed config the readers, models and methods receive: they read values, they do
not parse them. Options that name their own implementation with ``_target_`` (a user's method,
model or data set), and ``@register``-ed methods of the user's registered without a schema, are
checked by the implementation's ``schema`` attribute (a dataclass like the ones here) when it has
one; without one their keys are their own business.

This module imports nothing of the methods': they register into it (:data:`METHODS`,
:data:`IMPLEMENTATIONS`) when ``sparse_bench.sparsity.methods`` is imported, and
``sparse_bench.validation``, above both, checks a whole config.

Ranges are declared beside the types with :func:`num` (``num(gt=0)``: a float that must be > 0),
:func:`count` (whole numbers), :func:`choice`, :func:`widths` and :func:`numbers`; a field's
``check`` metadata runs a function of the value for what a range cannot say. A built-in schema
declares no value: the option's YAML file is the one place its values are written, and
:func:`check_option` fills in what a direct call leaves out from it (``confdir.option_values``), so a
builder called directly (a test, a script) with a partial config gets what a run gets.

The builders (``build_data``, ``build_model``, ``build_optimizer``, ``LRSchedule``,
``build_method``) check their own group with :func:`check_option`, so they too receive typed,
range-checked values; what a schema cannot know (the run's length, the data's shape, the
density, layer types, file contents) is checked where it is known, one line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .confdir import option_values
from .errors import ConfigError
from .plugins import target_of
from .train.logging import WANDB_MODES

# --- declaring ranges ---------------------------------------------------------------------------


# --- what each key is to a run -----------------------------------------------------------------
# The one declaration of which config keys define a run. Every top-level key declares its role
# (``role=`` below; a test fails on a top-level key without one), every group has one in
# GROUP_ROLES, and a key inside a group takes its group's role unless its field declares another
# (``dataset.root`` is volatile). ``sparse_bench.identity`` derives from it what resume, the
# provenance's recipe departures, the tables, sweep folder names and Hydra's ``exclude_keys`` compare.
RECIPE = "recipe"      # what is trained: resume must match, a change departs from an experiment's recipe,
#                        and the tables give runs that differ in it rows of their own
AXIS = "axis"          # seed and density: they define a run, but an experiment is read at each of them
#                        (its recipe is composed at the run's values) and a run's name says them
DETAIL = "detail"      # what is measured beside training and how it is executed (eval extras, execution):
#                        resume must match, but it is no departure and splits no table row
VOLATILE = "volatile"  # where files and data live, logging, device, threads, progress: may change between a
#                        run and its resumption, and is never part of what a run is
ROLES = (RECIPE, AXIS, DETAIL, VOLATILE)
#: the role of each config group (its keys inherit it unless a field declares its own)
GROUP_ROLES = {"model": RECIPE, "dataset": RECIPE, "method": RECIPE, "structure": RECIPE, "schedule": RECIPE,
               "optimizer": RECIPE,
               "logger": VOLATILE}


def num(*, gt=None, ge=None, lt=None, le=None, hint: str = "", nullable: bool = False, role: str | None = None,
        default=MISSING):
    """A number field with bounds (``gt``/``ge``/``lt``/``le``) checked after the merge. A built-in
    option's value comes from its YAML file; `default` is for a user's schema that wants one."""
    return field(default=default, metadata=_meta(role, gt=gt, ge=ge, lt=lt, le=le, hint=hint, nullable=nullable))


def count(*, ge=None, gt=None, le=None, hint: str = "", nullable: bool = False, role: str | None = None,
          default=MISSING):
    """A whole-number field with bounds."""
    return num(gt=gt, ge=ge, le=le, hint=hint, nullable=nullable, role=role, default=default)


def choice(choices=(), *, hint: str = "", role: str | None = None, default=MISSING):
    """A string field that must be one of `choices` (a tuple, or a table whose keys are the names)."""
    return field(default=default, metadata=_meta(role, choices=tuple(choices), hint=hint))


def keyed(*, role: str, default=MISSING, **meta):
    """A field with nothing to check but its role (and any other metadata)."""
    return field(default=default, metadata=_meta(role, **meta))


def _meta(role: str | None, **meta) -> dict:
    assert role is None or role in ROLES, role
    return {**meta, "role": role} if role is not None else meta


def widths(*, hint: str = ""):
    """A list of positive whole numbers (layer widths)."""
    return field(default=MISSING, metadata={"items_gt": 0, "hint": hint})


def numbers(*, items_gt=None, items_ge=None, items_lt=None, items_le=None, hint: str = "", check=None):
    """A list of finite numbers with bounds on every item (null allowed where the type is Optional)."""
    meta = {"items_gt": items_gt, "items_ge": items_ge, "items_lt": items_lt, "items_le": items_le, "finite": True,
            "hint": hint, "check": check}
    return field(default=MISSING, metadata=meta)


def _hints(schema) -> dict:
    return typing.get_type_hints(schema)


def _plain(typ):
    """X for Optional[X], else the type itself."""
    args = getattr(typ, "__args__", ())
    if getattr(typ, "__origin__", None) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None))
    return typ


def _bounds_text(meta) -> str:
    lo = ("(", meta["gt"]) if meta.get("gt") is not None else ("[", meta["ge"]) if meta.get("ge") is not None else None
    hi = (")", meta["lt"]) if meta.get("lt") is not None else ("]", meta["le"]) if meta.get("le") is not None else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    return f"{'<' if hi[0] == ')' else '<='} {hi[1]:g}"


def _check_device(value, key: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(value)):
        raise ConfigError(f"{key}={value} is not a device; use auto, cpu, cuda or cuda:N")


def _check_module_types(value, key: str) -> None:
    from torch import nn

    for name in value or []:
        t = getattr(nn, str(name), None)
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ConfigError(f"{key}: '{name}' is not a torch.nn module class; use e.g. [Linear, Conv2d]")


def _check_nonempty(value, key: str) -> None:
    if value is not None and not str(value).strip():
        raise ConfigError(f"{key} is empty; set {key}=<the folder holding the data set's files>")


def root(hint: str = ""):
    """A data set's folder (a non-empty string): where the data lives does not change a run."""
    return field(default=MISSING, metadata={"check": _check_nonempty, "hint": hint, "role": VOLATILE})


def _check_metric(value, key: str) -> None:
    if value is not None and not str(value).startswith(("val/", "train/", "train_eval/")):
        raise ConfigError(f"{key}={value} must be a validation (or training) metric such as val/acc; tuning on "
                          f"the test set would make the test result meaningless")


def _check_init_from(value, key: str) -> None:
    if value is not None and not str(value).strip():
        raise ConfigError(f"{key} is empty; pass {key}=PATH (a run folder, checkpoint or state dict) or {key}=null")


# --- top level ----------------------------------------------------------------------------------
#: ``precision``: name -> the torch dtype (by its name) the forward pass autocasts to (None: float32)
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Loss:
    label_smoothing: float = num(ge=0.0, lt=1.0, hint="e.g. loss.label_smoothing=0.1")


@dataclass
class Eval:
    train_samples: int = count(ge=0, hint="0 turns train_eval/* off")
    test_every_epoch: bool = MISSING
    ema_decay: Optional[float] = num(gt=0.0, lt=1.0, nullable=True, hint="null, or e.g. 0.9998")
    # which model is tested changes the result a table shows: a recipe key (the papers test the final one)
    test_on: str = choice(("final", "best"), hint="final, or best with checkpoint.keep_best=true", role=RECIPE)


@dataclass
class Checkpoint:
    keep_best: bool = MISSING


@dataclass
class Prunable:
    types: List[str] = field(default=MISSING, metadata={"check": _check_module_types})
    exclude: List[str] = MISSING
    include: List[str] = MISSING
    allow_empty: bool = MISSING


@dataclass
class Paths:
    runs: str = MISSING


@dataclass
class Root:
    """The top-level keys (the groups are checked by their own schemas), each with its role."""

    density: float = num(gt=0.0, le=1.0, hint="pass e.g. density=0.05", role=AXIS)
    seed: int = count(ge=0, hint="pass e.g. seed=0", role=AXIS)
    device: str = keyed(role=VOLATILE, check=_check_device)
    resume: str = choice(("auto", "true", "false"), hint="auto continues an unfinished run", role=VOLATILE)
    progress: bool = keyed(role=VOLATILE)
    limit_train_batches: Optional[int] = count(ge=1, nullable=True, hint="null = whole epochs", role=RECIPE)
    threads: Optional[int] = count(ge=1, nullable=True, hint="null = automatic", role=VOLATILE)
    log_every: int = count(ge=0, hint="batches between progress lines (0 = none)", role=VOLATILE)
    execution: str = choice(("masked", "sparse", "auto"), hint="how prunable layers run", role=DETAIL)
    precision: str = choice(PRECISIONS, hint="bf16 or fp16 autocast (mixed precision)", role=DETAIL)
    channels_last: bool = keyed(role=DETAIL)
    compile: bool = keyed(role=DETAIL)
    compile_backend: str = keyed(role=DETAIL)
    optimized_metric: Optional[str] = keyed(role=VOLATILE, check=_check_metric)
    init_from: Optional[str] = keyed(role=RECIPE, check=_check_init_from,
                                     hint="this experiment starts from a trained model: pass init_from=PATH (a run "
                                          "folder, checkpoint or state dict file of this model, e.g. a dense run's)")
    init_from_masks: bool = keyed(role=RECIPE)
    checkpoint: Checkpoint = keyed(role=DETAIL)
    loss: Loss = keyed(role=RECIPE)
    eval: Eval = keyed(role=DETAIL)
    prunable: Prunable = keyed(role=RECIPE)
    paths: Paths = keyed(role=VOLATILE)
    run_name: str = keyed(role=VOLATILE)
    sweep_name: str = keyed(role=VOLATILE)
    # an experiment's published numbers (read by the tables): what a run is compared with, not what it is
    paper: Optional[Dict[str, Any]] = keyed(role=VOLATILE, default=None)  # absent unless an experiment gives it


# --- optimizer, schedule, logger ----------------------------------------------------------------
@dataclass
class SGD:
    name: str = MISSING
    lr: float = num(gt=0.0, hint="pass e.g. optimizer.lr=0.1")
    momentum: float = num(ge=0.0, lt=1.0, hint="e.g. optimizer.momentum=0.9")
    nesterov: bool = MISSING
    weight_decay: float = num(ge=0.0, hint="e.g. optimizer.weight_decay=5e-4")
    clip_grad_norm: Optional[float] = num(gt=0.0, nullable=True, hint="null, or a norm, e.g. 1.0")


def _check_pair(value, key: str) -> None:
    if value is not None and len(value) != 2:
        raise ConfigError(f"{key}={list(value)} must be two numbers (beta1, beta2), e.g. {key}=[0.9,0.999]")


@dataclass
class Adam:
    name: str = MISSING
    lr: float = num(gt=0.0, hint="pass e.g. optimizer.lr=1e-3")
    betas: List[float] = numbers(items_ge=0.0, items_lt=1.0, hint="e.g. optimizer.betas=[0.9,0.999]",
                                 check=_check_pair)
    weight_decay: float = num(ge=0.0, hint="e.g. optimizer.weight_decay=0")
    clip_grad_norm: Optional[float] = num(gt=0.0, nullable=True, hint="null, or a norm, e.g. 1.0")


@dataclass
class LR:
    kind: str = choice(("step", "multistep", "cosine", "constant"))
    step_size: int = count(ge=0, hint="iterations between drops for kind=step")
    milestones: List[float] = numbers(items_ge=0.0, hint="epochs, e.g. [80, 120]")
    gamma: float = num(gt=0.0, hint="e.g. schedule.lr.gamma=0.1")
    min_lr: float = num(ge=0.0)


@dataclass
class Schedule:
    name: str = MISSING
    epochs: int = count(ge=1, hint="pass e.g. schedule.epochs=10")
    multiplier: float = num(gt=0.0, hint="e.g. schedule.multiplier=2")
    warmup_epochs: float = num(ge=0.0, hint="e.g. schedule.warmup_epochs=5")
    lr: LR = MISSING


@dataclass
class WandbLogger:
    name: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: Optional[str] = choice(WANDB_MODES)
    tags: List[str] = MISSING
    job_type: str = MISSING


@dataclass
class NoLogger:
    name: str = MISSING


# --- structure (sparsity/structure.py) -----------------------------------------------------------
@dataclass
class Unstructured:
    name: str = MISSING


@dataclass
class NM:
    name: str = MISSING
    n: int = count(ge=1, hint="active weights per group, e.g. structure.n=2")
    m: int = count(ge=2, hint="group size, e.g. structure.m=4")


def _check_block_shape(value, key: str) -> None:
    if value is not None and len(value) != 2:
        raise ConfigError(f"{key}={list(value)} must be two whole numbers (a block's rows and columns), "
                          f"e.g. {key}=[4,4]")


@dataclass
class Block:
    name: str = MISSING
    shape: List[int] = numbers(items_gt=0, hint="a block's rows and columns, e.g. structure.shape=[4,4]",
                               check=_check_block_shape)


STRUCTURES = {"unstructured": Unstructured, "nm": NM, "fan_in": Unstructured, "block": Block}


# --- data sets ----------------------------------------------------------------------------------
# Each data set's schema sits beside its builder in ``sparse_bench.data`` (``DataSchema`` plus its own
# keys; the values are in its YAML) and registers with it: ``register("dataset", name, builder, schema)``.
@dataclass
class Normalize:
    mean: List[float] = numbers()
    std: List[float] = numbers(items_gt=0.0, hint="standard deviations are > 0")


@dataclass
class DataSchema:
    """The keys every data set has."""

    name: str = MISSING
    val_fraction: float = num(ge=0.0, lt=1.0, hint="e.g. dataset.val_fraction=0.1")
    batch_size: int = count(ge=1, hint="e.g. dataset.batch_size=128")
    test_batch_size: int = count(ge=1, role=DETAIL)
    drop_last: bool = MISSING
    normalize: Optional[Normalize] = MISSING


#: data set name -> schema, registered beside each data set's builder when ``sparse_bench.data`` is imported
DATASETS: dict[str, Any] = {}


# --- models -------------------------------------------------------------------------------------
# Each model's schema sits beside its builder in ``sparse_bench.models`` (``ModelSchema`` plus its own
# keys; the values are in its YAML) and registers with it: ``register("model", name, builder, schema)``.
@dataclass
class ModelSchema:
    """The keys every model has."""

    name: str = MISSING


@dataclass
class WidthSchema(ModelSchema):
    """A model whose channels scale by ``width``."""

    width: float = num(gt=0.0, hint="a channel multiplier, e.g. model.width=2")


#: model name -> schema, registered beside each model's builder when ``sparse_bench.models`` is imported
MODELS: dict[str, Any] = {}

OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": Adam}

#: every schedule file, the user's own too, has the keys of `Schedule` (no table: any name is one)
SCHEDULES: dict[str, Any] = {}
LOGGERS = {"wandb": WandbLogger, "none": NoLogger}

#: group -> {option name: schema}
GROUPS: dict[str, Any] = {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "logger": LOGGERS,
                          "schedule": SCHEDULES, "structure": STRUCTURES}
#: method name -> schema, each registered beside its method (``@register(name, schema=...)`` in
#: ``sparsity/methods/``) when ``sparse_bench.sparsity.methods`` is imported
METHODS: dict[str, Any] = {}
#: group -> {option name: implementation} registered by name (``sparsity.methods.register``: every
#: method, the built-in ones and a user's); one without a registered schema is checked by its
#: ``schema`` attribute when it has one
IMPLEMENTATIONS: dict[str, dict[str, Any]] = {"method": {}}


#: the groups whose options register on import of their package
_REGISTERED_BY = {"method": "sparse_bench.sparsity.methods", "dataset": "sparse_bench.data",
                  "model": "sparse_bench.models"}


def _table(group: str) -> dict[str, Any]:
    """{option name: schema} of `group`."""
    return METHODS if group == "method" else GROUPS[group]


def register(group: str, name: str, implementation, schema=None) -> None:
    """Register `implementation` as option `name` of `group`, checked by `schema` (a dataclass like
    the ones here); without one it is checked by the implementation's ``schema`` attribute when it
    has one (read at the check), else its keys are its own business."""
    IMPLEMENTATIONS.setdefault(group, {})[name] = implementation
    if schema is not None:
        _table(group)[name] = schema


# --- checking -----------------------------------------------------------------------------------
_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _shown(value) -> str:
    return "null" if value is None else str(value)


def _field_of(schema, dotted: str):
    """(field, declared type) of a dotted key inside `schema`, or (None, None)."""
    obj, f = schema, None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj):
            return None, None
        fields = {x.name: x for x in dataclasses.fields(obj)}
        if part not in fields:
            return None, None
        f, obj = fields[part], _plain(_hints(obj)[part])
    return f, obj


def _strict_bools(schema, node, prefix: str) -> None:
    """A bool field takes true or false only: OmegaConf would turn 'yes', 'off' or 1 into a bool."""
    if not (dataclasses.is_dataclass(schema) and hasattr(node, "items")):
        return
    hints = _hints(schema)
    for k, v in node.items():
        typ = _plain(hints.get(k)) if k in hints else None
        if typ is bool and v is not None and not isinstance(v, bool):
            raise ConfigError(f"{prefix}{k}={v} is not true or false")
        if dataclasses.is_dataclass(typ):
            _strict_bools(typ, v, f"{prefix}{k}.")


def _merge(schema, node, prefix: str) -> DictConfig:
    """`node` merged into `schema` (struct mode): unknown keys and wrong types are refused."""
    _strict_bools(schema, node, prefix)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as exc:
        sub = str(getattr(exc, "full_key", "") or "")
        value = getattr(exc, "value", None)
        if not sub:  # OmegaConf names no key when a mapping was expected (start=2 for a milestone)
            sub = _failing_key(schema, node)
            value = node.get(sub) if sub in node else value
        key = f"{prefix}{sub}" if sub else prefix.rstrip(".")
        f, typ = _field_of(schema, sub) if sub else (None, None)
        if f is None:  # a key the schema does not have
            parent = sub.rsplit(".", 1)[0] if "." in sub else ""
            _, owner = _field_of(schema, parent) if parent else (None, schema)
            known = ", ".join(x.name for x in dataclasses.fields(owner)) if dataclasses.is_dataclass(owner) else ""
            where = f"{prefix}{parent}".rstrip(".") or "the top level"
            if not parent and prefix and hasattr(node, "get") and node.get("name"):
                where = f"{prefix.rstrip('.')}={node.get('name')}"  # e.g. the keys of model=wrn16_8
            raise ConfigError(f"{key} is not a config key; the keys of {where} are: {known}") from None
        if dataclasses.is_dataclass(typ):
            want = f"a mapping with the keys {', '.join(x.name for x in dataclasses.fields(typ))}"
        else:
            want = _TYPE_WORDS.get(typ, f"of type {getattr(typ, '__name__', typ)}")
        hint = f"; {f.metadata['hint']}" if f.metadata.get("hint") else ""
        raise ConfigError(f"{key}={_shown(value)} is not {want}{hint}") from None


def _failing_key(schema, node) -> str:
    """The (dotted) key of `node` whose merge into `schema` fails, or ''."""
    for k, v in (node.items() if hasattr(node, "items") else []):
        try:
            OmegaConf.merge(OmegaConf.structured(schema), {k: v})
        except OmegaConfBaseException as exc:
            return str(getattr(exc, "full_key", "") or "") or str(k)
    return ""


def _check_ranges(schema, node: DictConfig, prefix: str) -> None:
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        meta = f.metadata
        hint = f"; {meta['hint']}" if meta.get("hint") else ""
        if OmegaConf.is_missing(node, f.name):
            raise ConfigError(f"{key} is not set{hint or '; give it a value'}")
        value = node[f.name]
        sub = _plain(hints[f.name])
        if dataclasses.is_dataclass(sub):
            if isinstance(value, DictConfig):
                _check_ranges(sub, value, f"{key}.")
            continue
        if meta.get("check"):
            meta["check"](OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value,
                          key)
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{key}={value} is not one of: {', '.join(meta['choices'])}{hint}")
        if any(meta.get(k) is not None for k in ("gt", "ge", "lt", "le")):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value} must be a finite number{hint}")
            if not _within(value, meta):
                raise ConfigError(f"{key}={value} must be {_bounds_text(meta)}{hint}")
        items = {k[len("items_"):]: meta[k] for k in ("items_gt", "items_ge", "items_lt", "items_le")
                 if meta.get(k) is not None}
        if meta.get("finite") and any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"{key}={list(value)}: every value must be a finite number{hint}")
        if items and any(not _within(v, items) for v in value):
            raise ConfigError(f"{key}={list(value)}: every value must be {_bounds_text(items)}{hint}")


def _within(value, meta) -> bool:
    return not ((meta.get("gt") is not None and not value > meta["gt"])
                or (meta.get("ge") is not None and not value >= meta["ge"])
                or (meta.get("lt") is not None and not value < meta["lt"])
                or (meta.get("le") is not None and not value <= meta["le"]))


def check_group(group: str, node, schema) -> DictConfig:
    """One group option (``group=""``: the top-level keys) checked against its schema (typed result)."""
    prefix = f"{group}." if group else ""
    merged = _merge(schema, node, prefix)
    _check_ranges(schema, merged, prefix)
    return merged


def schema_for(group: str, node):
    """The schema of `node`, one option of `group`, looked up by its ``name`` among the registered
    ones; for a user's own implementation (``_target_``, or a method ``@register``-ed without a
    schema) the implementation's ``schema`` attribute, None when it has none (its keys are then its
    own business). The methods register when ``sparse_bench.sparsity.methods`` is imported."""
    if node.get("_target_"):
        return getattr(target_of(node, group), "schema", None)
    if group in _REGISTERED_BY and not _table(group):
        raise RuntimeError(f"no {group} is registered: import {_REGISTERED_BY[group]} before checking one "
                           f"(sparse_bench.validation.check does)")
    table = _table(group)
    name = node.get("name")
    registered = IMPLEMENTATIONS.get(group, {})
    if name not in table and name in registered:  # a user's @register-ed method without a registered schema
        return getattr(registered[name], "schema", None)
    if group == "schedule" and name is not None:
        return Schedule  # every schedule file, a user's own too, has these keys
    if name not in table:
        given = f"{group}.name={name} is not a known {group}" if name is not None else f"{group}.name is not set"
        raise ConfigError(f"{given}; choose one of: {', '.join(sorted(table))} "
                          f"(or name your own implementation with {group}._target_)")
    return table[name]


def check_option(group: str, node):
    """`node` (one option of `group`, e.g. the ``method`` node) checked against its schema: the
    typed config with every default filled in, or `node` itself when no schema applies (a user's
    implementation without one). The builders call this, so a direct call gets a run's checks."""
    schema = schema_for(group, node)
    if schema is None:
        return node
    try:
        data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else copy.deepcopy(dict(node))
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        raise unresolved(exc, group) from None
    target = data.pop("_target_", None)
    given = option_values(group, data.get("name")) if target is None else None
    if given is not None:  # a built-in option: what the call leaves out is its YAML's value
        data = OmegaConf.to_container(OmegaConf.merge(given, data))
    typed = check_group(group, data, schema)
    if target is None:
        return typed
    return OmegaConf.create({**OmegaConf.to_container(typed), "_target_": target})


def unresolved(exc: OmegaConfBaseException, where: str) -> ConfigError:
    """One line for an interpolation that does not resolve: a resolver's own ConfigError as it is
    (it names the key and the fix), otherwise the key and OmegaConf's first line."""
    cause = exc
    while cause is not None:
        if isinstance(cause, ConfigError):
            return cause.with_traceback(None)  # its own type too (MissingInput)
        cause = cause.__cause__ or cause.__context__
    return ConfigError(f"{getattr(exc, 'full_key', '') or where}: {str(exc).splitlines()[0]}")
