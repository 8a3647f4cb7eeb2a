"""``precision``: fp32, or mixed precision (bf16 / fp16 autocast) as timm's train.py trains.

Under ``bf16`` or ``fp16`` the forward pass and the loss run under ``torch.autocast``; the weights,
their gradients, the masks, the methods' scores (magnitudes, gradients and momenta used for
growth, GSE's candidate gradients) and the optimizer state stay float32, so a grown weight still
starts at exactly 0 and weight decay is applied in float32. ``fp16`` adds a ``GradScaler``: the
loss is scaled before backward and the gradients unscaled before the method's
``before_optimizer_step`` (so every method reads true gradients); a step whose gradients
overflowed is skipped, as torch's scaler does. Its state is part of the checkpoint.

The sparse layers' C kernels stay float32: under autocast an input is cast to float32 at the
layer's boundary and the layer runs with autocast off (``execution.layers``).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError
from ..schema import PRECISIONS


class Amp:
    """Autocast and (fp16) gradient scaling for one run."""

    def __init__(self, precision: str = "fp32", device: torch.device | str = "cpu"):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision} is not one of: {', '.join(PRECISIONS)}")
        self.precision = precision
        self.dtype = None if PRECISIONS[precision] is None else getattr(torch, PRECISIONS[precision])
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None

    def autocast(self):
        """The context the forward pass and the loss run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients from here on (fp16: divided by the scale; a no-op otherwise)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when the unscaled gradients hold inf or nan
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


FP32 = Amp()
