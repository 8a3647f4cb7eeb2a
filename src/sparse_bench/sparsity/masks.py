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
* ``params`` / ``masks`` are the dense weights and masks; for sparse layers they exist only
  inside ``with masks.dense_view():``, which opens a dense copy of each sparse layer's weight,
  mask, optimizer state and (when the step formed one) dense gradient, and at its end rebuilds the
  layers from what the block left in them (``last_rebuild_s`` is its cost). Outside a view they
  are refused for sparse layers, so no dense copy is ever made behind a method's back.

Each entry is one prunable tensor in one of two forms with the same calls: a
:class:`MaskedTensor` (a dense weight and its bool mask) or a :class:`SparseTensor` (a sparse
layer, whose structure is its mask); a dense view of a sparse tensor is a ``MaskedTensor``. The
mask set loops over its entries; it does not ask which form each one is.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..confdir import config_values
from ..errors import ConfigError
from .ops import fill_at_
from .structure import Structure


def _module_types(names: Iterable[str]) -> tuple[type, ...]:
    types = []
    for n in names:
        t = getattr(nn, str(n), None)
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise ConfigError(f"prunable.types: '{n}' is not a torch.nn module class; use e.g. [Linear, Conv2d]")
        types.append(t)
    return tuple(types)


def full_rule(rule=None) -> dict:
    """The prunable rule `rule` (``types``, ``exclude``, ``include``, ``allow_empty``; any of them
    may be left out) over the values of ``prunable`` in ``conf/config.yaml``."""
    return {**config_values()["prunable"], **{k: v for k, v in dict(rule or {}).items() if v is not None}}


def prunable_parameters(model: nn.Module, rule=None) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs the rule selects (:func:`full_rule`), in the model's parameter order."""
    rule = full_rule(rule)
    types, exclude, include = list(rule["types"]), list(rule["exclude"]), list(rule["include"])
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


class MaskedTensor:
    """A prunable weight held densely: the parameter and its bool mask."""

    sparse = False

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor):
        self.weight = weight
        self.mask = mask

    def count(self) -> torch.Tensor:
        return torch.count_nonzero(self.mask)

    def active_indices(self) -> torch.Tensor:
        return self.mask.reshape(-1).nonzero().squeeze(1)

    def active_values(self) -> torch.Tensor:
        return self.weight.detach().reshape(-1)[self.active_indices()]

    def is_active(self, flat: torch.Tensor) -> torch.Tensor:
        return self.mask.reshape(-1)[flat]

    def inactive_indices(self) -> torch.Tensor:
        return (~self.mask.reshape(-1)).nonzero().squeeze(1)

    def dense_grad(self) -> torch.Tensor | None:
        return self.weight.grad

    def nonzero_weights(self) -> int:
        return int((self.weight != 0).sum())

    @torch.no_grad()
    def replace_(self, drop: torch.Tensor, grow: torch.Tensor, optimizer, reset: Sequence[str]) -> None:
        mask = self.mask.clone()
        fill_at_(mask, drop, False)
        fill_at_(mask, grow, True)
        fill_at_(self.weight.data, grow, 0.0)
        fill_at_(self.weight.data, drop, 0.0)
        self.mask = mask
        if optimizer is not None and reset:
            for value in optimizer.state.get(self.weight, {}).values():
                if torch.is_tensor(value) and value.shape == self.weight.shape:
                    for where in ([grow] if "grown" in reset else []) + ([drop] if "dropped" in reset else []):
                        fill_at_(value, where, 0)

    @torch.no_grad()
    def broadcast_(self, optimizer, dist) -> tuple[bool, list[torch.Tensor]]:
        """Rank 0's mask and weight here; (whether the mask differed, the state tensors to send)."""
        mine = self.mask.clone()
        m = self.mask.to(torch.uint8)
        dist.broadcast(m, src=0)
        self.mask = m.bool()
        dist.broadcast(self.weight.data, src=0)
        tensors = [v for v in optimizer.state.get(self.weight, {}).values()
                   if torch.is_tensor(v) and v.shape == self.weight.shape]
        return not torch.equal(mine, self.mask), tensors

    def saved_mask(self) -> torch.Tensor:
        return self.mask.detach().cpu().clone()


class SparseTensor:
    """A prunable weight held by a sparse layer (values and structure; the structure is the mask),
    with the dense optimizer state of its inactive weights where a method keeps it (`shadow`)."""

    sparse = True

    def __init__(self, layer, shape: tuple[int, ...]):
        self.layer = layer
        self.shape = shape
        self.shadow: dict[str, torch.Tensor] = {}

    def count(self) -> int:
        return self.layer.nnz

    def active_indices(self) -> torch.Tensor:
        return self.layer.active_linear()

    def active_values(self) -> torch.Tensor:
        return self.layer.values.detach()

    def is_active(self, flat: torch.Tensor) -> torch.Tensor:
        act = self.layer.active_linear()
        if act.numel() == 0:
            return torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
        pos = torch.searchsorted(act, flat).clamp_max(act.numel() - 1)
        return act[pos] == flat

    def inactive_indices(self) -> torch.Tensor:
        keep = torch.ones(self.layer.rows * self.layer.cols, dtype=torch.bool, device=self.layer.values.device)
        keep[self.layer.active_linear()] = False
        return keep.nonzero().squeeze(1)

    def dense_grad(self) -> torch.Tensor | None:
        g = self.layer.dense_grad
        return None if g is None else g.view(self.shape)

    def nonzero_weights(self) -> int:
        return int((self.layer.values != 0).sum())

    @torch.no_grad()
    def replace_(self, drop: torch.Tensor, grow: torch.Tensor, optimizer, reset: Sequence[str]) -> None:
        """Drop entries with their state; grown entries start at 0 with zeroed state."""
        if "grown" not in reset:
            raise ValueError("a sparse layer starts its grown entries' optimizer state at 0; keep it in a dense view")
        layer = self.layer
        act = layer.active_linear()
        keep = torch.ones(act.numel(), dtype=torch.bool, device=act.device)
        if drop.numel():
            keep[torch.searchsorted(act, drop.to(act.device))] = False
        grow = grow.to(act.device, torch.int64)
        lin, order = torch.sort(torch.cat([act[keep], grow]))
        zeros = torch.zeros(grow.numel(), dtype=layer.values.dtype, device=act.device)
        vals = torch.cat([layer.values.detach()[keep], zeros])[order]
        state = optimizer.state.get(layer.values) if optimizer is not None else None
        if state:
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.shape == layer.values.shape:
                    state[k] = torch.cat([v[keep], torch.zeros(grow.numel(), dtype=v.dtype, device=v.device)])[order]
        layer.set_active(lin, vals)

    @torch.no_grad()
    def open_view(self, optimizer) -> MaskedTensor:
        """A dense copy: weight (with the dense gradient when the step formed one), mask, and the
        optimizer state as dense tensors under the copy (the inactive weights' from `shadow`)."""
        layer, shape = self.layer, self.shape
        p = nn.Parameter(layer.dense_weight().view(shape))
        if layer.dense_grad is not None:
            p.grad = layer.dense_grad.view(shape)
        lin = layer.active_linear()
        numel = p.numel()
        state = optimizer.state.get(layer.values) if optimizer is not None else None
        if state:
            dense = {}
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == layer.values.shape:
                    full = self.shadow.get(k)
                    full = torch.zeros(numel, dtype=v.dtype, device=v.device) if full is None else full.clone()
                    full[lin] = v
                    dense[k] = full.view(shape)
                else:
                    dense[k] = v
            optimizer.state[p] = dense
        m = torch.zeros(numel, dtype=torch.bool, device=lin.device)
        m[lin] = True
        return MaskedTensor(p, m.view(shape))

    @torch.no_grad()
    def close_view(self, view: MaskedTensor, optimizer, keeps_inactive_state: bool) -> None:
        """Rebuild the layer from its dense view (values, structure, optimizer state)."""
        p, m = view.weight, view.mask
        lin = m.reshape(-1).nonzero().squeeze(1)
        dense = optimizer.state.pop(p, None) if optimizer is not None else None
        self.layer.set_active(lin, p.data.reshape(-1)[lin])
        if dense:
            new = {}
            for k, v in dense.items():
                if torch.is_tensor(v) and tuple(v.shape) == self.shape:
                    flat = v.reshape(-1)
                    new[k] = flat[lin].clone()
                    if keeps_inactive_state:
                        self.shadow[k] = flat
                else:
                    new[k] = v
            optimizer.state[self.layer.values] = new

    @torch.no_grad()
    def broadcast_(self, optimizer, dist) -> tuple[bool, list[torch.Tensor]]:
        layer = self.layer
        mine = layer.active_linear()
        n = torch.tensor([mine.numel()], dtype=torch.int64, device=mine.device)
        dist.broadcast(n, src=0)
        lin = mine.clone() if int(n) == mine.numel() else torch.empty(int(n), dtype=torch.int64, device=mine.device)
        dist.broadcast(lin, src=0)
        vals = layer.values.detach().clone() if int(n) == mine.numel() else torch.empty(
            int(n), dtype=layer.values.dtype, device=lin.device)
        dist.broadcast(vals, src=0)
        same = lin.numel() == mine.numel() and torch.equal(lin, mine)
        state = optimizer.state.get(layer.values, {})
        if not same:
            layer.set_active(lin, vals)
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.dim() == 1 and v.numel() == mine.numel():
                    state[k] = torch.zeros(lin.numel(), dtype=v.dtype, device=v.device)
        else:
            layer.values.data.copy_(vals)
        tensors = [v for v in state.values() if torch.is_tensor(v) and v.shape == layer.values.shape]
        return not same, tensors + list(self.shadow.values())

    def saved_mask(self) -> None:
        return None  # the structure is saved with the model


class _MaskList:
    """The bool masks of a list of masked tensors, as a list: replacing one marks the mask set's
    derived float masks and counts stale."""

    def __init__(self, entries: list[MaskedTensor], owner: MaskSet):
        self._entries = entries
        self._owner = owner

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter([e.mask for e in self._entries])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [e.mask for e in self._entries[i]]
        return self._entries[i].mask

    def __setitem__(self, i, value):
        if isinstance(i, slice):
            for e, v in zip(self._entries[i], value, strict=True):
                e.mask = v
        else:
            self._entries[i].mask = value
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
        self.entries: list[MaskedTensor | SparseTensor] = [
            MaskedTensor(p, torch.ones_like(p, dtype=torch.bool)) for _, p in named_params]
        self._shapes = [tuple(p.shape) for _, p in named_params]
        self._numels = [p.numel() for _, p in named_params]
        # the module owning each parameter, and its attribute name (None when unknown)
        self.owners: list[tuple[nn.Module, str] | None] = [None] * len(self.names)
        if model is not None:
            where = {}
            for _, mod in model.named_modules():
                for attr, p in mod._parameters.items():
                    if p is not None:
                        where.setdefault(id(p), (mod, attr))
            self.owners = [where.get(id(p)) for _, p in named_params]
        self.optimizer: torch.optim.Optimizer | None = None
        self.structure = Structure()  # the shape the masks keep (set by the method: structure=)
        self.keeps_inactive_state = False  # dense optimizer state of inactive weights is kept
        self._view: list[MaskedTensor] | None = None
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
        """The mask set of `model`'s prunable parameters under `rule` (:func:`full_rule`)."""
        rule = full_rule(rule)
        ms = cls(prunable_parameters(model, rule), model)
        ms.floor = 0 if rule["allow_empty"] else 1
        return ms

    def __len__(self) -> int:
        return len(self.names)

    def _changed(self) -> None:
        self._stale = True
        self._counts = None

    @property
    def layers(self) -> list:
        """The sparse layer of each entry (None: masked)."""
        return [e.layer if e.sparse else None for e in self.entries]

    @property
    def shadow(self) -> list[dict]:
        """The dense optimizer state of each sparse entry's inactive weights (where kept)."""
        return [e.shadow if e.sparse else {} for e in self.entries]

    @property
    def _any_sparse(self) -> bool:
        return any(e.sparse for e in self.entries)

    def held_tensors(self) -> list[torch.Tensor]:
        """The tensors the mask set itself keeps alive (bool masks of masked entries, their float
        copies, inactive weights' optimizer state): what it adds to a run's memory."""
        return ([e.mask for e in self.entries if not e.sparse] + list(self._float)
                + [v for s in self.shadow for v in s.values()])

    # --- what the execution engine changes ------------------------------------------------------
    def run_sparse(self, active: bool, optimizer, keeps_inactive_state: bool | None = None) -> None:
        """The optimizer whose state follows the sparse layers (`active`: whether any entry is one
        now), and whether inactive weights keep theirs."""
        self.optimizer = optimizer
        if keeps_inactive_state is not None:
            self.keeps_inactive_state = keeps_inactive_state
        self._changed()

    def adopt_layer(self, i: int, layer) -> None:
        """Entry `i` is held by the sparse `layer` from now on: its dense weight and mask are let go."""
        self.entries[i] = SparseTensor(layer, self._shapes[i])
        self.owners[i] = (layer, "values")
        self._changed()

    # --- what the methods see -----------------------------------------------------------------
    @property
    def params(self) -> list:
        """The dense weights, one per entry: with sparse layers, those of the dense view open now
        (``dense_view()``); reading them with a sparse layer and no view open is an error, never a
        view opened behind the caller's back."""
        return [e.weight for e in self._dense_entries()]

    @property
    def masks(self) -> _MaskList:
        """The bool masks, one per entry (with sparse layers: the open dense view's, as ``params``)."""
        return _MaskList(self._dense_entries(), self)

    @masks.setter
    def masks(self, value) -> None:
        self.masks[:] = list(value)

    def _dense_entries(self) -> list[MaskedTensor]:
        if self._view is not None:
            return self._view
        if self._any_sparse:
            raise RuntimeError("the dense weights or masks of sparse layers were read with no dense view open; "
                               "read them inside `with masks.dense_view():`, or use the index-level calls")
        return self.entries

    def _entry(self, i: int) -> MaskedTensor | SparseTensor:
        """Entry i as the methods see it now: its dense view while one is open."""
        return self._view[i] if self._view is not None else self.entries[i]

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

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return list(self._shapes)

    @property
    def numels(self) -> list[int]:
        return list(self._numels)

    def is_sparse(self, i: int) -> bool:
        return self.entries[i].sparse

    def masked_entry(self, i: int) -> tuple[nn.Parameter, torch.Tensor]:
        """(dense weight, bool mask) of a masked layer, without opening views of sparse ones."""
        e = self.entries[i]
        if e.sparse:
            raise ValueError(f"{self.names[i]} is a sparse layer; use the index-level calls")
        return e.weight, e.mask

    @torch.no_grad()
    def draw_random(self, density: float, kind: str, generator: torch.Generator) -> None:
        """Random initial masks at `density` with the `kind` layer distribution (uniform / er /
        erk / bernoulli), applied. With no sparse layers yet this is exactly
        ``set_masks(random_masks(...))``; layers that are sparse already (built without a dense
        weight) get their exact count of positions by sparse sampling and values drawn with the
        layer type's default bound, without any tensor of the weight's dense size."""
        from .distributions import layer_counts, random_masks
        from .execution.layers import sample_positions

        if self.structure.active:  # every group its capacity, at random
            if self._any_sparse:
                raise ConfigError(f"structure={self.structure.kind} with layers built sparse from the start (too big "
                                  f"to hold densely) is not supported; use structure=unstructured")
            counts = layer_counts(self._shapes, density, kind, self.names)
            self.set_masks(self.structure.random_masks(self._shapes, counts, generator))
            return
        if not self._any_sparse:
            self.set_masks(random_masks(self.shapes, density, kind, generator, self.names))
            return
        counts = layer_counts(self._shapes, density, kind, self.names)
        for e, shape, n, k in zip(self.entries, self._shapes, self._numels, counts):
            if not e.sparse:
                flat = torch.zeros(n, dtype=torch.bool)
                flat[torch.randperm(n, generator=generator)[:k]] = True
                e.mask = flat.view(shape).to(e.weight.device)
                continue
            lin = sample_positions(n, k, generator)
            bound = getattr(e.layer, "init_bound", None) or 1.0 / max(e.layer.cols, 1) ** 0.5
            values = (torch.rand(k, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            e.layer.set_active(lin, values)
        self._changed()
        self.apply_()

    def structure_violations(self, empty_ok: bool = False) -> dict[str, int]:
        """Layers whose mask breaks `structure`, with the number of groups that break it
        (`empty_ok`: output units with no active input, SRigL's ablated ones, are allowed)."""
        if not self.structure.active:
            return {}
        with self.dense_view():
            bad = {n: self.structure.violations(m, empty_ok) for n, m in zip(self.names, self.masks)}
        return {n: v for n, v in bad.items() if v}

    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        """Replace all masks (moved to each parameter's device) and apply them."""
        if len(masks) != len(self.names):
            raise ValueError("one mask per prunable parameter expected")
        for i, (m, e) in enumerate(zip(masks, self._dense_entries())):
            if tuple(m.shape) != self._shapes[i]:
                raise ValueError(f"mask for {self.names[i]} has shape {tuple(m.shape)}, expected {self._shapes[i]}")
            e.mask = m.to(device=e.weight.device, dtype=torch.bool)
        self._changed()
        self.apply_()

    def _refresh(self) -> None:
        """Float copies of the masked entries' masks (the open view's too), made once per mask change."""
        dense = [e for e in (self._view if self._view is not None else self.entries) if not e.sparse]
        old = {id(p): f for p, f in zip(self._float_params, self._float)}
        floats = []
        for e in dense:
            f = old.get(id(e.weight))
            if f is not None and f.shape == e.mask.shape and f.dtype == e.weight.dtype:
                f.copy_(e.mask)  # in place: no new tensor per mask change
            else:
                f = e.mask.to(e.weight.dtype)
            floats.append(f)
        self._float_params = [e.weight for e in dense]
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
    def apply_to_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Zero, in `tensors` (one per entry, each shaped like its weight: a copy such as a weight
        average), the positions inactive in the masked entries; one grouped multiply."""
        if self._stale:
            self._refresh()
        if self._float and self._view is None:  # the float masks are the masked entries', in order
            torch._foreach_mul_([t for t, e in zip(tensors, self.entries) if not e.sparse], self._float)

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
        return [e.dense_grad() for e in self.entries]

    # --- counts -------------------------------------------------------------------------------
    @torch.no_grad()
    def nnz(self) -> list[int]:
        """Active weights per layer (at most one host sync; cached until the masks change)."""
        if self._view is not None:
            return [int(c) for c in torch.stack([e.count() for e in self._view]).cpu().tolist()]
        if self._counts is None:
            counts = [e.count() for e in self.entries]
            dense = [i for i, c in enumerate(counts) if torch.is_tensor(c)]
            if dense:
                for i, c in zip(dense, torch.stack([counts[i] for i in dense]).cpu().tolist()):
                    counts[i] = int(c)
            self._counts = [int(c) for c in counts]
        return list(self._counts)

    def density(self) -> float:
        return sum(self.nnz()) / sum(self._numels)

    def layer_densities(self) -> dict[str, float]:
        return {n: k / m for n, k, m in zip(self.names, self.nnz(), self._numels)}

    @torch.no_grad()
    def weight_density(self) -> float:
        """Fraction of prunable weights that are non-zero in the tensors themselves."""
        return sum(e.nonzero_weights() for e in self.entries) / sum(self._numels)

    # --- index-level access (no dense tensor for sparse layers) --------------------------------
    def active_indices(self, i: int) -> torch.Tensor:
        """Sorted flat positions of layer i's active weights."""
        return self._entry(i).active_indices()

    def active_values(self, i: int) -> torch.Tensor:
        """Layer i's active weights, in the order of ``active_indices(i)`` (detached)."""
        return self._entry(i).active_values()

    def is_active(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        """Bool per flat position: is it active in layer i?"""
        return self._entry(i).is_active(flat)

    def inactive_indices(self, i: int) -> torch.Tensor:
        """Sorted flat positions of layer i's inactive weights (O(numel): dense-ish layers only)."""
        return self._entry(i).inactive_indices()

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
        t0 = time.perf_counter()
        for i, (d, g) in enumerate(zip(drop, grow)):
            self._entry(i).replace_(d, g, optimizer, reset)
        if self._view is None and self._any_sparse:
            self.last_rebuild_s += time.perf_counter() - t0
        self._changed()  # the weights at `drop` and `grow` are zero already

    # --- dense views of sparse layers (update steps) --------------------------------------------
    def _open_view(self) -> list[MaskedTensor]:
        native = [n for n, e in zip(self.names, self.entries) if e.sparse and getattr(e.layer, "init_bound", None)]
        if native:
            raise RuntimeError(f"a dense view of {native[0]} was asked for, but the layer is too big to hold "
                               f"densely; the method must use MaskSet's index-level calls")
        self._view = [e.open_view(self.optimizer) if e.sparse else e for e in self.entries]
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
        for e, view in zip(self.entries, self._view):
            if e.sparse:
                e.close_view(view, self.optimizer, self.keeps_inactive_state)
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
        for e in self.entries:
            changed, tensors = e.broadcast_(optimizer, dist)
            differed += int(changed)
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
        out = {"names": list(self.names), "masks": [e.saved_mask() for e in self.entries]}
        if any(self.shadow):
            out["shadow"] = [{k: v.detach().cpu().clone() for k, v in s.items()} for s in self.shadow]
        return out

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError("checkpoint masks are for different parameters")
        self.close_view()
        for e, m in zip(self.entries, state["masks"]):
            if m is not None and not e.sparse:
                e.mask = m.to(device=e.weight.device, dtype=torch.bool)
        for e, s in zip(self.entries, state.get("shadow") or []):
            if e.sparse:
                dev = e.layer.values.device
                e.shadow = {k: v.to(dev) for k, v in s.items()}
        self._changed()
