"""Mixed-precision training (Micikevicius et al. 2017, arXiv 1710.03740).

The forward and backward passes run in float16: parameters are cast to float16 working copies, the
input is cast to float16, matrix products take float16 operands and accumulate in float32
(:func:`lowbit.functions.matmul`), BatchNorm keeps its statistics in float32.  The optimizer updates
a float32 master copy of every parameter (updates below 2^-24 would vanish in float16).

Loss scaling keeps small gradients representable: the loss gradient is multiplied by ``scale``
before the float16 backward pass, and the parameter gradients are divided by it in float32.  The
dynamic rule (as in the paper and in PyTorch's GradScaler): a step whose gradients hold inf or NaN is
skipped and ``scale *= backoff_factor``; after ``growth_interval`` good steps in a row
``scale *= growth_factor``.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module

__all__ = ["LossScaler", "PRECISIONS", "mixed_precision_step"]

PRECISIONS = ("fp32", "mixed16")


class LossScaler:
    """Dynamic (or static, ``dynamic=False``) loss scale; its state goes into checkpoints."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, dynamic=True):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        if not growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval!r}")
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.dynamic = bool(dynamic)
        self.good_steps = 0
        self.skipped_steps = 0
        self.skipped_in_a_row = 0

    def config(self):
        return {"init_scale": self.scale if not self.dynamic else None,
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "dynamic": self.dynamic}

    def state(self):
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps,
                "skipped_in_a_row": self.skipped_in_a_row}

    def load_state(self, state):
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))

    def update(self, overflow: bool):
        if overflow:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            self.good_steps = 0
            if self.dynamic:
                self.scale = max(self.scale * self.backoff_factor, 2.0 ** -24)
            return
        self.skipped_in_a_row = 0
        self.good_steps += 1
        if self.dynamic and self.good_steps >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, 2.0 ** 24)
            self.good_steps = 0


def mixed_precision_step(model, loss_fn, optimizer, scaler, x, y, lr):
    """One float16 forward/backward with float32 master weights.  Returns ``(loss, scores, stepped)``.

    ``loss`` is float32-computed from the float16 scores (``nan``/``inf`` when the forward overflowed);
    ``stepped`` is False when the step was skipped for an overflow.
    """
    masters = [(layer, attr, getattr(layer, attr)) for _, layer, attr in model.named_arrays(buffers=False)]
    for layer, attr, master in masters:
        setattr(layer, attr, master.astype(np.float16))
    try:
        scores = model.forward(x.astype(np.float16), train=True).astype(np.float32)
        finite = bool(get_array_module(scores).isfinite(scores).all())
        loss = loss_fn.forward(scores, y) if finite else math.inf
        finite = finite and math.isfinite(loss)
        if finite:
            dscores = loss_fn.backward() * np.float32(scaler.scale)
            model.backward(dscores.astype(np.float16), input_grad=False)  # dx of the images is not used
    finally:
        for layer, attr, master in masters:
            setattr(layer, attr, master)
    if finite:
        inv = np.float32(1.0 / scaler.scale)
        for layer, attr, _ in masters:
            grad = getattr(layer, "d" + attr, None)
            if grad is None:
                continue
            grad32 = grad.astype(np.float32) * inv
            xp = get_array_module(grad32)
            if not bool(xp.isfinite(grad32).all()):
                finite = False
            setattr(layer, "d" + attr, grad32)
    if finite:
        optimizer.step(model, lr)
    else:
        model.zero_grads()
        for layer, _, _ in masters:
            layer._clear_cache()  # quantized layers cache float16 weights from the forward pass
    scaler.update(not finite)
    return loss, scores, finite
