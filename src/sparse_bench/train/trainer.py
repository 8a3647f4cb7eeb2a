"""One trainer for every method: train, validate, test, log, checkpoint.

What it writes, in order (metrics.jsonl, and W&B when enabled): one record per mask update,
as it happens (``"update": true`` with its ``step`` and ``epoch``, the epoch in progress), one
record per finished epoch (``train/*``, ``val/*``, ``density/*``, ``flops/train_total`` so far,
plus the epoch-end update's keys for readers that look there) and a last ``"final": true``
record with the test metrics and FLOP figures.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import RunFailed
from ..sparsity.flops import FlopMeter
from ..sparsity.methods import Method, call_hook
from . import distributed as dist_util
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .logging import MetricSink, NullSink, Progress, console_line, final_line
from .optim import LRSchedule, set_lr
from .precision import FP32, Amp

log = logging.getLogger("sparse_bench")

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # checkpoint.keep_best: the checkpoint of the best epoch by TrainPlan.best_metric


def summed_loss(loss_fn):
    """The loss summed over the batch instead of averaged (same criterion, same options)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return nn.CrossEntropyLoss(weight=loss_fn.weight, ignore_index=loss_fn.ignore_index,
                                   reduction="sum", label_smoothing=loss_fn.label_smoothing)
    return lambda out, y: loss_fn(out, y) * y.shape[0]


def hooked_step(method: Method, optimizer: torch.optim.Optimizer, step: int, forward, hooks=(),
                amp: Amp = FP32, clip_grad_norm: float | None = None):
    """One optimizer step with a method's hooks in the trainer's order: ``before_forward``, the
    forward pass and loss (``forward()``, returning the loss or a tuple whose first item is the
    loss; under `amp`'s autocast), backward, ``before_optimizer_step`` (where methods edit
    gradients, unscaled under fp16), gradient clipping (`clip_grad_norm`, over every parameter the
    optimizer holds), ``optimizer.step()``, ``after_optimizer_step`` (where masks are re-applied).
    Returns what ``forward()`` returned; the caller advances the step and calls
    ``on_step_end(step + 1)``. `hooks` (the execution engine) run around each of the method's
    hooks (``call_hook``). The Trainer, the tests that drive a method by hand and the benchmarks
    all step through it."""
    call_hook(method, hooks, "before_forward", step)
    with amp.autocast():
        result = forward()
    optimizer.zero_grad(set_to_none=True)
    amp.backward(result[0] if isinstance(result, tuple) else result)
    amp.unscale_(optimizer)
    call_hook(method, hooks, "before_optimizer_step", step)
    if clip_grad_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm, foreach=True)
    amp.step(optimizer)
    call_hook(method, hooks, "after_optimizer_step", step)
    return result


def _ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` to hold the weight average (starts at the weights as they are)."""
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def _timed(iterable, wait: list):
    """`iterable`'s items, the seconds spent waiting for each added to ``wait[0]``."""
    it = iter(iterable)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        wait[0] += time.perf_counter() - t0
        yield item


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (torch._dynamo's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class TrainPlan:
    """How long a run trains and what it measures beside training (read from the config by
    ``run.build_parts``)."""

    epochs: int  # epochs to train (the schedule's, times its multiplier and the method's rounds)
    steps_per_epoch: int | None = None  # at most this many steps an epoch (limit_train_batches)
    base_epochs: int | None = None  # the 1x schedule dense FLOPs are counted over (epochs if None)
    train_eval_samples: int = 0  # training samples measured in eval mode after each epoch
    test_every_epoch: bool = False
    log_every: int = 0  # a console line every this many steps (0: once an epoch)
    progress: bool = True  # a progress bar
    fingerprint: str = ""  # the run config's hash, written into every checkpoint
    nonfinite_check_every: int = 100  # on CUDA: steps between reads of the non-finite-loss flag
    precision: str = "fp32"  # fp32 | bf16 | fp16 (train.precision)
    clip_grad_norm: float | None = None  # the gradients' global norm is clipped to this (None: not clipped)
    channels_last: bool = False  # 4-d inputs (and the model, see run.build_parts) in channels_last
    compile: bool = False  # the training forward through torch.compile (eager again if compiling fails)
    compile_backend: str = "inductor"
    ema_decay: float | None = None  # an average of the weights kept on the masks, evaluated as ema/*
    best_metric: str = "val/acc"  # what the best epoch is chosen by (a name ending in "loss": lowest)
    keep_best: bool = False  # that epoch's checkpoint kept as best.pt
    test_on: str = "final"  # final | best: the model the test set is evaluated on


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule: LRSchedule,
                 method: Method, data, device: torch.device, loss_fn, run_dir: Path, plan: TrainPlan,
                 dist: dist_util.Dist | None = None, flops: FlopMeter | None = None,
                 train_model: nn.Module | None = None, hooks=()):
        self.model = model
        # the module the training forward runs through (DDP wrapper under torchrun)
        self.train_model = train_model if train_model is not None else model
        self.dist = dist or dist_util.Dist()
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.method = method
        self.hooks = list(hooks)  # run around the method's hooks (the execution engine)
        self.data = data
        self.device = device
        self.epochs = plan.epochs
        self.loss_fn = loss_fn
        self.run_dir = Path(run_dir)
        self.progress = plan.progress
        self.max_steps = plan.steps_per_epoch
        self.train_eval_samples = int(plan.train_eval_samples or 0)
        self.test_every_epoch = plan.test_every_epoch
        self.log_every = int(plan.log_every or 0)
        self.flops = flops
        self.base_epochs = int(plan.base_epochs or plan.epochs)  # the 1x schedule dense FLOPs are counted over
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps done
        self.best: dict = {}
        self.train_time = 0.0
        self.fingerprint = plan.fingerprint  # the run config's hash, written into every checkpoint
        # under DDP every rank's loss is weighted by its share of the global batch
        self._sum_loss = summed_loss(loss_fn)  # DDP: each rank's summed loss, weighted
        # a non-finite loss is caught at the step it happens; on CUDA the flag is read every
        # `nonfinite_check_every` steps (and before every checkpoint) to keep the step sync-free
        self.nonfinite_check_every = 1 if device.type == "cpu" else int(plan.nonfinite_check_every)
        self._first_bad = None
        self._last_x = None
        self.amp = Amp(plan.precision, device)
        self.clip_grad_norm = plan.clip_grad_norm
        self.channels_last = plan.channels_last
        self.compile = plan.compile
        self.compile_backend = plan.compile_backend
        self._compiled = None  # the compiled training module, made at the first step
        self._graphs_before = 0
        self.throughput: dict = {}  # the last epoch's samples_per_s, ms_per_step and data_wait (results.json)
        self.ema_decay = plan.ema_decay
        self.ema = _ema_copy(model) if plan.ema_decay is not None else None
        self._ema_started = False  # the average starts at the weights of the first step's end
        self._ema_prunable: list | None = None
        self.best_metric, self.keep_best, self.test_on = plan.best_metric, plan.keep_best, plan.test_on
        self._best_pending = False  # this epoch is the best so far: save() writes best.pt too
        self.run_info: dict = {}  # config, input shape, classes, prunable shapes: written into every checkpoint

    # --- one epoch ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int, sink: MetricSink | None = None) -> dict:
        """Train one epoch; every mask update goes to `sink` as its own record right away."""
        sink = NullSink() if sink is None else sink
        self.model.train()
        loader = self.data.train
        loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        n_batches = len(loader) if self.max_steps is None else min(len(loader), self.max_steps)
        per_rank = self.dist.world if self.dist.enabled and getattr(loader, "sharded", False) else 1
        _sync(self.device)
        t0 = time.perf_counter()
        bar = Progress(epoch, self.epochs, n_batches, enabled=self.progress and self.dist.is_main,
                       log_every=self.log_every)
        wait = [0.0]  # seconds spent waiting for the loader
        for i, (x, y) in enumerate(_timed(loader, wait)):
            if i >= n_batches:
                break
            global_n = int(y.shape[0])
            samples = global_n * per_rank  # the global batch, before this rank's slice (FLOP count)
            x, y = self._shard(loader, x, y)
            set_lr(self.optimizer, self.lr_schedule(self.method.schedule_step(self.step)))

            def forward(x=x, y=y, global_n=global_n):
                out = self._train_forward(x)
                if self.dist.enabled:
                    # DDP averages the ranks' gradients equally; weighting each rank's summed loss
                    # by world / global batch makes that average the single-process mean
                    # gradient, whatever the split (an odd batch, a short last batch, an empty slice)
                    batch_loss = self._sum_loss(out, y)
                    loss = batch_loss * (self.dist.world / self._global_count(loader, global_n, y))
                    return loss, out, batch_loss.detach()
                loss = self.loss_fn(out, y)
                return loss, out, loss.detach() * y.shape[0]

            self._last_x = x  # read only if the loss turns non-finite (which input was it?)
            _, out, loss_detached = hooked_step(self.method, self.optimizer, self.step, forward, self.hooks,
                                                self.amp, self.clip_grad_norm)
            if self.flops is not None:
                self.flops.step(self.step, samples)
            self.step += 1
            self._watch_loss(loss_detached, epoch)
            if self.log_every and self.step % self.log_every == 0 and sink.wants_steps:  # one sync per log_every
                sink.log_step({"step": self.step, "epoch": epoch, "train/step_loss": float(loss_detached) / y.shape[0],
                               "train/step_lr": self.optimizer.param_groups[0]["lr"]})
            step_logs = call_hook(self.method, self.hooks, "on_step_end", self.step)
            if step_logs:
                dist_util.verify_masks(self.method, self.dist, self.step)
                self._log_update(sink, epoch, step_logs)
            if self.ema is not None:
                self._update_ema()
            with torch.no_grad():
                loss_sum += loss_detached
                correct += (out.argmax(1) == y).sum()
            seen += y.shape[0]
            bar.update(i + 1, loss_sum, correct, seen, self.step, self.epochs * n_batches)
        bar.close()
        self._check_loss(epoch)
        seen_t = dist_util.all_reduce_sum(torch.tensor(float(seen), device=self.device), self.dist)
        dist_util.all_reduce_sum(loss_sum, self.dist)
        dist_util.all_reduce_sum(correct, self.dist)
        seen = int(seen_t)
        _sync(self.device)
        elapsed = time.perf_counter() - t0
        self.train_time += elapsed
        steps = min(i + 1, n_batches) if n_batches else 0
        logs = {
            "train/loss": float(loss_sum) / max(seen, 1),
            "train/acc": float(correct) / max(seen, 1),
            "time/epoch_s": elapsed,
            "throughput/samples_per_s": seen / elapsed if elapsed > 0 else 0.0,
            "throughput/ms_per_step": 1000.0 * elapsed / max(steps, 1),
            "throughput/data_wait": min(wait[0] / elapsed, 1.0) if elapsed > 0 else 0.0,  # fraction of the epoch
        }
        self.throughput = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("throughput/")}
        return logs

    def _check_layers(self, logs: dict) -> None:
        """No prunable layer trains at zero active weights (``prunable.allow_empty: false``): the
        methods never take a layer's last weight, so one that did is stopped here, loudly, rather
        than finishing as a complete run cut in two. Reads the per-layer densities the update's or
        epoch's logs carry (no extra host sync)."""
        masks = getattr(self.method, "masks", None)
        if masks is None or masks.floor <= 0:
            return
        empty = [k[len("density/"):] for k, v in logs.items()
                 if k.startswith("density/") and k != "density/achieved" and v == 0]
        if empty:
            raise RunFailed(f"method={self.method.name} left {empty[0]} with no active weight at step {self.step}; "
                            f"every prunable layer keeps one (prunable.allow_empty=false), so this is a bug of the "
                            f"method: please report it (prunable.allow_empty=true lets a method empty a layer)")

    def _log_update(self, sink, epoch: int, logs: dict) -> None:
        """A mask update: its own record (step, epoch in progress), then the FLOP meter counts
        the new masks."""
        self._check_layers(logs)
        if self.flops is not None:
            self.flops.update(self.step)
        sink.log({"epoch": epoch, "step": self.step, "update": True, **logs})

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights (buffers copied), then the masks applied to
        it, so the average is a model of the current masks: one grouped lerp, no host sync."""
        ema_p = [p for p in self.ema.parameters()]
        weights = [p.detach() for p in self.model.parameters()]
        if self._ema_started:
            torch._foreach_lerp_(ema_p, weights, 1.0 - self.ema_decay)
        else:  # the weights after set-up (masks drawn, re-initialised) and one step
            torch._foreach_copy_(ema_p, weights)
            self._ema_started = True
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)
        masks = getattr(self.method, "masks", None)
        if masks is not None:
            if self._ema_prunable is None:  # the average's copies of the prunable weights, found once
                named = dict(self.ema.named_parameters())
                self._ema_prunable = [named[n] for n in masks.names]
            masks.apply_to_(self._ema_prunable)

    @torch.no_grad()
    def evaluate(self, loader, max_samples: int | None = None, model: nn.Module | None = None
                 ) -> tuple[float, float]:
        """Mean loss and accuracy in eval mode (over the first `max_samples` when given) of the
        trained model, or of `model` (the weight average)."""
        model = self.model if model is None else model
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        for x, y in loader:
            if max_samples is not None:
                if n >= max_samples:
                    break
                x, y = x[: max_samples - n], y[: max_samples - n]
            n_global = y.shape[0]
            x, y = self._shard(loader, x, y)
            with self.amp.autocast():
                out = model(self._layout(x))
            loss_sum += nn.functional.cross_entropy(out.float(), y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            n += n_global if not getattr(loader, "sharded", False) else y.shape[0]
        dist_util.all_reduce_sum(loss_sum, self.dist)
        dist_util.all_reduce_sum(correct, self.dist)
        if getattr(loader, "sharded", False):
            n = int(dist_util.all_reduce_sum(torch.tensor(float(n), device=self.device), self.dist))
        return float(loss_sum) / max(n, 1), float(correct) / max(n, 1)

    # --- the forward pass: layout and compilation ---------------------------------------------
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _train_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._layout(x)
        if not self.compile:
            return self.train_model(x)
        if self._compiled is None:
            self._graphs_before = _compiled_graphs()
            self._compiled = torch.compile(self.train_model, backend=self.compile_backend)
            try:  # the first call compiles; a failure falls back to eager, said in one line
                return self._compiled(x)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: train eagerly instead
                log.warning(f"compile=true: torch.compile failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); training eagerly instead")
                self.compile = False
                return self.train_model(x)
        return self._compiled(x)

    # --- guards -----------------------------------------------------------------------------
    def _global_count(self, loader, global_n: int, y) -> float | torch.Tensor:
        """Samples in this step's global batch: a number, or for per-rank loaders a sum over the
        ranks that stays on the device (read on the host it would stall every step)."""
        if not getattr(loader, "sharded", False):
            return float(global_n)
        n = torch.full((), float(y.shape[0]), device=self.device)
        return dist_util.all_reduce_sum(n, self.dist)

    def _watch_loss(self, loss: torch.Tensor, epoch: int) -> None:
        """Remember the first step whose loss is not finite (on the device), and stop there."""
        bad = ~torch.isfinite(loss)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first_bad = torch.where(bad & (self._first_bad < 0), self.step, self._first_bad)
        if self.step % self.nonfinite_check_every == 0:
            self._check_loss(epoch)

    def _check_loss(self, epoch: int) -> None:
        """Stop at the first non-finite loss seen so far (reads one device scalar)."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first < 0:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        kept = (f"its last checkpoint is the end of epoch {self.epoch}" if self.epoch > 0
                else "no epoch had finished, so there is no checkpoint")
        x = getattr(self, "_last_x", None)
        if torch.is_tensor(x) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise RunFailed(
                f"the training loss became non-finite (nan or inf) at epoch {epoch}, step {first}, and the "
                f"training inputs themselves are not finite after normalisation; the run stopped there and {kept}. "
                f"Check dataset.normalize (a std of about 0 divides by 0) and the data files")
        raise RunFailed(
            f"the training loss became non-finite (nan or inf) at epoch {epoch}, step {first}; the run stopped "
            f"there and {kept}. Likely cause: the learning rate "
            f"({lr:.4g} at that point) is too high for this model; lower optimizer.lr or add a warm-up "
            f"(schedule.warmup_epochs)")

    def _shard(self, loader, x, y):
        """Under DDP, this rank's slice of a global batch (loaders with their own sampler are
        already per rank)."""
        if not self.dist.enabled or getattr(loader, "sharded", False):
            return x, y
        return dist_util.shard(x, self.dist), dist_util.shard(y, self.dist)

    # --- the loop -----------------------------------------------------------------------------
    def fit(self, sink: MetricSink) -> dict:
        for epoch in range(self.epoch + 1, self.epochs + 1):
            rec = {"epoch": epoch, "epochs": self.epochs}
            rec.update(self.train_epoch(epoch, sink))
            rec["lr"] = self.optimizer.param_groups[0]["lr"]
            if self.train_eval_samples > 0:
                # the training set measured like the test set (eval mode, fixed samples): shows
                # under-training against a dense run, which the running train/loss hides
                # (without augmentation where the data set augments, in a fixed order)
                loader = getattr(self.data, "train_eval", None)
                loader = self.data.train if loader is None else loader
                loader.set_epoch(0)
                rec["train_eval/loss"], rec["train_eval/acc"] = self.evaluate(loader, self.train_eval_samples)
            if self.data.val is not None:
                rec["val/loss"], rec["val/acc"] = self.evaluate(self.data.val)
                if self.ema is not None:
                    rec["ema/val/loss"], rec["ema/val/acc"] = self.evaluate(self.data.val, model=self.ema)
            if self.test_every_epoch and epoch < self.epochs:
                rec["test/loss"], rec["test/acc"] = self.evaluate(self.data.test)
            method_logs = call_hook(self.method, self.hooks, "on_epoch_end", epoch, self.step)
            if method_logs:
                dist_util.verify_masks(self.method, self.dist, self.step)
                self._log_update(sink, epoch, method_logs)
                rec.update(method_logs)  # also in the epoch record, where older readers look
            rec.update(self.method.density_logs())
            self._check_layers(rec)
            if self.flops is not None:
                rec["flops/train_total"] = self.flops.train_total
            if self._compiled is not None and self.compile:
                # graphs compiled so far (1 + recompiles): a mask update must not add one
                rec["compile/graphs"] = _compiled_graphs() - self._graphs_before
            rec["step"] = self.step
            self.epoch = epoch
            self._track_best(rec)
            sink.log(rec, wandb_skip=method_logs or ())
            if self.dist.is_main:
                log.info(console_line(rec))
            self.save()
        return self.finish(sink)

    def _track_best(self, rec: dict) -> None:
        """The best epoch so far by `best_metric` (a tie goes to the later epoch), with the epoch's
        validation metrics and density; marks best.pt to be written with this epoch's checkpoint."""
        value = rec.get(self.best_metric)
        if value is None:
            return
        old = self.best.get("value")
        lower = self.best_metric.endswith("loss")
        if old is None or (value <= old if lower else value >= old):
            self.best = {"metric": self.best_metric, "value": value, "epoch": rec["epoch"], "step": rec["step"],
                         **{k: v for k, v in rec.items() if k.startswith(("val/", "train_eval/", "ema/val/"))},
                         **({"density/achieved": rec["density/achieved"]} if "density/achieved" in rec else {})}
            self._best_pending = self.keep_best

    def flop_summary(self) -> dict:
        if self.flops is None:
            return {}
        return self.flops.summary(self.epoch, self.base_epochs)

    def finish(self, sink: MetricSink) -> dict:
        rec = {"epoch": self.epoch, "step": self.step, "final": True}
        if self.test_on == "best":
            rec["test/loss"], rec["test/acc"] = self._evaluate_best()
            rec["test/epoch"] = self.best["epoch"]
        else:
            rec["test/loss"], rec["test/acc"] = self.evaluate(self.data.test)
        if self.ema is not None:
            rec["ema/test/loss"], rec["ema/test/acc"] = self.evaluate(self.data.test, model=self.ema)
        rec.update(self.method.density_logs())
        rec.update(self.flop_summary())
        sink.log(rec)
        if self.dist.is_main:
            log.info(final_line(rec))
        return rec

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "train_time": self.train_time,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "amp": self.amp.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "method": self.method.state_dict(),
            "flops": self.flops.state_dict() if self.flops is not None else None,
            "rng": rng_state(),
            "run": self.run_info,
        }

    def _evaluate_best(self) -> tuple[float, float]:
        """The test set on the best epoch's model (best.pt's weights, sparse layers' structure
        included), then the final weights put back."""
        if not self.best.get("epoch"):
            raise RunFailed(f"eval.test_on=best, but no epoch reported {self.best_metric}; nothing to test")
        state = load_checkpoint(self.run_dir / BEST, map_location=self.device, config_fingerprint=self.fingerprint)
        final = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(state["model"])
        try:
            return self.evaluate(self.data.test)
        finally:
            self.model.load_state_dict(final)

    def save(self) -> None:
        """The epoch's checkpoint, after best.pt when this epoch is the best so far (so a crash
        between the two never leaves a checkpoint naming a best epoch that best.pt does not hold)."""
        if self.dist.is_main:
            paths = [self.run_dir / BEST] if self._best_pending else []
            save_checkpoint([*paths, self.run_dir / CHECKPOINT], self.state_dict(), self.fingerprint)
        self._best_pending = False
        dist_util.barrier(self.dist)

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.amp.load_state_dict(state.get("amp"))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
            self._ema_started = True
        call_hook(self.method, self.hooks, "load_state_dict", state["method"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best = dict(state.get("best", {}))
        self.train_time = float(state.get("train_time", 0.0))
        if self.flops is not None and state.get("flops") is not None:
            self.flops.load_state_dict(state["flops"])
        set_rng_state(state["rng"])
