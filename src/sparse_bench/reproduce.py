"""Launch the sweep behind one paper table row: every published density x the paper's seed count.

    sparse-bench-reproduce sm_mnist_lenet300_100            # runs the sweep (also: python -m sparse_bench.reproduce)
    sparse-bench-reproduce sm_mnist_lenet300_100 --dry-run  # prints the command
    sparse-bench-reproduce gse_cifar100_resnet56_rigl --seeds 1 --launcher submitit_slurm --gpus 4 \
        --partition gpu --time-min 720 --set dataset.root=/data/cifar100 -- hydra.launcher.account=lab

One job per configuration: with ``--gpus N`` each job is N processes (``tasks_per_node``), one GPU
each, that train together under DDP (set up from SLURM's variables, no torchrun needed); a job
stopped by its time limit or a preemption is requeued by the launcher and resumes from its last
finished epoch.

The experiment file's `paper:` block names the densities (`values`, the densities the published
runs used) and `seeds`; anything after `--` is passed to Hydra unchanged. A protocol value the
reference sets per density (``${sb.by_density:...}`` in the file) resolves in every job to that
job's density; the command prints each density's values first. A baseline's row runs
the comparing paper's protocol for it in its own file (``gse_cifar100_resnet56_rigl``);
``--method`` only swaps the method group on another row's data, model and schedule. Afterwards
`sparse-bench-tables runs/multirun/<name>` builds the table.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

import yaml

from .confdir import conf_dir

CONF = conf_dir() / "experiment"


def row(experiment: str) -> tuple[dict, list[float]]:
    """The experiment file (unresolved) and the densities of its published runs (else its own)."""
    path = CONF / f"{experiment}.yaml"
    if not path.exists():
        choices = ", ".join(sorted(p.stem for p in CONF.glob("*.yaml")))
        raise SystemExit(f"error: experiment={experiment} is unknown; choose one of: {choices}")
    cfg = yaml.safe_load(path.read_text()) or {}
    paper = cfg.get("paper") or {}
    return cfg, sorted({float(d) for d in (paper.get("values") or {})}) or [float(cfg.get("density", 0.05))]


#: --launcher: Hydra's launcher plugins installed with the project
LAUNCHERS = ("basic", "joblib", "submitit_local", "submitit_slurm")


def launcher_overrides(launcher: str | None, gpus: int | None, partition: str | None, time_min: int | None,
                       overrides: list[str]) -> list[str]:
    """The Hydra overrides the launcher flags stand for, then the --set overrides."""
    out = [f"hydra/launcher={launcher}"] if launcher else []
    submitit = (launcher or "").startswith("submitit")
    if (gpus or partition or time_min) and not submitit:
        raise SystemExit("error: --gpus, --partition and --time-min go to a submitit launcher; "
                         "add --launcher submitit_slurm (or submitit_local)")
    if gpus:
        out += [f"hydra.launcher.tasks_per_node={gpus}", "hydra.launcher.nodes=1"]
        if launcher == "submitit_slurm":
            out += [f"hydra.launcher.gpus_per_node={gpus}"]
    if partition:
        out.append(f"hydra.launcher.partition={partition}")
    if time_min:
        out.append(f"hydra.launcher.timeout_min={time_min}")
        if launcher == "submitit_slurm":  # a job stopped at its time limit is requeued (preemptions always are)
            out.append("hydra.launcher.max_num_timeout=20")
    return out + list(overrides)


def command(experiment: str, seeds: int | None, method: str | None, extra: list[str]) -> list[str]:
    cfg, densities = row(experiment)
    paper = cfg.get("paper") or {}
    n = seeds if seeds is not None else int(paper.get("seeds", 1))
    args = [sys.executable, "-m", "sparse_bench", "-m", f"experiment={experiment}",
            "density=" + ",".join(f"{d:.10g}" for d in densities), "seed=" + ",".join(str(s) for s in range(n)),
            f"sweep_name={experiment}" + (f"-{method}" if method else "")]
    if method:
        args.append(f"method={method}")
    return args + extra


def density_values(experiment: str) -> list[str]:
    """One line per published density: the experiment's density-dependent values
    (``sb.by_density``) there."""
    from omegaconf import OmegaConf

    from .identity import flat

    raw, densities = row(experiment)
    path = CONF / f"{experiment}.yaml"
    keys = [k for k, v in flat(raw).items() if isinstance(v, str) and "sb.by_density" in v]
    lines = []
    for d in densities:
        cfg = OmegaConf.load(path)
        cfg.density = d
        lines.append(f"density {d:g}: " + ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in keys))
    return lines if keys else []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--seeds", type=int, default=None, help="override the paper's seed count")
    ap.add_argument("--method", default=None,
                    help="swap the method group on this row's setup (a baseline's protocol is its own experiment file)")
    ap.add_argument("--launcher", choices=LAUNCHERS, default=None,
                    help="Hydra's launcher: one process after another (basic), local processes (joblib, "
                         "submitit_local) or SLURM jobs (submitit_slurm)")
    ap.add_argument("--gpus", type=int, default=None,
                    help="submitit: processes (and GPUs) per job, trained together under DDP")
    ap.add_argument("--partition", default=None, help="submitit_slurm: the SLURM partition")
    ap.add_argument("--time-min", type=int, default=None,
                    help="submitit: a job's time limit in minutes (a job stopped there is requeued and resumes)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for every job, e.g. --set dataset.root=/data (repeatable; anything "
                         "after -- is passed on too)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(own)
    cmd = command(a.experiment, a.seeds, a.method,
                  launcher_overrides(a.launcher, a.gpus, a.partition, a.time_min, a.overrides) + extra)
    for line in density_values(a.experiment):
        print(line)
    print(shlex.join(cmd))
    if a.dry_run:
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
