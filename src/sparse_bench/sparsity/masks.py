"""MaskSet: the masks over a model's prunable weights, for masked and sparse-executed layers.

Which tensors are prunable is a rule, logged with every run: by default the ``weight`` of every
``nn.Linear`` and ``nn.Conv*`` module; biases and normalisation weights stay dense. ``exclude``
keeps named parameters dense (fnmatch patterns, e.g. ``"fc3.weight"``), ``include`` adds
parameters that are not a module's weight (e.g. ``"*.in_proj_weight"``).

Masked layers (``execution=masked``) keep a dense weight and a bool mask; the masks are
re-applied after every optimizer step with one grouped ``_foreach_mul_`` over float copies of
the masks (made once per mask change, so no dtype conversion per step and no host sync).

Sparse layers (``execution=sparse``, see ``sparsity/execution``) hold only their active values;
their structure *is* the mask. Methods read and change masks the same way for both:

* the index-level calls (``active_indices``, ``active_values``, ``is_active``,
  ``inactive_indices``, ``replace_``, ``nnz``) never form a tensor of a weight's dense shape for
  a sparse layer (GSE uses only these);
* ``params`` / ``masks`` give dense views: for a sparse layer, the first access opens a dense
  copy of its weight, mask, optimizer state and (when the step formed one) dense gradient; the
  execution engine closes the views after the hook that opened them and rebuilds the layers'
  structures from what the method left in them (``last_rebuild_s`` is its cost). A method's
  update code therefore runs unchanged, paying for dense views on update steps only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

DEFAULT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def _module_types(names: Iterable[str]) -> tuple[type, ...]:
    types = []
    for n in names:
        t = getattr(nn, str(n), None)
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ConfigError(f"prunable.types: '{n}' is not a torch.nn module class; use e.g. [Linear, Conv2d]")
        types.append(t)
    return tuple(types)


def prunable_parameters(
    model: nn.Module,
    types: Sequence[str] = DEFAULT_TYPES,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs the rule selects, in the model's parameter order."""
    mod_types = _module_types(types)
    chosen: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, mod_types) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            chosen.add(f"{mod_name}.weight" if mod_name else "weight")
    out = []
    for name, p in model.named_parameters():
        selected = name in chosen or any(fnmatch.fnmatchcase(name, pat) for pat in include)
        if selected and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            out.append((name, p))
    return out


class _MaskList(list):
    """The bool masks; replacing an entry marks the derived float masks and counts stale."""

    def __init__(self, items, owner: MaskSet):
        super().__init__(items)
        self._owner = owner

    def __setitem__(self, i, value):
        super().__setitem__(i, value)
        self._owner._changed()


class MaskSet:
    """Masks for a list of parameters, with grouped apply and exact density accounting."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], model: nn.Module | None = None):
        if not named_params:
            raise ConfigError("prunable: the rule selects no parameters in this model; check prunable.types/exclude")
        empty = [n for n, p in named_params if p.numel() == 0]
        if empty:
            raise ConfigError(f"prunable: {empty[0]} has no weights (a layer of width 0?); give every layer a "
                              f"positive width, e.g. model.hidden=[300,100]")
        self.names = [n for n, _ in named_params]
        self._params: list = [p for _, p in named_params]
        self._masks = _MaskList([torch.ones_like(p, dtype=torch.bool) for p in self._params], self)
        self._shapes = [tuple(p.shape) for p in self._params]
        self._numels = [p.numel() for p in self._params]
        # the module owning each parameter, and its attribute name (None when unknown)
        self.owners: list[tuple[nn.Module, str] | None] = [None] * len(self.names)
        if model is not None:
            where = {}
            for _, mod in model.named_modules():
                for attr, p in mod._parameters.items():
                    if p is not None:
                        where.setdefault(id(p), (mod, attr))
            self.owners = [where.get(id(p)) for p in self._params]
        self.layers: list = [None] * len(self.names)  # sparse layer per entry (None: masked)
        self.optimizer: torch.optim.Optimizer | None = None
        self.keeps_inactive_state = False  # dense optimizer state of inactive weights is kept
        self.shadow: list[dict] = [{} for _ in self.names]
        self._any_sparse = False
        self._view = None
        self._float: list[torch.Tensor] = []
        self._float_params: list[torch.Tensor] = []
        self._counts: list[int] | None = None
        self._stale = True
        self.last_rebuild_s = 0.0
        # the active weights no update may take from a layer (prunable.allow_empty: false -> 1):
        # global rankings protect each layer's largest (ops.guard_layers), per-layer counts stop
        # short (ops.floored), and the trainer refuses to go on with an empty layer
        self.floor = 1

    @classmethod
    def from_model(cls, model: nn.Module, rule) -> MaskSet:
        rule = rule or {}
        ms = cls(
            prunable_parameters(
                model,
                types=list(rule.get("types", DEFAULT_TYPES)),
                exclude=list(rule.get("exclude", [])),
                include=list(rule.get("include", [])),
            ),
            model,
        )
        ms.floor = 0 if rule.get("allow_empty") else 1
        return ms

    def __len__(self) -> int:
        return len(self.names)

    def _changed(self) -> None:
        self._stale = True
        self._counts = None

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors the mask set itself keeps alive (bool masks of masked entries, their float
        copies, inactive weights' optimizer state): what it adds to a run's memory."""
        return ([m for m in self._masks if m is not None] + list(self._float)
                + [v for s in self.shadow for v in s.values()])

    # --- what the execution engine changes ------------------------------------------------------
    def run_sparse(self, active: bool, optimizer, keeps_inactive_state: bool | None = None) -> None:
        """Whether any entry is a sparse layer now (the methods then see views), and the optimizer
        whose state follows the layers (and whether inactive weights keep theirs)."""
        self._any_sparse = bool(active)
        self.optimizer = optimizer
        if keeps_inactive_state is not None:
            self.keeps_inactive_state = keeps_inactive_state
        self._changed()

    def adopt_layer(self, i: int, layer) -> None:
        """Entry `i` is held by the sparse `layer` from now on: its dense weight and mask are let go."""
        self.layers[i] = layer
        self._params[i] = None
        self._masks[i] = None
        self.owners[i] = (layer, "values")
        self._changed()

    # --- what the methods see -----------------------------------------------------------------
    @property
    def params(self) -> list:
        """The dense weights, one per entry: with sparse layers, those of the dense view open now
        (``dense_view()``); reading them with a sparse layer and no view open is an error, never a
        view opened behind the caller's back."""
        return self._dense_lists()[0]

    @property
    def masks(self) -> list:
        """The bool masks, one per entry (with sparse layers: the open dense view's, as ``params``)."""
        return self._dense_lists()[1]

    @masks.setter
    def masks(self, value) -> None:
        if self._view is not None:
            self._view[1][:] = list(value)
        elif self._any_sparse:
            self._dense_lists()  # raises: no view open
        else:
            self._masks = _MaskList(list(value), self)
        self._changed()

    def _dense_lists(self) -> tuple[list, list]:
        if self._view is not None:
            return self._view
        if self._any_sparse:
            raise RuntimeError("the dense weights or masks of sparse layers were read with no dense view open; "
                               "read them inside `with masks.dense_view():`, or use the index-level calls")
        return self._params, self._masks

    @contextlib.contextmanager
    def dense_view(self):
        """Dense views of the sparse layers (weights, masks, optimizer state) for a block of code
        that reads or changes them through ``params`` and ``masks``; closed (the sparse layers
        rebuilt from them) when the block ends. Without sparse layers, or inside an open view, it
        changes nothing."""
        opened = self._any_sparse and self._view is None
        if opened:
            self._open_view()
        try:
            yield self
        finally:
            if opened:
                self.close_view()

    def _dense_entry(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, mask) of entry i: a masked layer's own, or the open view's."""
        if self._view is not None:
            return self._view[0][i], self._view[1][i]
        return self._params[i], self._masks[i]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return list(self._shapes)

    @property
    def numels(self) -> list[int]:
        return list(self._numels)

    def is_sparse(self, i: int) -> bool:
        return self.layers[i] is not None

    def masked_entry(self, i: int) -> tuple[nn.Parameter, torch.Tensor]:
        """(dense weight, bool mask) of a masked layer, without opening views of sparse ones."""
        if self.layers[i] is not None:
            raise ValueError(f"{self.names[i]} is a sparse layer; use the index-level calls")
        return self._params[i], self._masks[i]

    @torch.no_grad()
    def draw_random(self, density: float, kind: str, generator: torch.Generator) -> None:
        """Random initial masks at `density` with the `kind` layer distribution (uniform / er /
        erk / bernoulli), applied. With no sparse layers yet this is exactly
        ``set_masks(random_masks(...))``; layers that are sparse already (built without a dense
        weight) get their exact count of positions by sparse sampling and values drawn with the
        layer type's default bound, without any tensor of the weight's dense size."""
        from .distributions import layer_counts, random_masks
        from .execution.layers import sample_positions

        if not self._any_sparse:
            self.set_masks(random_masks(self.shapes, density, kind, generator, self.names))
            return
        counts = layer_counts(self._shapes, density, "uniform" if kind == "bernoulli" else kind, self.names)
        for i, (shape, k) in enumerate(zip(self._shapes, counts)):
            layer = self.layers[i]
            if layer is None:
                n = self._numels[i]
                flat = torch.zeros(n, dtype=torch.bool)
                flat[torch.randperm(n, generator=generator)[:k]] = True
                self._masks[i] = flat.view(shape).to(self._params[i].device)
                continue
            lin = sample_positions(self._numels[i], k, generator)
            bound = getattr(layer, "init_bound", None) or 1.0 / max(layer.cols, 1) ** 0.5
            values = (torch.rand(k, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            layer.set_active(lin, values)
        self._changed()
        self.apply_()

    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        """Replace all masks (moved to each parameter's device) and apply them."""
        if len(masks) != len(self.names):
            raise ValueError("one mask per prunable parameter expected")
        params, current = self._dense_lists()
        for i, (m, p) in enumerate(zip(masks, params)):
            if tuple(m.shape) != self._shapes[i]:
                raise ValueError(f"mask for {self.names[i]} has shape {tuple(m.shape)}, expected {self._shapes[i]}")
            current[i] = m.to(device=p.device, dtype=torch.bool)
        self.apply_()

    def _refresh(self) -> None:
        """Float copies of the masked entries' masks, made once per mask change."""
        masks = self._view[1] if self._view is not None else self._masks
        params = self._view[0] if self._view is not None else self._params
        idx = [i for i in range(len(self.names)) if self.layers[i] is None or self._view is not None]
        old = {id(p): f for p, f in zip(self._float_params, self._float)}
        floats = []
        for i in idx:
            f = old.get(id(params[i]))
            if f is not None and f.shape == masks[i].shape and f.dtype == params[i].dtype:
                f.copy_(masks[i])  # in place: no new tensor per mask change
            else:
                f = masks[i].to(params[i].dtype)
            floats.append(f)
        self._float_params = [params[i] for i in idx]
        self._float = floats
        self._stale = False

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every inactive weight: one grouped multiply by float masks, no host sync."""
        if self._stale:
            self._refresh()
        if self._float_params:
            torch._foreach_mul_(self._float_params, self._float)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of inactive weights of masked layers (sparse layers have none)."""
        if self._stale:
            self._refresh()
        grads, ms = [], []
        for p, m in zip(self._float_params, self._float):
            if p.grad is not None:
                grads.append(p.grad)
                ms.append(m)
        if grads:
            torch._foreach_mul_(grads, ms)

    def dense_grads(self) -> list[torch.Tensor | None]:
        """The gradient of the loss w.r.t. each whole dense weight (masked: ``p.grad``; sparse:
        the one the layer formed in this step's backward when asked to, else None)."""
        out = []
        for i, layer in enumerate(self.layers):
            if layer is None:
                out.append(self._params[i].grad)
            else:
                g = layer.dense_grad
                out.append(None if g is None else g.view(self._shapes[i]))
        return out

    # --- counts -------------------------------------------------------------------------------
    @torch.no_grad()
    def nnz(self) -> list[int]:
        """Active weights per layer (at most one host sync; cached until the masks change)."""
        if self._view is not None:
            masks = self._view[1]
            return [int(c) for c in torch.stack([torch.count_nonzero(m) for m in masks]).cpu().tolist()]
        if self._counts is None:
            dense = [i for i, layer in enumerate(self.layers) if layer is None]
            counts = [0] * len(self.names)
            if dense:
                got = torch.stack([torch.count_nonzero(self._masks[i]) for i in dense]).cpu().tolist()
                for i, c in zip(dense, got):
                    counts[i] = int(c)
            for i, layer in enumerate(self.layers):
                if layer is not None:
                    counts[i] = layer.nnz
            self._counts = counts
        return list(self._counts)

    def density(self) -> float:
        return sum(self.nnz()) / sum(self._numels)

    def layer_densities(self) -> dict[str, float]:
        return {n: k / m for n, k, m in zip(self.names, self.nnz(), self._numels)}

    @torch.no_grad()
    def weight_density(self) -> float:
        """Fraction of prunable weights that are non-zero in the tensors themselves."""
        nz = 0
        for i, layer in enumerate(self.layers):
            nz += int((self._params[i] != 0).sum()) if layer is None else int((layer.values != 0).sum())
        return nz / sum(self._numels)

    # --- index-level access (no dense tensor for sparse layers) --------------------------------
    def active_indices(self, i: int) -> torch.Tensor:
        """Sorted flat positions of layer i's active weights."""
        if self.layers[i] is not None and self._view is None:
            return self.layers[i].active_linear()
        return self._dense_entry(i)[1].reshape(-1).nonzero().squeeze(1)

    def active_values(self, i: int) -> torch.Tensor:
        """Layer i's active weights, in the order of ``active_indices(i)`` (detached)."""
        if self.layers[i] is not None and self._view is None:
            return self.layers[i].values.detach()
        return self._dense_entry(i)[0].detach().reshape(-1)[self.active_indices(i)]

    def is_active(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        """Bool per flat position: is it active in layer i?"""
        if self.layers[i] is not None and self._view is None:
            act = self.layers[i].active_linear()
            if act.numel() == 0:
                return torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
            pos = torch.searchsorted(act, flat).clamp_max(act.numel() - 1)
            return act[pos] == flat
        return self._dense_entry(i)[1].reshape(-1)[flat]

    def inactive_indices(self, i: int) -> torch.Tensor:
        """Sorted flat positions of layer i's inactive weights (O(numel): dense-ish layers only)."""
        if self.layers[i] is not None and self._view is None:
            keep = torch.ones(self._numels[i], dtype=torch.bool, device=self.layers[i].values.device)
            keep[self.layers[i].active_linear()] = False
            return keep.nonzero().squeeze(1)
        return (~self._dense_entry(i)[1].reshape(-1)).nonzero().squeeze(1)

    @torch.no_grad()
    def replace_(self, drop: Sequence[torch.Tensor], grow: Sequence[torch.Tensor],
                 optimizer: torch.optim.Optimizer | None = None, reset: Sequence[str] = ("grown",)) -> None:
        """Per layer, deactivate the flat positions `drop[i]` and activate `grow[i]` (distinct; a
        position in both ends active): both end at exactly 0, and the optimizer state (momentum,
        Adam moments) is zeroed at the position sets `reset` names ("grown", "dropped"). The one
        way the drop-and-grow methods change masks (``methods.drop_grow``).

        A sparse layer (no dense view open) drops its entries' state with them and starts grown
        entries' state at 0, so it takes ``"grown"`` in `reset`: a method that keeps the state of
        grown weights works on dense views."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        unknown = set(reset) - {"grown", "dropped"}
        if unknown:
            raise ValueError(f"replace_: reset names {sorted(unknown)}; choose from 'grown', 'dropped'")
        for i, (d, g) in enumerate(zip(drop, grow)):
            layer = self.layers[i]
            if layer is None or self._view is not None:
                p, m = self._dense_entry(i)
                nm = m.clone()
                nm.view(-1)[d] = False
                nm.view(-1)[g] = True
                p.data.view(-1)[g] = 0.0
                p.data.view(-1)[d] = 0.0
                (self._view[1] if self._view is not None else self._masks)[i] = nm
                if optimizer is not None and reset:
                    for value in optimizer.state.get(p, {}).values():
                        if torch.is_tensor(value) and value.shape == p.shape:
                            for where in ([g] if "grown" in reset else []) + ([d] if "dropped" in reset else []):
                                value.view(-1)[where] = 0
                continue
            if "grown" not in reset:
                raise ValueError(f"{self.names[i]} is a sparse layer: its grown entries' optimizer state starts at 0; "
                                 f"open a dense view to keep it")
            t0 = time.perf_counter()
            act = layer.active_linear()
            keep = torch.ones(act.numel(), dtype=torch.bool, device=act.device)
            if d.numel():
                pos = torch.searchsorted(act, d.to(act.device))
                keep[pos] = False
            g = g.to(act.device, torch.int64)
            lin, order = torch.sort(torch.cat([act[keep], g]))
            vals = torch.cat([layer.values.detach()[keep], torch.zeros(g.numel(), dtype=layer.values.dtype,
                                                                       device=act.device)])[order]
            state = optimizer.state.get(layer.values) if optimizer is not None else None
            if state:
                for k, v in list(state.items()):
                    if torch.is_tensor(v) and v.shape == layer.values.shape:
                        state[k] = torch.cat([v[keep], torch.zeros(g.numel(), dtype=v.dtype, device=v.device)])[order]
            layer.set_active(lin, vals)
            self.last_rebuild_s += time.perf_counter() - t0
        self._changed()  # the weights at `drop` and `grow` are zero already

    # --- dense views of sparse layers (update steps) --------------------------------------------
    def _open_view(self):
        if self._view is not None:
            return self._view
        native = [n for n, layer in zip(self.names, self.layers) if getattr(layer, "init_bound", None)]
        if native:
            raise RuntimeError(f"a dense view of {native[0]} was asked for, but the layer is too big to hold "
                               f"densely; the method must use MaskSet's index-level calls")
        params, masks = [], []
        for i, layer in enumerate(self.layers):
            if layer is None:
                params.append(self._params[i])
                masks.append(self._masks[i])
                continue
            shape = self._shapes[i]
            p = nn.Parameter(layer.dense_weight().view(shape))
            if layer.dense_grad is not None:
                p.grad = layer.dense_grad.view(shape)
            lin = layer.active_linear()
            if self.optimizer is not None:
                state = self.optimizer.state.get(layer.values)
                if state:
                    dense = {}
                    for k, v in state.items():
                        if torch.is_tensor(v) and v.shape == layer.values.shape:
                            full = self.shadow[i].get(k)
                            full = torch.zeros(self._numels[i], dtype=v.dtype, device=v.device) if full is None \
                                else full.clone()
                            full[lin] = v
                            dense[k] = full.view(shape)
                        else:
                            dense[k] = v
                    self.optimizer.state[p] = dense
            params.append(p)
            m = torch.zeros(self._numels[i], dtype=torch.bool, device=lin.device)
            m[lin] = True
            masks.append(m.view(shape))
        self._view = (params, _MaskList(masks, self))
        self._changed()
        return self._view

    @property
    def view_open(self) -> bool:
        return self._view is not None

    @torch.no_grad()
    def close_view(self) -> bool:
        """Rebuild every sparse layer from its dense view (weights, mask, optimizer state), drop
        the views; True if views were open. The time it took is ``last_rebuild_s``."""
        if self._view is None:
            return False
        t0 = time.perf_counter()
        params, masks = self._view
        for i, layer in enumerate(self.layers):
            if layer is None:
                self._masks[i] = masks[i]
                continue
            p, m = params[i], masks[i]
            lin = m.reshape(-1).nonzero().squeeze(1)
            dense = self.optimizer.state.pop(p, None) if self.optimizer is not None else None
            layer.set_active(lin, p.data.reshape(-1)[lin])
            if dense:
                new = {}
                for k, v in dense.items():
                    if torch.is_tensor(v) and tuple(v.shape) == self._shapes[i]:
                        flat = v.reshape(-1)
                        new[k] = flat[lin].clone()
                        if self.keeps_inactive_state:
                            self.shadow[i][k] = flat
                    else:
                        new[k] = v
                self.optimizer.state[layer.values] = new
        self._view = None
        self._changed()
        self.last_rebuild_s += time.perf_counter() - t0
        return True

    @torch.no_grad()
    def broadcast_(self, optimizer, dist) -> int:
        """Rank 0's masks (or sparse structures), weights and optimizer state on every rank
        (`dist` is torch.distributed); returns how many layers differed here before."""
        self.close_view()
        differed = 0
        for i, layer in enumerate(self.layers):
            if layer is None:
                p = self._params[i]
                mine = self._masks[i].clone()
                m = self._masks[i].to(torch.uint8)
                dist.broadcast(m, src=0)
                self._masks[i] = m.bool()
                differed += int(not torch.equal(mine, self._masks[i]))
                dist.broadcast(p.data, src=0)
                tensors = [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.shape == p.shape]
            else:
                mine = layer.active_linear()
                n = torch.tensor([mine.numel()], dtype=torch.int64, device=mine.device)
                dist.broadcast(n, src=0)
                lin = mine.clone() if int(n) == mine.numel() else torch.empty(
                    int(n), dtype=torch.int64, device=mine.device)
                dist.broadcast(lin, src=0)
                vals = layer.values.detach().clone() if int(n) == mine.numel() else torch.empty(
                    int(n), dtype=layer.values.dtype, device=lin.device)
                dist.broadcast(vals, src=0)
                same = lin.numel() == mine.numel() and torch.equal(lin, mine)
                differed += int(not same)
                state = optimizer.state.get(layer.values, {})
                if not same:
                    layer.set_active(lin, vals)
                    for k, v in list(state.items()):
                        if torch.is_tensor(v) and v.dim() == 1 and v.numel() == mine.numel():
                            state[k] = torch.zeros(lin.numel(), dtype=v.dtype, device=v.device)
                else:
                    layer.values.data.copy_(vals)
                tensors = [v for v in state.values() if torch.is_tensor(v) and v.shape == layer.values.shape]
                tensors += [v for v in self.shadow[i].values()]
            for value in tensors:
                dist.broadcast(value, src=0)
        self._changed()
        self.apply_()
        return differed

    # --- bookkeeping ----------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "prunable": {n: list(s) for n, s in zip(self.names, self._shapes)},
            "total": sum(self._numels),
        }

    def state_dict(self) -> dict:
        """Masks of masked layers (a sparse layer's structure is saved with the model), and the
        dense optimizer state of inactive weights where a method keeps it."""
        self.close_view()
        out = {"names": list(self.names),
               "masks": [None if layer is not None else m.detach().cpu().clone()
                         for layer, m in zip(self.layers, self._masks)]}
        if any(self.shadow):
            out["shadow"] = [{k: v.detach().cpu().clone() for k, v in s.items()} for s in self.shadow]
        return out

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("checkpoint masks are for different parameters")
        self.close_view()
        for i, m in enumerate(state["masks"]):
            if m is not None and self.layers[i] is None:
                self._masks[i] = m.to(device=self._params[i].device, dtype=torch.bool)
        for i, s in enumerate(state.get("shadow") or []):
            if self.layers[i] is not None:
                dev = self.layers[i].values.device
                self.shadow[i] = {k: v.to(dev) for k, v in s.items()}
        self._changed()
