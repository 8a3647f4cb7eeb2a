"""Extra forward/backward passes on statistics batches that leave no trace on training.

GSE's code (``grow.py``) computes its growth scores, and its RigL baseline the dense gradient,
on separate training batches drawn at every update (``prune_grow_samples`` = 10 per class:
one batch of 128 on CIFAR-10, 8 on CIFAR-100), with the model in train mode. Here such a pass
runs inside :func:`quiet_pass`: the global RNG is forked (dropout draws do not shift the
training stream) and every buffer (batch-norm running statistics) is restored afterwards, so
the training run continues exactly as if the pass had not happened. The batches themselves come
from ``ctx.batches(n, key)`` (``DeviceLoader.draw``), a stream separate from the epoch order.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def quiet_pass(model: nn.Module, device):
    """Fork the global RNG (CPU and the device's CUDA stream) and restore the model's buffers."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    dev = torch.device(device)
    devices = []
    if dev.type == "cuda":
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


def dense_gradients(model: nn.Module, params: list[torch.Tensor], batches, loss_fn=None) -> list[torch.Tensor]:
    """Sum over `batches` of dL/dp for every parameter in `params` (train mode, as the reference),
    without touching any ``.grad``."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    total = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            for x, y in batches:
                grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
                for t, g in zip(total, grads):
                    if g is not None:
                        t.add_(g)
    finally:
        model.train(was_training)
    return total
