"""The whole config checked against every registered option's schema, before any data is read.

It sits above the schema and what registers with it: ``sparse_bench.schema`` (the typed building
blocks, the top level, optimizers, schedules, loggers), then ``sparse_bench.data``,
``sparse_bench.models`` and ``sparse_bench.sparsity.methods``, whose imports register each data
set, model and method with its schema, so a config checked here has every built-in option, and
every ``@register``-ed method of the user's imported so far, to be checked against. The error
lines are the schema's (:func:`sparse_bench.schema.check_option`).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import data as _data  # noqa: F401  (registers every data set with its schema)
from . import models as _models  # noqa: F401  (registers every model with its schema)
from . import schema as S
from .errors import ConfigError
from .sparsity import methods as _methods  # noqa: F401  (registers every method with its schema)


def check(cfg) -> DictConfig:
    """The whole config (without its `hydra` node) checked against the schema, resolved and typed."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    plain.pop("hydra", None)
    try:
        data = OmegaConf.to_container(plain, resolve=True)
    except OmegaConfBaseException as exc:
        raise S.unresolved(exc, "the config") from None
    groups = ("method", *S.GROUPS)
    top = {k: v for k, v in data.items() if k not in groups}
    if isinstance(top.get("resume"), bool):  # `resume=true` arrives as a bool
        top["resume"] = str(top["resume"]).lower()
    out = OmegaConf.to_container(S.check_group("", top, S.Root))
    if out["eval"]["ema_decay"] is not None and out["execution"] != "masked":  # two keys
        raise ConfigError(f"eval.ema_decay with execution={out['execution']}: the weight average is kept for masked "
                          f"layers only (a sparse layer's values change size at every update); use execution=masked")
    if out["precision"] == "fp16" and out["execution"] != "masked":  # two keys
        raise ConfigError(f"precision=fp16 with execution={out['execution']}: the sparse layers' dense gradients are "
                          f"not unscaled by the fp16 gradient scaler; use precision=bf16 or execution=masked")
    if out["eval"]["test_on"] == "best" and not out["checkpoint"]["keep_best"]:  # two keys
        raise ConfigError("eval.test_on=best tests the best epoch's checkpoint, which is kept only with "
                          "checkpoint.keep_best=true; set it, or eval.test_on=final")
    if out["init_from_masks"] and out["init_from"] is None:  # two keys
        raise ConfigError("init_from_masks=true takes the masks of init_from, which is null; pass init_from=PATH "
                          "or drop init_from_masks")
    for group in groups:
        node = data.get(group)
        if not isinstance(node, dict):
            raise ConfigError(f"{group} is not chosen; pass e.g. {group}=<option>")
        typed = S.check_option(group, node)
        out[group] = OmegaConf.to_container(typed) if OmegaConf.is_config(typed) else typed
    return OmegaConf.create(out)
