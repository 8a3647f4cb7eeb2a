"""GSE's CIFAR vision transformer (``vit_cifar``; "simple-vit-tiny" in the official code).

The GSE code (mikeheddes/guided-stochastic-exploration, models/simple_vit.py, after lucidrains'
SimpleViT) builds, for patch 4, dim 512, depth 4, 6 heads of 64, MLP 256:

- patch embedding: cut the image into p x p patches, flatten each as (row, column, channel),
  LayerNorm(p*p*C) - Linear(p*p*C, dim) - LayerNorm(dim);
- add a fixed 2-D sin-cos position embedding (no parameters): for the patch at grid (y, x) and
  omega_i = 10000^(-i / (dim/4 - 1)), i < dim/4, the vector
  [sin(x omega), cos(x omega), sin(y omega), cos(y omega)];
- depth pre-norm blocks, no dropout:
  x += Out(Attn(LN(x))) with one bias-free Linear(dim, 3 * heads * dim_head) for q, k, v and a
  bias-free Linear(heads * dim_head, dim) out projection, softmax(q k^T / sqrt(dim_head)) v;
  x += Linear(GELU(Linear(LN(x))))  (dim -> mlp_dim -> dim, with biases);
- mean over patches (no class token), LayerNorm, Linear(dim, C).

Every projection is an ``nn.Linear`` so the default prunable rule masks it (no
``nn.MultiheadAttention`` and its ``in_proj_weight``). q, k and v share one Linear as in the
reference, so per-layer densities (ER/ERK) see the same layers as there. Masked weights at C = 10:
4,224,000.

``model.width`` scales dim, heads and MLP width as ``int(512 w)``, ``int(6 w)``, ``int(256 w)``
with the head size fixed at 64, as GSE's width experiments do.

For SynFlow's linearised scoring (GSE's ``prepare_synflow_model``) an attention module's
``attention_softmax`` flag can be turned off on a copy: it then computes ``(q k^T / sqrt(d)) v``.

Differences: attention runs through ``F.scaled_dot_product_attention`` (same maths); the position
embedding is computed once for the configured image size and kept as a non-saved buffer
(recomputed if another grid size arrives) instead of on every forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import schema as S
from ..errors import ConfigError
from .zoo import require_image, scaled


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, shape (h * w, dim), rows in raster order."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / (quarter - 1))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    y = ys.flatten()[:, None] * omega[None, :]
    x = xs.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with bias-free Linear projections."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        # False: (q k^T / sqrt(d)) v without the softmax (SynFlow's linearised scoring only)
        self.attention_softmax = True
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if self.attention_softmax:
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(dim_head)
        else:
            out = (qkv[0] @ qkv[1].transpose(-2, -1)) * self.dim_head ** -0.5 @ qkv[2]
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SimpleViT(nn.Module):
    """ViT with fixed sin-cos positions and mean pooling (no class token, no dropout)."""

    def __init__(self, image_size=(32, 32), patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 dim: int = 512, depth: int = 4, heads: int = 6, dim_head: int = 64, mlp_dim: int = 256):
        super().__init__()
        ih, iw = image_size
        if patch_size < 1 or ih % patch_size or iw % patch_size:
            raise ConfigError(
                f"model.patch_size={patch_size} must divide the image size {ih}x{iw}; set e.g. model.patch_size=4"
            )
        if dim % 4 or dim < 8:
            raise ConfigError(f"model.dim={dim} (after model.width) must be a multiple of 4, at least 8, "
                              "for the sin-cos embedding")
        self.patch_size = patch_size
        patch_dim = in_channels * patch_size * patch_size
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.dim = dim
        self.grid = (ih // patch_size, iw // patch_size)
        self.register_buffer("pos_embedding", sincos_2d(*self.grid, dim), persistent=False)
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)]) for _ in range(depth)
        )
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, h, w, p*p*C), each patch flattened as (row, column, channel)."""
        b, c, hh, ww = img.shape
        p = self.patch_size
        x = img.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, hh // p, ww // p, p * p * c)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_proj(self.patch_norm(self.patchify(img))))
        b, h, w, d = x.shape
        pe = self.pos_embedding
        if (h, w) != self.grid:
            pe = sincos_2d(h, w, d).to(x.device)
        x = x.reshape(b, h * w, d) + pe.to(x.dtype)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.head(self.head_norm(x.mean(dim=1)))


def _build(cfg, input_shape, num_classes):
    require_image("vit_cifar", input_shape)
    width = cfg.width
    return SimpleViT(
        image_size=tuple(input_shape[1:]),
        patch_size=cfg.patch_size,
        in_channels=input_shape[0],
        num_classes=num_classes,
        dim=scaled(cfg.dim, width),
        depth=cfg.depth,
        heads=scaled(cfg.heads, width),
        dim_head=cfg.dim_head,
        mlp_dim=scaled(cfg.mlp_dim, width),
    )


MODELS = {"vit_cifar": _build}


@dataclass
class ViTSchema(S.WidthSchema):
    patch_size: int = S.count(ge=1)
    dim: int = S.count(ge=1)
    depth: int = S.count(ge=1)
    heads: int = S.count(ge=1)
    dim_head: int = S.count(ge=1)
    mlp_dim: int = S.count(ge=1)


S.register("model", "vit_cifar", _build, ViTSchema)
