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

from .saliency import preserved_rng


@contextmanager
def quiet_pass(model: nn.Module, device):
    """Fork the global RNG (CPU and the device's CUDA stream) and restore the model's buffers."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with preserved_rng(torch.device(device)):
            yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


def dense_gradients(model: nn.Module, params: list[torch.Tensor], batches, loss_fn=None,
                    layers: list | None = None) -> list[torch.Tensor]:
    """Sum over `batches` of dL/dp for every parameter in `params` (train mode, as the reference),
    without touching any ``.grad``.

    Where ``layers[i]`` is a sparse layer (``execution=sparse``), ``params[i]`` is only a view of
    it that the forward pass does not use: that layer forms its dense weight gradient in its own
    backward instead (its dense-gradient switch is on during the pass and restored after)."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    layers = layers if layers is not None else [None] * len(params)
    targets = [p if layer is None else layer.values for p, layer in zip(params, layers)]
    controls = {id(layer.control): layer.control for layer in layers if layer is not None}
    saved = {k: (c.dense, c.grads) for k, c in controls.items()}
    total = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            for x, y in batches:
                for c in controls.values():
                    c.dense, c.grads = True, {}
                grads = torch.autograd.grad(loss_fn(model(x), y), targets, allow_unused=True)
                for t, g, layer in zip(total, grads, layers):
                    if layer is not None:
                        g = layer.control.grads.get(layer)
                    if g is not None:
                        t.add_(g.view(t.shape))
    finally:
        model.train(was_training)
        for k, c in controls.items():
            c.dense, c.grads = saved[k]
    return total
