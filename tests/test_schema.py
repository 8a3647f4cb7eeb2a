"""The schema as the one place values are checked (the YAML files the one place values are written), every
builder checks its own group (so a direct call is refused like a run), and legal-but-pointless
update intervals are warned about at start."""

from __future__ import annotations

import dataclasses
import logging
import typing

import pytest
import torch
from omegaconf import MISSING, OmegaConf
from torch import nn

from sparse_bench import schema as S
from sparse_bench.data import build_data
from sparse_bench.errors import ConfigError
from sparse_bench.models import _BUILDERS, build_model
from sparse_bench.sparsity.methods import METHODS, MethodContext, build_method
from sparse_bench.train.optim import LRSchedule, build_optimizer

from conftest import CONF

GROUPS = ("method", "dataset", "model", "optimizer", "schedule", "logger")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_option_yaml_alone_is_a_complete_valid_option(group, option):
    """The YAML is where a built-in option's values live: each file alone gives every key its
    schema declares (a key left out would be 'not set') with a value the schema accepts."""
    given = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    schema = S.schema_for(group, given)
    assert schema is not None, f"{group}/{option} has no schema"
    typed = S.check_group(group, given, schema)
    assert typed.name == option


def _schemas():
    S.schema_for("method", {"name": "dense"})  # registers the method schemas
    seen = {S.Root, S.Schedule, *S.METHODS.values()}
    for table in S.GROUPS.values():
        seen.update(table.values())
    out, todo = set(), list(seen)
    while todo:  # nested schemas too (loss, eval, lr, normalize, augment, ...)
        cls = todo.pop()
        if cls in out or not dataclasses.is_dataclass(cls):
            continue
        out.add(cls)
        todo += [S._plain(t) for t in typing.get_type_hints(cls).values()]
    return sorted(out, key=lambda c: f"{c.__module__}.{c.__qualname__}")


@pytest.mark.parametrize("schema", _schemas(), ids=lambda c: c.__qualname__)
def test_no_builtin_schema_writes_a_default(schema):
    """One home for each value: a built-in schema declares types, ranges and roles, never a value
    (the YAML has them); the one exception is a key whose absence is meaningful (an experiment's
    published numbers, `paper`)."""
    optional_keys = {(S.Root, "paper")}
    for f in dataclasses.fields(schema):
        if (schema, f.name) in optional_keys:
            assert f.default is None
            continue
        assert f.default is MISSING and f.default_factory is dataclasses.MISSING, (
            f"{schema.__qualname__}.{f.name} has a default; write the value in the option's YAML instead")


def test_every_schema_has_an_implementation_and_back():
    assert set(S.MODELS) == set(_BUILDERS)
    S.schema_for("method", {"name": "dense"})  # registers the method schemas
    assert set(S.METHODS) == set(METHODS)
    assert {p.stem for p in (CONF / "dataset").glob("*.yaml")} == set(S.DATASETS)


# --- every builder checks its own group --------------------------------------------------------------

def _ctx(epochs: int = 2, steps_per_epoch: int = 10, density: float = 0.5) -> MethodContext:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x, y = torch.randn(6, 16), torch.randint(0, 4, (6,))
    return MethodContext(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                         density=density, epochs=epochs, steps_per_epoch=steps_per_epoch, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0), batches=lambda n, key=0: [(x, y)] * n,
                         loss_fn=nn.functional.cross_entropy)


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


MODEL = nn.Linear(3, 2)
# a schedule of the user's own gives every key (there is no YAML of ours to fill one in)
SCHED = {"name": "custom", "epochs": 2, "multiplier": 1.0, "warmup_epochs": 0.0,
         "lr": {"kind": "constant", "step_size": 0, "milestones": [], "gamma": 0.1, "min_lr": 0.0}}
BUILDERS = {
    "method": lambda c: build_method(OmegaConf.create(c), _ctx()),
    "dataset": lambda c: build_data(OmegaConf.create(c), torch.device("cpu"), 0),
    "model": lambda c: build_model(OmegaConf.create(c), (1, 8, 8), 10),
    "optimizer": lambda c: build_optimizer(OmegaConf.create(c), MODEL),
    "schedule": lambda c: LRSchedule(OmegaConf.create(c), 0.1, 10, 2),
}
REFUSED = [
    ("method", {"name": "rigl", "drop_fraction": 1.5}, "method.drop_fraction=1.5 must be in [0, 1]"),
    ("method", {"name": "set", "prune_rate": "abc"}, "method.prune_rate=abc is not a number"),
    ("method", {"name": "sparse_momentum", "growth": "bogus"}, "method.growth=bogus is not one of"),
    ("method", {"name": "dsr", "update_every": 0}, "method.update_every=0 must be"),
    ("method", {"name": "gse", "prune_rat": 0.3}, "method.prune_rat is not a config key"),
    ("method", {"name": "deepr", "exclude_pruned": "yes"}, "method.exclude_pruned=yes is not true or false"),
    ("method", {"name": "gmp", "start": 2}, "method.start=2 is not a mapping with the keys unit, value"),
    ("method", {"name": "lottery", "densities": [0.5, 0.6]}, "method.densities=[0.5, 0.6] must not increase"),
    ("method", {"name": "bogus"}, "method=bogus is unknown"),
    ("dataset", {"name": "digits", "batch_size": 0}, "dataset.batch_size=0 must be >= 1"),
    ("dataset", {"name": "synthetic", "noise": -1}, "dataset.noise=-1.0 must be >= 0"),
    ("dataset", {"name": "cifar10", "augment": {"flip": "yes"}}, "dataset.augment.flip=yes is not true or false"),
    ("dataset", {"name": "mnist", "root": ""}, "dataset.root is empty"),
    ("model", {"name": "mlp", "hidden": [0]}, "model.hidden=[0]: every value must be > 0"),
    ("model", {"name": "mlp", "dropout": 1.0}, "model.dropout=1.0 must be in [0, 1)"),
    ("model", {"name": "lenet5_caffe", "width": 2.0}, "model.width is not a config key"),
    ("optimizer", {"name": "sgd", "lr": -1}, "optimizer.lr=-1.0 must be > 0"),
    ("optimizer", {"name": "adam", "betas": [0.9]}, "optimizer.betas=[0.9] must be two numbers"),
    ("optimizer", {"name": "sgd", "momentum": 0.0, "nesterov": True}, "optimizer.nesterov=true needs"),
    ("schedule", {**SCHED, "warmup_epochs": -1}, "schedule.warmup_epochs=-1.0 must be >= 0"),
    ("schedule", {**SCHED, "lr": {**SCHED["lr"], "kind": "zigzag"}}, "schedule.lr.kind=zigzag is not one of"),
    ("schedule", {**SCHED, "lr": {**SCHED["lr"], "kind": "step", "step_size": 0}},
     "schedule.lr.step_size must be a positive"),
]


@pytest.mark.parametrize("group,cfg,message", REFUSED, ids=[m for _, _, m in REFUSED])
def test_each_builder_refuses_a_bad_value_in_one_line_when_called_directly(group, cfg, message):
    with pytest.raises(ConfigError) as err:
        BUILDERS[group](cfg)
    assert message in _one_line(err)


def test_builders_fill_in_the_yaml_defaults():
    opt = build_optimizer(OmegaConf.create({"name": "sgd"}), MODEL)  # sgd.yaml: lr 0.1, nesterov, wd 5e-4
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    lr = LRSchedule(OmegaConf.create({"name": "wrn_cifar"}), 0.1, 10, 200)  # wrn_cifar.yaml: 60/120/160, gamma 0.2
    assert lr.milestones == [600, 1200, 1600] and lr.gamma == 0.2
    data = build_data(OmegaConf.create({"name": "digits"}), torch.device("cpu"), 0)  # digits.yaml: batch 64
    assert data.train.batch_size == 64
    m = build_method(OmegaConf.create({"name": "dsr"}), _ctx(epochs=200, steps_per_epoch=100))
    assert m.cadence.schedule.steps == [0, 2500, 8000, 14000] and m.cadence.schedule.values == [100, 200, 400, 800]
    assert isinstance(m.cfg.np_target, float) and m.cfg.exclude_pruned is True


def test_a_users_method_is_checked_by_its_own_schema_or_gets_the_builtin_defaults(monkeypatch):
    import types
    from dataclasses import dataclass

    from sparse_bench.sparsity.methods.dense import Static

    class Plain(Static):
        pass

    @dataclass
    class OwnSchema:
        name: str = "own"
        init: str = S.choice(("uniform", "er"), default="uniform")  # a user's schema may hold defaults
        reinit: str = "none"
        boost: float = S.num(gt=0.0, default=1.0)

    class Own(Static):
        schema = OwnSchema

    monkeypatch.setitem(__import__("sys").modules, "mylab_schema", types.SimpleNamespace(Plain=Plain, Own=Own))
    m = build_method(OmegaConf.create({"name": "plain", "_target_": "mylab_schema.Plain", "extra": 1}), _ctx())
    assert (m.cfg.init, m.cfg.reinit, m.cfg.extra) == ("uniform", "none", 1)  # static's defaults under its own keys
    m = build_method(OmegaConf.create({"name": "own", "_target_": "mylab_schema.Own", "boost": 2}), _ctx())
    assert m.cfg.boost == 2.0
    with pytest.raises(ConfigError, match="method.boost=0.0 must be > 0"):
        build_method(OmegaConf.create({"name": "own", "_target_": "mylab_schema.Own", "boost": 0}), _ctx())


# --- an update interval the run never reaches ----------------------------------------------------------

NEVER = [  # on a 20-step run (2 epochs of 10 steps)
    ({"name": "rigl"}, "method.update_every=100 steps", "method.end (step 15)"),
    ({"name": "gse"}, "method.update_every=1000 steps", "method.end (step 12)"),
    ({"name": "set", "update_every": 50}, "method.update_every=50 steps", "the end of the run (step 20)"),
    ({"name": "sparse_momentum", "update_every": 20}, "method.update_every=20 steps", "the end of the run"),
    ({"name": "dsr"}, "a period schedule starting at 100 steps", "method.end (step 19)"),
    ({"name": "topkast"}, "method.update_every=100 steps", "the end of the run (step 20)"),
    ({"name": "set", "end": {"unit": "fraction", "value": 0.4}}, "method.update_every=epoch", "method.end (step 8)"),
]


@pytest.mark.parametrize("cfg,interval,until", NEVER, ids=[str(c) for c, _, _ in NEVER])
def test_an_update_interval_longer_than_the_run_is_one_warning(cfg, interval, until, caplog):
    with caplog.at_level(logging.WARNING, logger="sparse_bench"):
        m = build_method(OmegaConf.create(cfg), _ctx())
    lines = [r.getMessage() for r in caplog.records if "method.update_every" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert interval in lines[0] and until in lines[0] and "2-epoch run of 20 steps" in lines[0]
    assert m.cadence.first_update(10, 2) is None


@pytest.mark.parametrize("cfg", [{"name": "rigl", "update_every": 5}, {"name": "set"},
                                 {"name": "sparse_momentum"}, {"name": "gse", "update_every": 4},
                                 {"name": "dsr", "update_every": 7},
                                 {"name": "topkast", "explore_end": {"unit": "fraction", "value": 0.5}}],
                         ids=str)
def test_an_interval_that_fits_is_not_warned_about(cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="sparse_bench"):
        build_method(OmegaConf.create(cfg), _ctx())
    assert not [r for r in caplog.records if "method.update_every" in r.getMessage()]
