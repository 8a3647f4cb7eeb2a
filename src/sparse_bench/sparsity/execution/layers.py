"""Sparse layers: a Linear or Conv2d whose weight exists only as its active values.

A sparse layer stores, for its weight read as a matrix W (out x fan_in; a conv's fan_in is
C_in * kh * kw in ``flatten(1)`` order):

* ``values`` (nn.Parameter, nnz): the active weights, in row-major order of their positions;
* ``indptr`` (out + 1, int64) and ``indices`` (nnz, int32): W's CSR structure (saved);
* ``t_indptr``, ``t_indices``, ``t_perm``: the CSR structure of W^T, with ``t_perm`` mapping
  its nonzeros to ``values`` (rebuilt from the former, not saved).

No tensor of the weight's dense shape exists. The forward pass, the input gradient and the
gradient of the active weights run the kernels of ``kernels.py`` on feature-major activations
(a layer's output is returned as a transposed view, so a chain of sparse layers passes its
activations on without copies). A Linear on a 2-d input runs the compiled Linear kernels
(``kernels.linear_forward``): they read the input in either memory order (no transposed copy of
a row-major batch), use no transposed structure and form both gradients in one pass; where its
rows all have the same number of active inputs (or none: ``structure=fan_in``, SRigL) they read
the structure condensed, without row pointers. A Conv2d with dilation 1 runs the direct
convolution kernels on (C, H, W, N) activations, any stride: no patches and no padded copy (the kernels skip the
reads that fall in the padding); a 1x1 one with stride 1 is a plain sparse matmul. A dilated
one unfolds its input into patches and multiplies each sample's (its input gradient folds back
through autograd); with torch's CSR ops (no compiler) every conv unfolds.

``dense_grad`` holds the gradient of the loss with respect to the whole dense weight when the
engine asks for it (``want_dense_grad``): one dense GEMM in that step's backward, for the
methods that define their growth on it (RigL on update steps, sparse momentum every step).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from . import kernels


def structure_from_linear(lin: torch.Tensor, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """CSR of W and of W^T from the sorted linear indices (row * cols + col) of the nonzeros."""
    lin = lin.to(torch.int64)
    device = lin.device
    r = torch.div(lin, cols, rounding_mode="floor")
    c = lin - r * cols
    indptr = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.bincount(r, minlength=rows).cumsum(0)
    perm = torch.argsort(c * rows + r)
    t_indptr = torch.zeros(cols + 1, dtype=torch.int64, device=device)
    t_indptr[1:] = torch.bincount(c, minlength=cols).cumsum(0)
    return {
        "indptr": indptr,
        "indices": c.to(torch.int32),
        "t_indptr": t_indptr,
        "t_indices": r[perm].to(torch.int32),
        "t_perm": perm,
    }


def linear_from_structure(indptr: torch.Tensor, indices: torch.Tensor, cols: int) -> torch.Tensor:
    """The sorted linear positions (row * cols + col) of a CSR structure's nonzeros, in its order:
    the inverse of structure_from_linear."""
    rows = torch.arange(indptr.numel() - 1, device=indptr.device)
    return torch.repeat_interleave(rows, indptr[1:] - indptr[:-1]) * cols + indices.to(indptr.device).long()


class DenseGradControl:
    """Whether sparse layers form their dense weight gradient in the backward, and the results
    (shared by all of an engine's layers, so one assignment per step switches them all)."""

    def __init__(self):
        self.dense = False
        self.grads: dict = {}

    def add(self, layer, g: torch.Tensor) -> None:
        """Accumulate a dense weight gradient of `layer` (a layer may run more than once a step)."""
        prev = self.grads.get(layer)
        self.grads[layer] = g if prev is None else prev + g


def _float32_eager(forward):
    """A sparse layer's forward: float32 kernels whatever autocast says (the input is cast at the
    layer's boundary, precision=bf16|fp16), and run eagerly under torch.compile (its structure
    changes size with every mask update, so it is never traced into a graph)."""

    @functools.wraps(forward)
    def run(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return forward(self, x.to(self.values.dtype))
        return forward(self, x)

    return torch.compiler.disable(run)


class Layout:
    """How a sparse layer's input meets its kernels: the matrix they multiply (`operand`, made
    from the input kept for the backward), the product kernels, the bias' reduction dimensions,
    the dense weight gradient, and the way back from the operand's gradient to the input's."""

    def __init__(self, spmm, sddmm, bias_dims, dense_grad, operand=None, back=None):
        self.spmm, self.sddmm, self.bias_dims, self.dense_grad = spmm, sddmm, bias_dims, dense_grad
        self.operand = operand or (lambda layer, x: x)
        self.back = back or (lambda layer, d, size: d)


#: (nb, cols, B) feature-major activations: a conv's per-sample patches, a Linear's transposed input on torch's CSR ops
FEATURE_MAJOR = Layout(kernels.spmm, kernels.sddmm, (0, 2),
                       lambda dyt, xt: torch.einsum("nib,njb->ij", dyt, xt) if xt.shape[0] > 1 else dyt[0] @ xt[0].t())
#: (M, cols) row-major: a Linear on (batch, tokens, features), tiles transposed in cache (kernels.spmm_rows)
ROW_MAJOR = Layout(kernels.spmm_rows, kernels.sddmm_rows, (0,), lambda dy, x: dy.t() @ x)
#: a conv the direct kernels do not take (dilated, or torch's CSR ops): patches unfolded from the input
#: in the forward and again in the backward (holding them, kernel-area times the input, from one to
#: the other made its peak memory exceed masked's)
UNFOLDED = Layout(kernels.spmm, kernels.sddmm, (0, 2), FEATURE_MAJOR.dense_grad,
                  operand=lambda layer, x: layer._unfold(x),
                  back=lambda layer, d, size: F.fold(d, size, layer.kernel_size, dilation=layer.dilation,
                                                     padding=layer.padding, stride=layer.stride))


class _SparseProduct(torch.autograd.Function):
    """y = W x + bias in one of the layouts (the weight's CSR structure on the layer); backward:
    the active weights' gradient (sddmm), the input gradient (spmm on W^T's structure), the bias
    gradient, and the dense weight gradient when the engine asks for it."""

    @staticmethod
    def forward(ctx, values, x, bias, layer, how):
        y = how.spmm(layer.indptr, layer.indices, values.detach(), how.operand(layer, x).contiguous(),
                     None if bias is None else bias.detach(), layer._indices64())
        ctx.layer, ctx.how, ctx.size = layer, how, tuple(x.shape[-2:])
        ctx.save_for_backward(values, x)
        return y

    @staticmethod
    def backward(ctx, dy):
        values, x = ctx.saved_tensors
        layer, how = ctx.layer, ctx.how
        dy = dy.contiguous()
        ctl = layer.control
        operand = how.operand(layer, x).contiguous() if ctx.needs_input_grad[0] or ctl.dense else None
        dv = dx = db = None
        if ctx.needs_input_grad[0]:
            dv = how.sddmm(layer.indptr, layer.indices, dy, operand, layer._indices64())
        if ctx.needs_input_grad[1]:
            d = how.spmm(layer.t_indptr, layer.t_indices, values.detach()[layer.t_perm], dy, None,
                         layer._t_indices64())
            dx = how.back(layer, d, ctx.size)
        if ctx.needs_input_grad[2]:
            db = dy.sum(how.bias_dims)
        if ctl.dense:
            ctl.add(layer, how.dense_grad(dy, operand))
        return dv, dx, db, None, None


class _LinearProduct(torch.autograd.Function):
    """y = x W^T + bias for a Linear's 2-d input on the compiled kernels (kernels.linear_forward):
    W's rows as they are stored (CSR), or, for a constant fan-in (every row k active inputs, or
    none), condensed: the column ids and values read as (rows that have them, k) arrays. No
    transposed structure either way. x (B, cols) in either memory order; y returned as the
    transposed view of a feature-major (rows, B) output, as the other kernels return it. The
    backward forms the values' and the input's gradients in one pass (kernels.linear_backward)."""

    @staticmethod
    def _operands(layer, values):
        """(column ids, values, live rows, row pointers) as the kernels take them."""
        condensed = layer.condensed()
        if condensed is None:
            return layer.indices, values.detach(), None, layer.indptr
        k, live = condensed
        return layer.indices.view(-1, k), values.detach().view(-1, k), live, None

    @staticmethod
    def forward(ctx, values, x, bias, layer):
        idx, vals, live, indptr = _LinearProduct._operands(layer, values)
        ctx.layer = layer
        ctx.save_for_backward(values, x)
        return kernels.linear_forward(idx, vals, x, bias, layer.rows, live, indptr).t()

    @staticmethod
    def backward(ctx, dy):
        values, x = ctx.saved_tensors
        layer = ctx.layer
        idx, vals, live, indptr = _LinearProduct._operands(layer, values)
        dv, dxt = kernels.linear_backward(idx, vals, x, dy, live, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                         indptr)
        db = dy.sum(0) if ctx.needs_input_grad[2] else None
        if layer.control.dense:
            layer.control.add(layer, dy.t() @ x)
        return (None if dv is None else dv.view(-1)), (None if dxt is None else dxt.t()), db, None


def _as_chwn(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) input as the direct kernels read it, (C, H, W, N): a view where it already is
    in that memory order (the output of a sparse layer, batch norm, ReLU or pooling before), else
    one copy."""
    return x.permute(1, 2, 3, 0).contiguous()


class _SparseConvDirect(torch.autograd.Function):
    """Sparse convolution (dilation 1, any stride) without unfolding or padding copies:
    activations as (C, H, W, N), N innermost; the kernels skip the reads that fall in the padding."""

    @staticmethod
    def forward(ctx, values, x, bias, layer):
        n, c, h, w = x.shape
        h_out, w_out = layer._out_size(h, w)
        geo, t_geo, t_indptr = layer._direct_geometry(h, w, n)
        y = kernels.conv_fwd(layer.indptr, geo, values, _as_chwn(x), bias, h_out, w_out, layer.stride)
        ctx.layer, ctx.shape, ctx.geometry = layer, (c, h, w, n), (geo, t_geo, t_indptr)
        # the input as it came (most often the saved output of the ReLU before: no memory of its own)
        ctx.save_for_backward(values, x)
        return y.permute(3, 0, 1, 2)  # (N, C_out, H_out, W_out), a view

    @staticmethod
    def backward(ctx, dy):
        values, x = ctx.saved_tensors
        layer = ctx.layer
        geo, t_geo, t_indptr = ctx.geometry
        dyt = dy.permute(1, 2, 3, 0).contiguous()  # (C_out, H_out, W_out, N)
        dv = dx = db = None
        if ctx.needs_input_grad[0]:
            dv = kernels.conv_wgrad(layer.indptr, geo, dyt, _as_chwn(x), layer.stride)
        if ctx.needs_input_grad[1]:
            # channel-major and dense for the batch norm, activation and residual backward before
            # it (see ChannelMajorBatchNorm2d)
            dx = kernels.conv_dgrad(t_indptr, t_geo, layer.t_indices, values.detach()[layer.t_perm], dyt,
                                    ctx.shape, layer.stride).permute(3, 0, 1, 2)
        if ctx.needs_input_grad[2]:
            db = dyt.sum((1, 2, 3))
        ctl = layer.control
        if ctl.dense:
            g = torch.nn.grad.conv2d_weight(x, layer.weight_shape, dyt.permute(3, 0, 1, 2), layer.stride,
                                            layer.padding)
            ctl.add(layer, g.reshape(layer.rows, layer.cols))
        return dv, dx, db, None


class SparseLayer(nn.Module):
    """What sparse Linear and Conv2d share: the structure, its rebuilds and dense views."""

    rows: int
    cols: int
    weight_shape: tuple[int, ...]

    def _init_sparse(self, rows: int, cols: int, weight_shape, bias: nn.Parameter | None,
                     dtype: torch.dtype, device) -> None:
        self.rows, self.cols = int(rows), int(cols)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype, device=device))
        self.bias = bias
        empty = structure_from_linear(torch.zeros(0, dtype=torch.int64, device=device), self.rows, self.cols)
        self.register_buffer("indptr", empty["indptr"])
        self.register_buffer("indices", empty["indices"])
        for k in ("t_indptr", "t_indices", "t_perm"):
            self.register_buffer(k, empty[k], persistent=False)
        self._idx64: tuple | None = None
        self._offsets: dict = {}  # SparseConv2d's direct-kernel offsets per input geometry
        self._k: tuple | None = None  # the constant fan-in and its rows (condensed(); per structure)
        self.control = DenseGradControl()  # shared by the engine's layers: one dense-gradient switch

    @property
    def want_dense_grad(self) -> bool:
        return self.control.dense

    @want_dense_grad.setter
    def want_dense_grad(self, value: bool) -> None:
        self.control.dense = bool(value)

    @property
    def dense_grad(self) -> torch.Tensor | None:
        """The dense weight gradient (rows x cols) this step's backward formed, if asked to."""
        return self.control.grads.get(self)

    # --- structure ----------------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.indices.numel()

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def _indices64(self) -> torch.Tensor | None:
        """int64 column indices for torch's CSR ops (built once per structure, only when used)."""
        if kernels.backend() == "c" and self.values.device.type == "cpu" and self.values.dtype == torch.float32:
            return None
        if self._idx64 is None:
            self._idx64 = (self.indices.long(), self.t_indices.long())
        return self._idx64[0]

    def _t_indices64(self) -> torch.Tensor | None:
        return None if self._indices64() is None else self._idx64[1]

    def _set_structure(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            setattr(self, k, v)
        self._idx64 = None
        self._offsets = {}
        self._k = None

    def condensed(self) -> tuple[int, torch.Tensor | None] | None:
        """(k, live) when every row of the weight has the same number k >= 1 of active inputs or
        none (structure=fan_in; SRigL's ablated units have none): live lists the rows that have
        them (int32), None when all do. A Linear's kernels then read its structure condensed.
        Else None. Found once per structure."""
        if self._k is None:
            counts = self.indptr[1:] - self.indptr[:-1]
            k = int(counts.max()) if counts.numel() else 0
            self._k = (0, None)
            if k > 0 and bool(((counts == k) | (counts == 0)).all()):
                full = counts == k
                self._k = (k, None if bool(full.all()) else full.nonzero().squeeze(1).to(torch.int32))
        return self._k if self._k[0] else None

    @torch.no_grad()
    def set_active(self, lin: torch.Tensor, values: torch.Tensor) -> None:
        """Install the sorted linear positions `lin` and their `values` (the Parameter object
        stays the same, so the optimizer keeps pointing at it)."""
        lin = lin.to(device=self.values.device, dtype=torch.int64)
        self._set_structure(structure_from_linear(lin, self.rows, self.cols))
        new = values.detach().to(device=self.values.device, dtype=self.values.dtype).reshape(-1).clone()
        if new.shape == self.values.shape:
            self.values.data = new
        else:
            # a new size: swap in a fresh tensor under the same Python object, so the optimizer's
            # reference stays valid and autograd does not reuse the old size's grad accumulator
            self.values.grad = None
            torch.utils.swap_tensors(self.values, nn.Parameter(new, requires_grad=self.values.requires_grad))

    def row_ids(self) -> torch.Tensor:
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.rows, device=self.indptr.device), counts)

    def active_linear(self) -> torch.Tensor:
        """Sorted linear positions (row * cols + col) of the active weights, in values' order."""
        return linear_from_structure(self.indptr, self.indices, self.cols)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor of its module's shape (a copy; used on update steps)."""
        w = torch.zeros(self.numel, dtype=self.values.dtype, device=self.values.device)
        w[self.active_linear()] = self.values.detach()
        return w.view(self.weight_shape)

    @torch.no_grad()
    def dense_mask(self) -> torch.Tensor:
        m = torch.zeros(self.numel, dtype=torch.bool, device=self.values.device)
        m[self.active_linear()] = True
        return m.view(self.weight_shape)

    # --- state dict: the structure's size changes with nnz ------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        ind, ptr, val = (state_dict.get(prefix + k) for k in ("indices", "indptr", "values"))
        if ind is not None and ptr is not None and val is not None:
            self.set_active(linear_from_structure(ptr.to(self.values.device), ind, self.cols), val)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _matmul(self, xt: torch.Tensor, how: Layout = FEATURE_MAJOR) -> torch.Tensor:
        return _SparseProduct.apply(self.values, xt, self.bias, self, how)


class SparseLinear(SparseLayer):
    """nn.Linear with a sparse weight."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None = None,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_sparse(out_features, in_features, (out_features, in_features), bias, dtype, device)

    @classmethod
    def from_dense(cls, mod: nn.Linear, mask: torch.Tensor | None) -> SparseLinear:
        w = mod.weight
        layer = cls(mod.in_features, mod.out_features, mod.bias, w.dtype, _real_device(mod))
        if mask is not None:
            lin = mask.reshape(-1).nonzero().squeeze(1)
            layer.set_active(lin, w.detach().reshape(-1)[lin])
        return layer

    @_float32_eager
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if len(lead) > 1 and x2.is_contiguous():
            # (batch, tokens, features) inputs, row-major: kernels that keep them so (the output
            # and the gradients too), instead of transposing whole activations at each layer
            return self._matmul(x2, ROW_MAJOR).view(*lead, self.out_features)
        # 2-d inputs, in either memory order: the output feature-major, a transposed view a following
        # sparse layer takes as it is (torch's CSR ops: the input transposed first)
        if kernels.compiled_for(self.values, x2):
            y = _LinearProduct.apply(self.values, x2, self.bias, self)
        else:
            y = self._matmul(x2.t().unsqueeze(0))[0].t()
        return y if len(lead) == 1 else y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.nnz}")


class SparseConv2d(SparseLayer):
    """nn.Conv2d (groups=1, zero padding) with a sparse weight: direct kernels for dilation 1 (any
    stride), a sparse matmul over unfolded patches otherwise."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias: nn.Parameter | None = None, dtype=torch.float32, device=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.groups, self.padding_mode = 1, "zeros"
        fan_in = self.in_channels * math.prod(self.kernel_size)
        self._init_sparse(out_channels, fan_in, (out_channels, in_channels, *self.kernel_size), bias, dtype, device)

    @staticmethod
    def supports(mod: nn.Conv2d) -> str | None:
        """None if `mod` can run sparse, else the reason it cannot."""
        if mod.groups != 1:
            return f"groups={mod.groups}"
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return f"padding={mod.padding!r}, padding_mode={mod.padding_mode}"
        return None

    @classmethod
    def from_dense(cls, mod: nn.Conv2d, mask: torch.Tensor | None) -> SparseConv2d:
        w = mod.weight
        layer = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                    mod.dilation, mod.bias, w.dtype, _real_device(mod))
        if mask is not None:
            lin = mask.reshape(-1).nonzero().squeeze(1)
            layer.set_active(lin, w.detach().reshape(-1)[lin])
        return layer

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (p0, p1), (sh, sw), (dh, dw) = self.kernel_size, self.padding, self.stride, self.dilation
        return (h + 2 * p0 - dh * (kh - 1) - 1) // sh + 1, (w + 2 * p1 - dw * (kw - 1) - 1) // sw + 1

    def _direct_geometry(self, h: int, w: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The direct kernels' index data for an (C, H, W, N) input (spkernels.c): geo (4, nnz),
        each active weight's offset, row shift and valid part of the output (a run of floats at
        stride 1, else a range of output columns); the same in the transposed order with offsets
        within one input channel; the transposed row pointers per input channel. Built once per
        structure and input geometry (a mask update clears them), not every step."""
        key = (h, w, n)
        if key not in self._offsets:
            (kh, kw), (p0, p1), sw = self.kernel_size, self.padding, self.stride[1]
            w_out = self._out_size(h, w)[1]
            cols = self.indices.long()
            c = torch.div(cols, kh * kw, rounding_mode="floor")
            r = cols - c * (kh * kw)
            i = torch.div(r, kw, rounding_mode="floor")
            dh, s = i - p0, r - i * kw - p1
            # the output columns whose input column sw * w + s is inside [0, W)
            lo = torch.div(-s + sw - 1, sw, rounding_mode="floor").clamp(min=0)
            hi = (torch.div(w - 1 - s, sw, rounding_mode="floor") + 1).clamp(max=w_out)
            if sw == 1:  # as runs of floats along the output row
                lo, hi = lo * n, hi * n
            geo = torch.stack([((c * h + dh) * w + s) * n, dh, lo, hi])
            t_geo = geo[:, self.t_perm]
            t_geo[0] -= c[self.t_perm] * (h * w * n)
            self._offsets[key] = (geo.contiguous(), t_geo.contiguous(), self.t_indptr[::kh * kw].contiguous())
        return self._offsets[key]

    @_float32_eager
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        h_out, w_out = self._out_size(h, w)
        # a 1x1 convolution with stride 1 and no padding is a matmul on the input as it is; other
        # convolutions with dilation 1 run the direct kernels (no patches at all) where they are
        # compiled; the rest multiply (N, fan_in, L) patches, one matrix per sample, in place
        one_by_one = self.kernel_size == (1, 1) and self.padding == (0, 0) and self.stride == (1, 1)
        if self.dilation == (1, 1) and not one_by_one and kernels.compiled_for(self.values, x):
            return _SparseConvDirect.apply(self.values, x, self.bias, self)
        if one_by_one and channel_major(x):
            # (C, H, W, N) memory is the feature-major (C, H*W*N) matrix the kernels take: no copy,
            # and the output stays channel-major for what follows
            y = self._matmul(x.permute(1, 2, 3, 0).reshape(1, self.cols, h * w * n))
            return y.view(self.out_channels, h, w, n).permute(3, 0, 1, 2)
        if one_by_one:  # the input itself is the patch matrix: no copy to keep
            return self._matmul(x.reshape(n, self.cols, h * w)).view(n, self.out_channels, h_out, w_out)
        return self._matmul(x, UNFOLDED).view(n, self.out_channels, h_out, w_out)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, fan_in, L) patches of x, contiguous."""
        return F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, nnz={self.nnz}")


def channel_major(x: torch.Tensor) -> bool:
    """Whether a 4-d (N, C, H, W) tensor's memory is (C, H, W, N): the direct convolution kernels'
    layout, which sparse convolutions return as a permuted view."""
    return x.dim() == 4 and not x.is_contiguous() and x.permute(1, 2, 3, 0).is_contiguous()


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm of x (C, L), each channel one contiguous row: statistics and
    normalisation by the compiled kernels (float64 sums), the backward torch's own batch-norm
    backward with the saved mean and inverse standard deviation. Returns y and the batch's mean
    and biased variance (float64, for the running statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = x.shape[1]
        total, squares = kernels.batch_norm_stats(x)
        mean = total / n
        var = (squares / n - mean * mean).clamp_(min=0.0)
        invstd = (var + eps).rsqrt()
        scale = invstd if weight is None else weight.detach().double() * invstd
        shift = -mean * scale if bias is None else bias.detach().double() - mean * scale
        y = kernels.batch_norm_apply(x, scale.float(), shift.float())
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean.float(), invstd.float())
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, weight, mean, invstd = ctx.saved_tensors
        c, n = x.shape
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                weight is not None and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous().view(1, c, n, 1), x.view(1, c, n, 1), weight, None, None, mean, invstd, True, ctx.eps,
            mask)
        return (dx.view(c, n) if dx is not None else None), dw, db, None


class ChannelMajorBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and state dict) that keeps a channel-major input
    channel-major: each channel is one contiguous block of H*W*N values there, so in training the
    statistics and the normalisation run on that (C, H*W*N) view with the compiled kernels
    (``_BatchNormTrain``; torch's batch norm on a (1, C, H*W*N, 1) view where they are not
    compiled, and in evaluation), and the output (and, in the backward, the input gradient) stays
    in the sparse convolutions' layout instead of being copied back and forth at every layer.
    Statistics over the same N*H*W values per channel, so the same batch norm (to float
    rounding). Any other input runs as nn.BatchNorm2d does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not channel_major(x):
            return super().forward(x)
        n, c, h, w = x.shape
        x2 = x.permute(1, 2, 3, 0).reshape(c, h * w * n)  # a view: each channel one contiguous row
        if self.training and x2.shape[1] > 1 and kernels.compiled_for(x2):
            y = self._train_compiled(x2)
        else:
            y = super().forward(x2.view(1, c, -1, 1))
        return y.reshape(c, h, w, n).permute(3, 0, 1, 2)

    @torch.compiler.disable
    def _train_compiled(self, x2: torch.Tensor) -> torch.Tensor:
        """Training mode with the batch statistics of the compiled kernels (torch's CPU kernel
        collects them one value at a time: about 9x slower on ResNet-56's maps), running statistics
        updated as nn.BatchNorm2d updates them (momentum, or the cumulative average for None); run
        eagerly under torch.compile, as the sparse layers are (the kernels are ctypes calls)."""
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y, mean, var = _BatchNormTrain.apply(x2, self.weight, self.bias, self.eps)
        if self.running_mean is not None:
            n = x2.shape[1]
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_((var * (n / (n - 1))).to(self.running_var.dtype),
                                                       alpha=factor)
        return y


class _ChannelMajorPool:
    """A pooling module that keeps a channel-major input channel-major: the (C, H, W, N) memory read
    as a (C, N, H, W) batch is torch's channels_last layout (N playing the channels), which its
    pooling kernels take as it is and return in kind; pooling is per image and channel, so the
    result is the same pooling. Any other input runs as the torch module does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not channel_major(x):
            return super().forward(x)
        return super().forward(x.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)


class ChannelMajorMaxPool2d(_ChannelMajorPool, nn.MaxPool2d):
    """nn.MaxPool2d keeping the sparse convolutions' layout (see _ChannelMajorPool)."""


class ChannelMajorAvgPool2d(_ChannelMajorPool, nn.AvgPool2d):
    """nn.AvgPool2d keeping the sparse convolutions' layout (see _ChannelMajorPool)."""


class ChannelMajorAdaptiveAvgPool2d(_ChannelMajorPool, nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d keeping the sparse convolutions' layout (see _ChannelMajorPool)."""


class ChannelMajorReLU(nn.ReLU):
    """nn.ReLU that does not work in place on a channel-major input: that input is a view (of the
    batch norm's contiguous result), and an in-place op on a view makes autograd copy the whole
    gradient through its base in the backward (measured: VGG-16-small's sparse step 1.6x slower).
    The output is a new tensor instead; the batch norm's result it replaces is freed right away,
    so the memory held for the backward is the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x, inplace=self.inplace and not channel_major(x))


#: torch module -> the subclass that keeps channel-major activations (same parameters and state)
CHANNEL_MAJOR = {nn.BatchNorm2d: ChannelMajorBatchNorm2d, nn.MaxPool2d: ChannelMajorMaxPool2d,
                 nn.AvgPool2d: ChannelMajorAvgPool2d, nn.AdaptiveAvgPool2d: ChannelMajorAdaptiveAvgPool2d,
                 nn.ReLU: ChannelMajorReLU}


def keep_channel_major(model: nn.Module) -> int:
    """Make the batch norms, poolings and ReLUs of `model` their channel-major subclasses (CHANNEL_MAJOR;
    in place: the class only, so parameters, buffers and the state dict are untouched), so the
    activations between sparse convolutions keep the kernels' layout; returns how many."""
    count = 0
    for mod in model.modules():
        twin = CHANNEL_MAJOR.get(type(mod))
        if twin is not None:
            mod.__class__ = twin
            count += 1
    return count


def _real_device(mod: nn.Module) -> torch.device:
    """The weight's device, or the bias' (or the CPU) when the weight exists as a shape only."""
    if mod.weight.device.type != "meta":
        return mod.weight.device
    if getattr(mod, "bias", None) is not None and mod.bias.device.type != "meta":
        return mod.bias.device
    return torch.device("cpu")


def sample_positions(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct positions in [0, numel), uniformly at random, sorted, drawn without an
    O(numel) tensor (random draws, duplicates dropped, topped up)."""
    if count > numel // 2:
        return torch.randperm(numel, generator=generator)[:count].sort().values
    idx = torch.zeros(0, dtype=torch.int64)
    while idx.numel() < count:
        extra = torch.randint(numel, (int(1.1 * (count - idx.numel())) + 16,), generator=generator)
        idx = torch.unique(torch.cat([idx, extra]))
    keep = torch.randperm(idx.numel(), generator=generator)[:count]
    return idx[keep].sort().values


def sparse_twin(mod: nn.Module) -> type[SparseLayer] | str:
    """The sparse class for a dense module, or the one-line reason there is none."""
    if type(mod) is nn.Linear:
        return SparseLinear
    if type(mod) is nn.Conv2d:
        why = SparseConv2d.supports(mod)
        return SparseConv2d if why is None else f"a Conv2d with {why}"
    return f"a {type(mod).__name__}"
