"""``execution``: run prunable layers masked (dense kernels times a mask) or sparse.

``Execution`` is a trainer hook (``methods.base.call_hook``): the trainer calls the method's hooks
and, around each, the engine's ``before`` and ``after``. With them it

* converts the chosen prunable layers to sparse layers once the initial masks exist (after
  ``setup``, or before a checkpoint is loaded on resume), moving each layer's optimizer entry
  from the dense weight to the active values;
* before each forward pass, asks the method whether this step's backward must form the dense
  weight gradient (``Method.wants_dense_grad``: RigL on the step before an update, sparse
  momentum every step) and tells the sparse layers, which then add one dense GEMM;
* after the optimizer step, where the method keeps the optimizer state of inactive weights
  (``Method.keeps_inactive_state``: sparse momentum's growth signal is the momentum of
  inactive weights), advances that dense state with the dense gradient the way the optimizer
  would (SGD momentum, Adam moments);
* after every hook, closes any dense view a method's update left open (``MaskSet.dense_view``)
  and logs the cost of rebuilding the sparse structures as ``sparse/rebuild_s``.

Under ``execution=sparse`` on a GPU with 2:4 sparse tensor cores and a structure of at most 2 in
4, the Linear layers the 2:4 tensors take stay masked and run their forward product on them
(``semistructured.TwoFourLinear``; plan entry ``TWO_FOUR``) instead of becoming CSR layers.

``execution=auto`` times, per layer, a forward and backward of the masked (dense) layer and of
the sparse layer on the layer's own input shape and density, keeps the faster, and logs the
choice; the plan is saved in the run folder (``execution.json``) so a resumed run rebuilds the
same layers. Timings depend on the machine's load, so two measurements of one configuration can
choose differently, and a masked and a sparse layer round floats differently: the first plan
measured for a configuration (its recipe and density, on this device kind, whatever the seed) is
also kept under ``paths.runs`` (``.execution-plans/``, ``shared_plan``) and every later run of it
there, each job of a sweep included, takes that plan instead of measuring again, so repeats of one
command stay bit-identical. A method or layer that cannot run sparse says so in one line at start
and runs masked.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError, RunFailed
from ...sidefiles import read_object
from ...train.checkpoint import atomic_write_json
from . import kernels, semistructured
from .layers import DenseGradControl, SparseConv2d, SparseLayer, SparseLinear, keep_channel_major, sparse_twin

log = logging.getLogger("sparse_bench")

EXECUTIONS = ("masked", "sparse", "auto")
PLAN_FILE = "execution.json"
#: the plan entry of a Linear run masked with its forward product on 2:4 semi-structured tensors
TWO_FOUR = "2:4: masked, the forward product on semi-structured tensors"
#: execution=sparse: a prunable Linear / Conv2d whose dense weight would hold more than this many
#: weights (1 GiB in float32) is built without one (see build_model_for)
DENSE_BUILD_LIMIT = 1 << 28


def build_model_for(mode: str, build, device: torch.device, rule: dict, limit: int | None = None) -> nn.Module:
    """The model, built as ``build()`` builds it, except that under execution=sparse/auto a
    prunable layer too big to hold densely (more than `limit` weights) never gets a dense
    weight: the model is built on the meta device, every other parameter and buffer is
    materialised and initialised by its module's ``reset_parameters`` (the big layers' biases by
    nn.Linear's / nn.Conv2d's default rule), and the big weights stay shapes only until the
    engine makes them sparse layers and the method draws their masks and values. Such a run is
    not bit-identical to execution=masked (which could not hold the layer anyway); one line says
    which layers. Models whose layers all fit are built exactly as under execution=masked."""
    if mode == "masked":
        return build().to(device)
    from ..masks import prunable_parameters

    limit = DENSE_BUILD_LIMIT if limit is None else limit
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the probe leaves the RNG as it was
        probe = build()
    named = prunable_parameters(probe, rule)
    big = {id(p) for _, p in named if p.numel() > limit}
    if not big:
        return build().to(device)
    owners = {}
    for mod in probe.modules():
        for attr, p in mod._parameters.items():
            if p is not None and id(p) in big and attr == "weight" and not isinstance(sparse_twin(mod), str):
                owners[id(mod)] = mod
    if len(owners) < len(big):
        raise ConfigError(f"execution={mode}: a prunable tensor over {limit:,} weights is not the weight of a "
                          f"Linear or Conv2d with a sparse kernel; it cannot be held densely either")
    names = [n for n, p in named if id(p) in big]
    log.info(f"execution={mode}: {', '.join(names)} too big to hold densely (> {limit:,} weights): built without a "
             f"dense weight; masks and values are drawn for the active weights only")
    for mod in probe.modules():
        if id(mod) in owners:
            b = mod._parameters.get("bias")
            if b is not None:
                fan_in = mod.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                mod._parameters["bias"] = nn.Parameter(torch.empty(b.shape, device=device).uniform_(-bound, bound))
            mod.sparse_native = True  # built without a dense weight (read by Execution)
            continue
        has_own = any(t is not None for t in [*mod._parameters.values(), *mod._buffers.values()])
        if has_own:
            mod.to_empty(device=device, recurse=False)
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    return probe


def execution_mode(cfg) -> str:
    value = str(cfg.get("execution", "masked"))
    if value not in EXECUTIONS:
        raise ConfigError(f"execution={value} is unknown; choose one of: {', '.join(EXECUTIONS)}")
    return value


def parents_of(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    out = []
    for mod in model.modules():
        for name, child in mod._modules.items():
            if child is target:
                out.append((mod, name))
    return out


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` sits in `model`."""
    for parent, name in parents_of(model, old):
        setattr(parent, name, new)


def keep_sparse_layouts(model: nn.Module) -> None:
    """Once `model` holds sparse convolutions, its batch norms, poolings and ReLUs keep their layout
    (layers.keep_channel_major)."""
    if any(isinstance(m, SparseConv2d) for m in model.modules()):
        keep_channel_major(model)


class Execution:
    """The prunable layers of `method` executed masked or sparse: a hook the trainer runs around the
    method's hooks (see the module docstring)."""

    def __init__(self, method, mode: str, optimizer: torch.optim.Optimizer, model: nn.Module,
                 dist=None, run_dir: Path | None = None, batches=None, loss_fn=None, shared_plan: Path | None = None):
        self.method = method
        self.shared_plan = Path(shared_plan) if shared_plan is not None else None
        self.mode = mode
        self.optimizer = optimizer
        self.model = model
        self.dist = dist
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.batches = batches
        self.loss_fn = loss_fn
        self.control = DenseGradControl()
        self.plan: dict[str, str] = {}  # parameter name -> "sparse" | "masked: why"
        self.notes: list[str] = []
        self.timings: dict[str, tuple[float, float]] = {}
        self.whole_model_ms: dict[str, float] = {}  # auto: whole training steps per plan (see _whole_model)
        self.active = False  # any layer sparse
        self.two_four: list[tuple[nn.Module, int]] = []  # TwoFourLinear layers and their mask entries
        masks = method.masks
        if mode != "masked" and masks is not None:
            support = getattr(method, "sparse_execution", True)
            native = [n for n, o in zip(masks.names, masks.owners)
                      if o is not None and getattr(o[0], "sparse_native", False)]
            if native and (support is not True or getattr(method, "needs_dense_views", True)):
                why = support if support is not True else "its updates read dense views of the layers"
                raise ConfigError(f"execution={mode}: {native[0]} is too big to hold densely, but method="
                                  f"{method.name} cannot train it ({why}); use method=gse or method=static")
            if support is not True:
                self.notes.append(f"execution={mode}: method={method.name} runs masked: {support}")
                self.mode = "masked"
            elif native:
                # layers built without a dense weight are sparse from the start (empty until setup)
                cands = self.candidates()
                for i, name in enumerate(masks.names):
                    if name in native:
                        self._convert_one(i, cands[i], resume=True)
                        self.plan[name] = "sparse"
                self.active = True
                masks.run_sparse(True, optimizer)

    # --- choosing and converting layers ---------------------------------------------------------
    def candidates(self) -> dict[int, type]:
        """Entries that can run sparse, with their sparse class; the others get a note."""
        out = {}
        masks = self.method.masks
        for i, name in enumerate(masks.names):
            owner = masks.owners[i]
            if masks.layers[i] is not None:  # sparse already (built without a dense weight)
                out[i] = type(masks.layers[i])
                continue
            if owner is None or owner[1] != "weight":
                self.plan[name] = "masked: not a module's weight"
                continue
            twin = sparse_twin(owner[0])
            if isinstance(twin, str):
                self.plan[name] = f"masked: {twin} has no sparse kernel"
                continue
            if owner[0].weight.dtype != torch.float32 and owner[0].weight.device.type == "cpu":
                self.plan[name] = f"masked: dtype {owner[0].weight.dtype} (the CPU kernels are float32)"
                continue
            out[i] = twin
        return out

    def _load_plan(self) -> dict[str, str] | None:
        """The plan a resumed run rebuilds its layers by (execution.json), checked: one line naming
        the file when it is not one this tool wrote."""
        if self.run_dir is None:
            return None
        path = self.run_dir / PLAN_FILE
        fix = "remove it and pass resume=false to start the run over"
        rec = read_object(path, fix=fix)
        if rec is None:
            return None
        plan = rec.get("plan")
        if not isinstance(plan, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in plan.items()):
            raise ConfigError(f"{path} holds no plan of prunable layers (a 'plan' of names to 'sparse' or "
                              f"'masked: ...'); {fix}")
        return plan

    def _record(self) -> dict:
        return {"execution": self.mode, "kernels": kernels.backend(), "plan": self.plan,
                "timings_ms": {k: {"masked": a * 1e3, "sparse": b * 1e3} for k, (a, b) in self.timings.items()},
                "whole_model_ms": self.whole_model_ms}

    def _save_plan(self) -> None:
        if self.run_dir is None or (self.dist is not None and not self.dist.is_main):
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / PLAN_FILE).write_text(json.dumps(self._record(), indent=2))

    def _read_shared(self) -> dict[str, str] | None:
        """The plan measured first for this configuration (None: none yet, or measured with other
        kernels, or unreadable: then this run measures and replaces it)."""
        try:
            rec = json.loads(self.shared_plan.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(rec, dict) and rec.get("kernels") == kernels.backend() and isinstance(rec.get("plan"), dict)
        return rec["plan"] if ok else None

    @contextlib.contextmanager
    def _shared_lock(self):
        """Held by the main process while it reads, measures and writes the shared plan, so the
        parallel jobs of a sweep measure once between them."""
        if self.shared_plan is None or (self.dist is not None and not self.dist.is_main):
            yield
            return
        try:
            self.shared_plan.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.shared_plan.with_suffix(".lock"), "a")
        except OSError:  # an unwritable runs folder: measure for this run alone
            self.shared_plan = None
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _measured_or_shared(self, cands: dict[int, type]) -> dict[int, type]:
        """execution=auto: the shared plan of this configuration if there is one (every process
        takes the main one's), else this machine's measurement, which becomes the shared plan."""
        masks = self.method.masks
        with self._shared_lock():
            shared = self._read_shared() if self.shared_plan is not None and (self.dist is None or self.dist.is_main) \
                else None
            if self.dist is not None and self.dist.enabled:
                import torch.distributed as tdist

                box = [shared]
                tdist.broadcast_object_list(box, src=0)
                shared = box[0]
            if shared is not None:
                self.notes.append(f"execution=auto: the plan measured first for this configuration, from "
                                  f"{self.shared_plan or 'the main process'} (repeats stay bit-identical; delete "
                                  f"the file to measure again)")
                for i in cands:
                    self.plan[masks.names[i]] = shared.get(masks.names[i], "masked")
                return {i: c for i, c in cands.items() if shared.get(masks.names[i]) == "sparse"}
            chosen = self._auto(cands)
            if self.shared_plan is not None and (self.dist is None or self.dist.is_main):
                plan = {**self.plan, **{masks.names[i]: "sparse" for i in chosen}}
                try:
                    atomic_write_json(self.shared_plan, {**self._record(), "plan": plan})
                except RunFailed:
                    pass  # not shared: this run still has its own plan in execution.json
            return chosen

    def convert(self, resume: bool = False) -> None:
        """Replace the chosen layers by sparse ones (resume: empty, the checkpoint fills them)."""
        masks = self.method.masks
        if masks is None or self.mode == "masked":
            self._report()
            return
        cands = self.candidates()
        chosen: dict[int, type] = {}
        saved = self._load_plan() if resume else None
        self._two_four(cands, saved)
        if saved is not None:
            chosen = {i: c for i, c in cands.items() if saved.get(masks.names[i]) == "sparse"}
            for i in cands:
                if i not in chosen:
                    self.plan[masks.names[i]] = saved.get(masks.names[i], "masked")
        elif self.mode == "sparse":
            chosen = dict(cands)
        else:
            chosen = self._measured_or_shared(cands)
        for i, cls in chosen.items():
            if masks.layers[i] is None:
                self._convert_one(i, cls, resume)
            self.plan[masks.names[i]] = "sparse"
        self.active = bool(chosen)
        keep_sparse_layouts(self.model)
        masks.run_sparse(self.active, self.optimizer, bool(getattr(self.method, "keeps_inactive_state", False)))
        if masks.keeps_inactive_state and self.active:
            kind = type(self.optimizer).__name__
            if kind not in ("SGD", "Adam", "AdamW"):
                raise ConfigError(f"execution={self.mode}: method={self.method.name} keeps the optimizer state of "
                                  f"inactive weights, supported for optimizer=sgd/adam/adamw, not {kind}")
        self._save_plan()
        self._report()

    def _two_four(self, cands: dict[int, type], saved: dict[str, str] | None) -> None:
        """execution=sparse where 2:4 semi-structured products are available (CUDA, sm >= 80) under
        a structure of at most 2 in 4: its Linear layers stay masked layers whose forward product
        runs on the 2:4 tensors (semistructured.TwoFourLinear) instead of becoming CSR layers; a
        resumed run does so for the layers its plan names. Taken out of `cands`."""
        masks = self.method.masks
        for i in list(cands):
            name, owner = masks.names[i], masks.owners[i]
            if owner is None or masks.layers[i] is not None:
                continue
            if saved is not None:
                want = saved.get(name) == TWO_FOUR
            else:
                want = self.mode == "sparse" and semistructured.routes(owner[0], masks.structure)
            if want:
                owner[0].__class__ = semistructured.TwoFourLinear  # the class only: parameters and state stay
                self.two_four.append((owner[0], i))
                self.plan[name] = TWO_FOUR
                del cands[i]
        self._point_two_four()

    def _point_two_four(self) -> None:
        """Give each TwoFourLinear its current mask (a method may have replaced the tensor)."""
        for mod, i in self.two_four:
            mod.mask = self.method.masks.masked_entry(i)[1]

    @torch.no_grad()
    def _convert_one(self, i: int, cls, resume: bool) -> None:
        masks = self.method.masks
        mod, _ = masks.owners[i]
        w = mod.weight
        layer = cls.from_dense(mod, None if resume else masks.masked_entry(i)[1])
        layer.control = self.control
        replace_module(self.model, mod, layer)
        for group in self.optimizer.param_groups:
            group["params"] = [layer.values if p is w else p for p in group["params"]]
        state = self.optimizer.state.pop(w, None)
        if w.device.type != "meta":
            layer.init_bound = None
        else:  # built without a dense weight: values are drawn with the layer type's default bound
            layer.init_bound = 1.0 / math.sqrt(layer.cols) if layer.cols > 0 else 0.0
        if state and not resume:
            lin = layer.active_linear()
            self.optimizer.state[layer.values] = {
                k: (v.reshape(-1)[lin].clone() if torch.is_tensor(v) and v.shape == w.shape else v)
                for k, v in state.items()}
        masks.adopt_layer(i, layer)

    def _report(self) -> None:
        if self.dist is not None and not self.dist.is_main:
            return
        for note in self.notes:
            log.info(note)
        masks = self.method.masks
        if masks is None or not self.plan:
            return
        sparse = [n for n, v in self.plan.items() if v == "sparse"]
        masked = {n: v for n, v in self.plan.items() if v != "sparse"}
        if self.mode == "auto":
            for n, (a, b) in self.timings.items():
                log.info(f"execution=auto: {n} {self.plan[n].split(':')[0]} "
                         f"(masked {a * 1e3:.3f} ms, sparse {b * 1e3:.3f} ms per forward+backward)")
        line = f"execution={self.mode}: {len(sparse)} of {len(self.plan)} prunable layers sparse"
        if sparse:
            line += f" (kernels: {kernels.backend()})"
        if masks.structure.kind == "fan_in":  # every row the same count: the condensed kernels where compiled
            condensed = sum(isinstance(layer, SparseLinear) and kernels.compiled_for(layer.values)
                            for layer in masks.layers)
            if condensed:
                line += f"; {condensed} Linear on the condensed fan-in kernels"
        log.info(line)
        for n, why in masked.items():
            if self.mode != "auto" or not why.startswith("masked: slower"):
                log.info(f"execution={self.mode}: {n} runs {why}")

    # --- auto: measure each layer both ways ------------------------------------------------------
    def _input_shapes(self, mods: list[nn.Module]) -> dict[int, tuple]:
        shapes: dict[int, tuple] = {}
        handles = []

        def hook(mod, args):  # the input's shape, and whether the backward needs its gradient
            shapes.setdefault(id(mod), (tuple(args[0].shape), bool(args[0].requires_grad)))

        # one fresh statistics batch (a pure function of the key: no data stream moves)
        x = next(iter(self.batches(1, 0)), (None,))[0] if self.batches is not None else None
        if x is None:
            return shapes
        for m in mods:
            handles.append(m.register_forward_pre_hook(hook))
        try:
            was = self.model.training
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):
                self.model.eval()
                self.model(x)
            self.model.train(was)
        finally:
            for h in handles:
                h.remove()
        return shapes

    def _auto(self, cands: dict[int, type]) -> dict[int, type]:
        masks = self.method.masks
        mods = {i: masks.owners[i][0] for i in cands}
        shapes = self._input_shapes(list(mods.values()))
        chosen = {}
        decisions = []
        if self.dist is None or self.dist.is_main:
            for i, cls in cands.items():
                shape = shapes.get(id(mods[i]))
                if shape is None:
                    decisions.append(False)
                    self.plan[masks.names[i]] = "masked: not reached by a forward pass"
                    continue
                t_masked, t_sparse = time_layer(mods[i], cls, masks.masked_entry(i)[1], *shape)
                self.timings[masks.names[i]] = (t_masked, t_sparse)
                decisions.append(t_sparse < t_masked)
            decisions = self._whole_model(cands, decisions)
        if self.dist is not None and self.dist.enabled:
            import torch.distributed as tdist

            box = [decisions]
            tdist.broadcast_object_list(box, src=0)
            decisions = box[0]
        for (i, cls), yes in zip(cands.items(), decisions):
            if yes:
                chosen[i] = cls
            elif masks.names[i] not in self.plan:
                self.plan[masks.names[i]] = "masked: slower sparse at this density (measured)"
        return chosen

    def _whole_model(self, cands: dict[int, type], decisions: list[bool]) -> list[bool]:
        """Layers timed alone do not see what switching layouts between neighbours costs: the
        per-layer plan, every candidate sparse and every one masked are timed as whole training
        steps (forward and backward on a statistics batch, best of 3, interleaved), and the
        fastest is taken, so auto is never slower than masked as measured here. Returns the
        decisions, one per candidate."""
        batch = next(iter(self.batches(1, 0)), None) if self.batches is not None else None
        if batch is None or not cands:
            return decisions
        plans = {"per layer": decisions, "all sparse": [True] * len(cands), "masked": [False] * len(cands)}
        if not any(decisions):
            plans.pop("per layer")
        times = {name: float("inf") for name in plans}
        models = {name: self._planned_copy(cands, plan) for name, plan in plans.items()}
        with torch.random.fork_rng(devices=[]):
            for _ in range(3):
                for name, model in models.items():
                    times[name] = min(times[name], _time_step(model, batch))
        best = min(times, key=times.get)
        self.notes.append("execution=auto: whole training steps, " + ", ".join(
            f"{name} {t * 1e3:.1f} ms" for name, t in times.items()) + f"; took {best}")
        self.whole_model_ms = {name: t * 1e3 for name, t in times.items()}
        return plans[best]

    def _planned_copy(self, cands: dict[int, type], plan: list[bool]) -> nn.Module:
        """A copy of the model with the candidates `plan` marks made sparse (as convert() would)."""
        masks = self.method.masks
        names = {id(m): n for n, m in self.model.named_modules()}
        model = copy.deepcopy(self.model)
        inside = dict(model.named_modules())
        for (i, cls), yes in zip(cands.items(), plan):
            owner = masks.owners[i][0] if masks.owners[i] is not None else None
            if not yes or owner is None or isinstance(owner, SparseLayer):
                continue
            mod = inside[names[id(owner)]]
            replace_module(model, mod, cls.from_dense(mod, masks.masked_entry(i)[1]))
        keep_sparse_layouts(model)
        return model.train()

    # --- per step ---------------------------------------------------------------------------------
    def _close(self, logs):
        masks = self.method.masks
        if masks is not None:
            masks.close_view()
        if logs and self.active and masks.last_rebuild_s > 0:
            logs = dict(logs)
            logs["sparse/rebuild_s"] = masks.last_rebuild_s  # dense views closed / structures rebuilt
        if masks is not None:
            masks.last_rebuild_s = 0.0
        return logs

    # --- the hook: before and after each of the method's hooks (methods.base.call_hook) ----------
    def before(self, name: str, *args) -> None:
        if name == "before_forward" and self.two_four:
            self._point_two_four()
        if name == "before_forward" and self.active:  # this step's backward forms dense gradients?
            self.control.grads = {}
            self.control.dense = bool(self.method.wants_dense_grad(args[0]))
        elif name == "before_optimizer_step" and self.active and self.dist is not None and self.dist.enabled:
            self._average_grads()

    def after(self, name: str, logs, *args):
        if name == "after_optimizer_step" and self.active and self.method.masks.keeps_inactive_state \
                and self.control.grads:
            self._advance_inactive_state()
        logs = self._close(logs)
        if name == "setup":  # the initial masks exist: convert the chosen layers
            self.convert()
        return logs

    @torch.no_grad()
    def _advance_inactive_state(self) -> None:
        """The optimizer's state update, on the dense gradient, for the inactive weights' state
        (the active entries are overwritten from the values' state whenever a view opens)."""
        masks = self.method.masks
        opt = self.optimizer
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        for i, layer in enumerate(masks.layers):
            if layer is None:
                continue
            g = self.control.grads.get(layer)
            if g is None:
                continue
            g = g.reshape(-1)
            group = group_of[id(layer.values)]
            shadow = masks.shadow[i]
            if isinstance(opt, torch.optim.SGD):
                mu, damp = group["momentum"], group.get("dampening", 0.0)
                if mu == 0:
                    continue
                buf = shadow.get("momentum_buffer")
                if buf is None:
                    shadow["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(mu).add_(g, alpha=1 - damp)
            else:  # Adam / AdamW: weight decay adds wd * w = 0 for inactive weights
                b1, b2 = group["betas"]
                m = shadow.setdefault("exp_avg", torch.zeros_like(g))
                v = shadow.setdefault("exp_avg_sq", torch.zeros_like(g))
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)

    # --- DDP ----------------------------------------------------------------------------------------
    def prepare_ddp(self, model: nn.Module) -> None:
        """Keep DDP's fixed-size buckets away from the sparse layers (their nnz can change): their
        values' gradients (and dense gradients) are averaged in ``before_optimizer_step``, in one
        all-reduce, and their structure is broadcast after mask updates (``broadcast_masks``)."""
        if not self.active:
            return
        from torch.nn.parallel import DistributedDataParallel

        names = []
        for mname, mod in model.named_modules():
            if isinstance(mod, SparseLayer):
                pre = f"{mname}." if mname else ""
                names += [pre + "values", pre + "indptr", pre + "indices"]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)

    @torch.no_grad()
    def _average_grads(self) -> None:
        import torch.distributed as tdist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [layer.values.grad for layer in self.method.masks.layers
                 if layer is not None and layer.values.grad is not None]
        grads += list(self.control.grads.values())
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        tdist.all_reduce(flat)
        flat.div_(self.dist.world)
        for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(f)


def _time_step(model: nn.Module, batch) -> float:
    """Seconds of one forward and backward of `model` on a batch (x, y): cross-entropy on y."""
    x, y = batch[0], batch[1]
    dev = x.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = model(x)
    nn.functional.cross_entropy(out.float(), y).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return elapsed


def time_layer(mod: nn.Module, cls, mask: torch.Tensor, input_shape: tuple, input_grad: bool = True,
               repeats: int = 5) -> tuple[float, float]:
    """Best-of-`repeats` seconds of one forward + backward (weight gradient, and the input
    gradient if `input_grad`) of the masked layer and of its sparse twin at `mask`, on random
    inputs of `input_shape`."""
    dev = mod.weight.device
    x = torch.randn(input_shape, device=dev, dtype=mod.weight.dtype)
    dense = copy.deepcopy(mod)
    sparse = cls.from_dense(copy.deepcopy(mod), mask)

    def run(layer):
        xi = x.detach().requires_grad_(input_grad)
        out = layer(xi)
        out.backward(torch.ones_like(out))

    def best(layer):
        run(layer)
        t = float("inf")
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            run(layer)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = min(t, time.perf_counter() - t0)
        return t

    tm, ts = best(dense), best(sparse)
    tm, ts = min(tm, best(dense)), min(ts, best(sparse))  # interleaved: A B A B
    return tm, ts
