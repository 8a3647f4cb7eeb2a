"""OmegaConf resolvers the config uses in run and sweep folder names (registered on import).

* ``${sb.density_tag:${method.name},${density}}``: ``-d<density>``, or nothing for a dense method (``method=dense``)
  (a dense run does not depend on `density`, so a density sweep trains it once).
* ``${sb.model_tag:${model.name},${oc.select:model.arch,null}}``: the model's name, with the
  architecture for models chosen by one (``timm_resnet18``), so two architectures never share
  a folder.
* ``${sb.job_dir:${run_name},${hydra.job.override_dirname}}``: a sweep job's folder: the run name
  plus the overrides the run name does not already say (``-method.prune_rate=0.3``), so identical
  jobs share a folder (and train once) and different ones never do.
* ``${sb.by_density:${density},{0.1: 0.138, 0.2: 0.07}}``: a protocol value that the reference sets
  per density (an experiment row's ``method.prune_rate`` where the reference's commands give each
  density its own): the value for the run's density, resolved when the config is composed, so
  ``--cfg job --resolve``, the run's ``config.yaml`` and every job of a density sweep show the
  value that density trains with. A density the table does not list is refused in one line
  naming the key, the densities it lists and how to set the value by hand.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from .errors import ConfigError, MissingInput


def dense_methods() -> tuple[str, ...]:
    """The registered methods that train without masks (their class says ``sparse = False``), so
    `density` means nothing to them: one home for "dense", the method itself."""
    from .sparsity.methods import METHODS

    return tuple(name for name, cls in METHODS.items() if not getattr(cls, "sparse", True))


def density_tag(method: str, density) -> str:
    return "" if str(method) in dense_methods() else f"-d{density}"


def model_tag(name: str, arch=None) -> str:
    return f"{name}_{arch}" if arch not in (None, "", "None") else str(name)


def structure_tag(name, n=None, m=None, shape=None) -> str:
    """The run name's mark of a structure: none for unstructured, ``-2of4`` for N:M, ``-fan_in``,
    ``-block4x4``."""
    if str(name) in ("unstructured", "None"):
        return ""
    if str(name) == "block" and shape is not None:
        return f"-block{'x'.join(str(int(s)) for s in shape)}"
    return f"-{n}of{m}" if str(name) == "nm" else f"-{name}"


def job_dir(run_name: str, overrides: str = "") -> str:
    extra = str(overrides or "").replace("/", "_")
    return f"{run_name}-{extra}" if extra else str(run_name)


def by_density(density, table, *, _node_=None):
    """The value `table` ({density: value}) gives for `density` (see the module docstring)."""
    key = _node_._get_full_key(None) if _node_ is not None else "this key"
    values = {round(float(d), 10): v for d, v in dict(table).items()}
    try:
        return values[round(float(density), 10)]
    except KeyError:
        listed = ", ".join(f"{d:g}" for d in sorted(values))
        raise ConfigError(f"{key} depends on the density and the reference gives it for density {listed} only, "
                          f"not {density}; pick one of those densities or set {key}=<value> yourself") from None


def required(what: str, *, _node_=None):
    """A value an experiment cannot give and the user must (``${sb.required:'what it is'}``): the
    user's override replaces the interpolation; left alone, it is one line naming the key."""
    key = _node_._get_full_key(None) if _node_ is not None else "this key"
    raise MissingInput(key, f"{key} is not set: this experiment needs {what}; pass {key}=PATH")


def register() -> None:
    for name, fn in (("sb.density_tag", density_tag), ("sb.model_tag", model_tag), ("sb.job_dir", job_dir),
                     ("sb.structure_tag", structure_tag),
                     ("sb.by_density", by_density), ("sb.required", required)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
