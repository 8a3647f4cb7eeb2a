"""OmegaConf resolvers the config uses in run and sweep folder names (registered on import).

* ``${sb.density_tag:${method.name},${density}}``: ``-d<density>``, or nothing for ``method=dense``
  (a dense run does not depend on `density`, so a density sweep trains it once).
* ``${sb.model_tag:${model.name},${oc.select:model.arch,null}}``: the model's name, with the
  architecture for models chosen by one (``timm_resnet18``), so two architectures never share
  a folder.
* ``${sb.job_dir:${run_name},${hydra.job.override_dirname}}``: a sweep job's folder: the run name
  plus the overrides the run name does not already say (``-method.prune_rate=0.3``), so identical
  jobs share a folder (and train once) and different ones never do.
"""

from __future__ import annotations

from omegaconf import OmegaConf

DENSE_METHODS = ("dense",)


def density_tag(method: str, density) -> str:
    return "" if str(method) in DENSE_METHODS else f"-d{density}"


def model_tag(name: str, arch=None) -> str:
    return f"{name}_{arch}" if arch not in (None, "", "None") else str(name)


def job_dir(run_name: str, overrides: str = "") -> str:
    extra = str(overrides or "").replace("/", "_")
    return f"{run_name}-{extra}" if extra else str(run_name)


def register() -> None:
    for name, fn in (("sb.density_tag", density_tag), ("sb.model_tag", model_tag), ("sb.job_dir", job_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
