"""Gradients of a layer's loss for a chosen set of weights, without the dense weight gradient.

For a Linear or Conv2d layer the gradient of the loss with respect to weight (i, j) is a sum over
*rows*: ``dL/dW_ij = sum_r delta[r, i] * x[r, j]``, where ``x`` holds the layer's inputs and
``delta`` the gradients of the loss with respect to its outputs.

* Linear: one row per sample (and per token: leading dimensions are flattened).
* Conv2d: the weight is read as a matrix ``(C_out, C_in * kh * kw)`` (PyTorch's ``flatten(1)``
  order, which is also ``unfold``'s); each output position of each sample is one row whose
  input is the image patch ``unfold`` extracts with the layer's stride, padding and dilation.

``candidate_gradients`` evaluates that sum only for the listed ``(output unit, input unit)``
pairs, in blocks of at most about ``chunk_size`` elements (candidates x rows, or units x rows
for the unfolded patches), so memory stays bounded whatever the layer's width, and no tensor of
the weight's shape is ever formed. ``unit_scores`` computes the per-unit statistics GSE samples
from (GraBo's sums of absolute values, GraEst's random-sign sums) with the same row blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .execution import kernels
from .execution.layers import SparseConv2d, SparseLayer, SparseLinear

DEFAULT_CHUNK = 1 << 20  # elements per intermediate block (4 MiB in float32)
SCORE_KINDS = ("grabo", "graest")


def _is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Conv2d, SparseConv2d))


def check_layer(layer: nn.Module, name: str = "layer") -> None:
    """Raise ConfigError unless `layer` is a Linear or an ungrouped Conv2d (dense or sparse)."""
    if _is_conv(layer):
        if layer.groups != 1:
            raise ConfigError(
                f"method=gse: {name} is a Conv2d with groups={layer.groups}; candidate gradients need "
                f"groups=1, keep it dense with prunable.exclude=['{name}.weight']"
            )
        return
    if isinstance(layer, (nn.Linear, SparseLinear)):
        return
    raise ConfigError(
        f"method=gse: {name} is a {type(layer).__name__}; GSE handles Linear and Conv2d weights only, "
        f"keep it dense with prunable.exclude=['{name}.weight']"
    )


def weight_matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(output units, input units) of the layer's weight read as a matrix."""
    if isinstance(layer, SparseLayer):
        return layer.rows, layer.cols
    w = layer.weight
    return w.shape[0], math.prod(w.shape[1:])


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _conv_input(layer: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The input padded as the layer pads it, and the padding left for ``unfold``."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), (0, 0)
    return x, tuple(layer.padding)


def num_rows(layer: nn.Module, grad_outputs: torch.Tensor) -> int:
    """How many rows (samples, tokens or image patches) one call of the layer contributes."""
    if _is_conv(layer):
        return grad_outputs.shape[0] * grad_outputs.shape[2] * grad_outputs.shape[3]
    return grad_outputs.numel() // grad_outputs.shape[-1]


def iter_rows(
    layer: nn.Module, inputs: torch.Tensor, grad_outputs: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Blocks ``(first_row, x_t (fan_in, R), delta_t (out, R))`` covering all rows in order.

    Each block holds R consecutive rows, stored unit-major (one contiguous row of length R per
    input or output unit) so that gathering the units of a set of candidates reads contiguous
    memory. Conv rows are ordered sample-major, then output position (row-major over
    H_out x W_out); a conv block unfolds whole samples, as many as fit in about `chunk_size`
    elements (at least one). Linear blocks hold about `chunk_size` / (fan_in + out) rows.
    """
    check_layer(layer)
    chunk_size = max(1, int(chunk_size))
    n_out, fan_in = weight_matrix_shape(layer)
    dtype = _work_dtype(inputs)
    if _is_conv(layer):
        x, padding = _conv_input(layer, inputs)
        b = x.shape[0]
        L = grad_outputs.shape[2] * grad_outputs.shape[3]
        per = max(1, chunk_size // max(1, (fan_in + n_out) * L))
        for s0 in range(0, b, per):
            s1 = min(b, s0 + per)
            patches = F.unfold(x[s0:s1].to(dtype), layer.kernel_size, dilation=layer.dilation,
                               padding=padding, stride=layer.stride)  # (s, fan_in, L)
            xt = patches.transpose(0, 1).reshape(fan_in, -1)
            dt = grad_outputs[s0:s1].to(dtype).flatten(2).transpose(0, 1).reshape(n_out, -1)
            yield s0 * L, xt, dt
        return
    xr = inputs.reshape(-1, fan_in)
    dr = grad_outputs.reshape(-1, n_out)
    rows = xr.shape[0]
    per = max(1, chunk_size // max(1, fan_in + n_out))
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        yield r0, xr[r0:r1].to(dtype).t().contiguous(), dr[r0:r1].to(dtype).t().contiguous()


def candidate_gradients(
    layer: nn.Module,
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    out_idx: torch.Tensor,
    in_idx: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """``dL/dW[out_idx[c], in_idx[c]]`` for every candidate c, from one call of `layer`.

    `inputs` is what the layer received (Linear: ``(..., in)``; Conv2d: ``(B, C_in, H, W)``),
    `grad_outputs` the loss gradient with respect to its output. `in_idx` indexes the flattened
    fan-in (``C_in * kh * kw`` for a conv). Sum the results over calls and batches to match a
    gradient accumulated over them. Returns a 1-D tensor (float32 or wider) on the inputs'
    device; the work is done in blocks of about `chunk_size` elements.
    """
    check_layer(layer)
    if out_idx.shape != in_idx.shape or out_idx.dim() != 1:
        raise ValueError("out_idx and in_idx must be 1-D index tensors of the same length")
    chunk_size = max(1, int(chunk_size))
    device = inputs.device
    out_idx = out_idx.to(device=device, dtype=torch.long)
    in_idx = in_idx.to(device=device, dtype=torch.long)
    n_cand = out_idx.numel()
    result = torch.zeros(n_cand, dtype=_work_dtype(inputs), device=device)
    if n_cand == 0:
        return result
    if result.dtype == torch.float32 and device.type == "cpu" and kernels.backend() == "c":
        # the candidates as a CSR pattern (sorted by output unit), their gradients by the sparse
        # layers' sampled dot-product kernel, one row block at a time
        n_out = weight_matrix_shape(layer)[0]
        order = torch.argsort(out_idx, stable=True)
        indptr = torch.zeros(n_out + 1, dtype=torch.int64)
        indptr[1:] = torch.bincount(out_idx, minlength=n_out).cumsum(0)
        cols = in_idx[order].to(torch.int32)
        acc = torch.zeros(n_cand, dtype=torch.float32)
        # blocks of at least 256 rows: the kernel's batch tiles stay full (memory: a transposed
        # copy of that many rows of inputs and output gradients)
        block = max(chunk_size, 256 * (weight_matrix_shape(layer)[1] + n_out))
        for _, xt, dt in iter_rows(layer, inputs, grad_outputs, block):
            acc += kernels.sddmm(indptr, cols, dt.unsqueeze(0), xt.unsqueeze(0))
        result[order] = acc
        return result
    for _, xt, dt in iter_rows(layer, inputs, grad_outputs, chunk_size):
        rows = xt.shape[1]
        per_cand = max(1, chunk_size // max(1, rows))
        for c0 in range(0, n_cand, per_cand):
            c1 = min(n_cand, c0 + per_cand)
            # (cands, rows) blocks: each candidate's output-gradient row times its input row
            d = dt.index_select(0, out_idx[c0:c1])
            d.mul_(xt.index_select(0, in_idx[c0:c1]))
            result[c0:c1] += d.sum(1)
    return result


def unit_scores(
    layer: nn.Module,
    inputs: torch.Tensor,
    grad_outputs: torch.Tensor,
    kind: str,
    signs: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit sums ``(g over outputs, f over inputs)`` of one call, before any absolute value.

    ``grabo``: ``g_i = sum_r |delta[r, i]|``, ``f_j = sum_r |x[r, j]|`` (already non-negative).
    ``graest``: ``g_i = sum_r s_r delta[r, i]``, ``f_j = sum_r s_r x[r, j]`` with the random signs
    `signs` (one per row, shared by inputs and outputs so the product estimates the gradient);
    the sampler takes the absolute value after summing over all calls and batches.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; choose one of {SCORE_KINDS}")
    n_out, fan_in = weight_matrix_shape(layer)
    dtype = _work_dtype(inputs)
    g = torch.zeros(n_out, dtype=dtype, device=inputs.device)
    f = torch.zeros(fan_in, dtype=dtype, device=inputs.device)
    if kind == "graest":
        if signs is None or signs.numel() != num_rows(layer, grad_outputs):
            raise ValueError("graest needs one sign per row")
        signs = signs.to(device=inputs.device, dtype=dtype)
    for r0, xt, dt in iter_rows(layer, inputs, grad_outputs, chunk_size):
        if kind == "grabo":
            g += dt.abs().sum(1)
            f += xt.abs().sum(1)
        else:
            s = signs[r0:r0 + xt.shape[1]]
            g += dt @ s
            f += xt @ s
    return g, f
