"""2:4 linear layers on CUDA through torch's semi-structured sparse tensors (cuSPARSELt or CUTLASS).

A layer whose mask keeps at most 2 of every 4 consecutive weights along the input dimension
(``structure=nm`` with m=4 and n <= 2) multiplies in the forward pass with its weight compressed
to the 2:4 format (``torch.sparse.to_sparse_semi_structured``): half the multiply-adds, on the
sparse tensor cores of Ampere and Hopper GPUs. The weight changes every step, so it is
compressed again in every forward (one small kernel, as torchao's 2:4 training does).

The backward pass: the weight gradient is the dense product (masked, when a mask is given; the
methods read it dense: RigL and sparse momentum grow from it), and the input gradient is
``grad_out @ W``, whose sparse operand would be W's transpose, which is not 2:4 along its rows;
both run as dense GEMMs. So the forward is the only sparse product, and a 2:4 layer's training
step does 1/2 + 1 + 1 of the dense step's work (5/6).

Semi-structured tensors need float16 or bfloat16 here (under ``precision=bf16|fp16``, the
autocast dtype) and a GPU of compute capability 8.0 or newer; ``available()`` says whether this
process has both. ``execution=sparse`` on such a GPU runs the Linear layers of a 2:4 (or 1:4)
structure as ``TwoFourLinear``: masked layers (dense weight, the mask kept by the method as for
``execution=masked``) whose forward product is this one while their mask is 2:4;
``execution=auto`` does not consider it
(on the H200 measured, the product was slower than the dense bf16 one: BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..structure import Structure

DTYPES = (torch.float16, torch.bfloat16)
#: what the semi-structured tensors hold: at most 2 of every 4 consecutive weights along a row
TWO_FOUR = Structure("nm", 2, 4)


def available(device: torch.device | None = None) -> bool:
    """Whether this process can run 2:4 semi-structured products on `device` (CUDA, sm >= 80)."""
    if not torch.cuda.is_available():
        return False
    device = device or torch.device("cuda")
    if device.type != "cuda":
        return False
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def fits(shape: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether a weight of `shape` (out x in) meets the minimum and multiple shapes that torch's
    semi-structured tensors ask of the sparse operand in `dtype` (e.g. 32 x 64 for half types)."""
    from torch.sparse import SparseSemiStructuredTensor
    from torch.sparse.semi_structured import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS \
        else SparseSemiStructuredTensorCUSPARSELT
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if limits is None:
        return False
    rows, cols = shape
    return (rows >= limits.sparse_min_rows and rows % limits.sparse_min_rows == 0
            and cols >= limits.sparse_min_cols and cols % limits.sparse_min_cols == 0)


def compress(weight: torch.Tensor, dtype: torch.dtype):
    """The masked weight (zeros where inactive) as a semi-structured tensor of `dtype`."""
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight.to(dtype))


class _TwoFourLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        dtype = x.dtype if x.dtype in DTYPES else torch.bfloat16
        w = weight if mask is None else weight * mask
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = F.linear(x2, compress(w, dtype))
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x2, w.to(dtype), mask)
        ctx.has_bias, ctx.in_dtype, ctx.w_dtype = bias is not None, x.dtype, weight.dtype
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, w, mask = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
        grad_x = (g @ w).reshape(*grad_out.shape[:-1], w.shape[1]).to(ctx.in_dtype)
        grad_w = (g.t() @ x2).float()
        grad_w = (grad_w if mask is None else grad_w * mask).to(ctx.w_dtype)
        grad_b = g.float().sum(0).to(ctx.w_dtype) if ctx.has_bias else None
        return grad_x, grad_w, None, grad_b


def two_four_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` with the forward product on 2:4 sparse tensor cores;
    the result is in the half-precision dtype (x's, or bfloat16 for a float32 x). mask None: the
    weight is 2:4 already (zeros where inactive) and its gradient is dense, as nn.Linear's."""
    return _TwoFourLinear.apply(x, weight, mask, bias)


def routes(mod: nn.Module, structure: Structure) -> bool:
    """Whether execution=sparse runs `mod` as a TwoFourLinear: an nn.Linear whose mask keeps at
    most 2 of every 4 consecutive inputs (`structure`), of a shape the semi-structured tensors
    take, on a device where the product is available."""
    return (type(mod) is nn.Linear and structure.kind == "nm" and structure.m == 4 and structure.n <= 2
            and available(mod.weight.device) and any(fits(tuple(mod.weight.shape), d) for d in DTYPES))


class TwoFourLinear(nn.Linear):
    """nn.Linear (same parameters and state) of a masked layer whose forward product runs on 2:4
    semi-structured tensors under half-precision autocast (or half inputs), where the weight's
    shape fits them and its mask (``mask``, set by the execution engine before each forward) keeps
    at most 2 of every 4 inputs: the weight, zero where inactive, is then 2:4 as it is. Otherwise
    (a method's dense phase, float32) the plain nn.Linear product. Whether the mask is 2:4 is
    checked once per mask change (one host sync then, none per step). Run eagerly under
    torch.compile."""

    mask: torch.Tensor | None = None
    _checked: tuple | None = None  # (the mask checked, its version, whether it is 2:4)

    def _mask_is_two_four(self) -> bool:
        m = self.mask
        if m is None:
            return False
        c = self._checked
        if c is None or c[0] is not m or c[1] != m._version:  # the mask object holds on to its id
            self._checked = c = (m, m._version, TWO_FOUR.violations(m) == 0)
        return c[2]

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        if dtype in DTYPES and fits(tuple(self.weight.shape), dtype) and self._mask_is_two_four():
            with torch.autocast(kind, enabled=False):
                return two_four_linear(x.to(dtype), self.weight, None, self.bias)
        return super().forward(x)
