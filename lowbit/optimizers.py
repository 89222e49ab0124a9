"""Optimizers and learning-rate schedules.

An optimizer updates the parameters of a model in place from the gradients its layers stored in
``backward`` (``layer.d<name>``).  Its state (moments, step count) is a dict of arrays keyed by the
parameter's path, so checkpoints can save and restore it exactly.

A layer may carry ``lr_multipliers = {"W": 2.5}`` to scale the step for one of its parameters (the
BinaryNet recipe scales each binary layer's learning rate by its Glorot factor).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module, to_device, to_numpy
from .functions import adam_update

__all__ = [
    "Optimizer", "SGD", "Momentum", "AdaGrad", "Adam", "Bop", "OPTIMIZERS", "get_optimizer",
    "Schedule", "ConstantLR", "StepLR", "ExponentialLR", "CosineLR", "SCHEDULES", "get_schedule",
]


class Optimizer:
    """Base class.  Subclasses implement ``_update(key, param, grad, lr)`` in place."""

    name = "optimizer"
    state_names: tuple = ()
    # True when ``_update`` takes ``bounds=(low, high)`` and clips the parameter in its own pass: a
    # layer that declares ``param_bounds = {"W": (-1, 1)}`` (and a ``bounds_applied`` set, emptied by
    # its ``constrain()``) then has its weights clipped there instead of in a second pass.
    fuses_bounds = False

    def __init__(self, lr=0.01):
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        self.lr = float(lr)
        self.state = {name: {} for name in self.state_names}
        self.steps = 0

    def config(self):
        return {"lr": self.lr}

    def step(self, model, lr=None):
        """Apply one update to every parameter of ``model`` that has a gradient."""
        lr = self.lr if lr is None else float(lr)
        self.steps += 1
        for key, layer, attr in model.named_arrays(buffers=False):
            grad = getattr(layer, "d" + attr, None)
            if grad is None:
                continue
            scale = getattr(layer, "lr_multipliers", {}).get(attr, 1.0)
            bounds = getattr(layer, "param_bounds", {}).get(attr) if self.fuses_bounds else None
            if bounds is None:
                self._update(key, getattr(layer, attr), grad, lr * scale)
            else:
                # the update clips in the same pass; the layer's constrain() then skips its clip
                self._update(key, getattr(layer, attr), grad, lr * scale, bounds=bounds)
                layer.bounds_applied.add(attr)
        model.constrain()

    def _slot(self, name, key, like):
        slots = self.state[name]
        if key not in slots:
            xp = get_array_module(like)
            slots[key] = xp.zeros_like(like)
        return slots[key]

    # -- checkpointing -----------------------------------------------------------------------------
    def state_arrays(self) -> dict:
        out = {}
        for name, slots in self.state.items():
            for key, arr in slots.items():
                out[f"{name}/{key}"] = to_numpy(arr)
        return out

    def load_state_arrays(self, arrays: dict, steps: int, device="cpu"):
        self.state = {name: {} for name in self.state_names}
        for full, arr in arrays.items():
            name, _, key = full.partition("/")
            if name not in self.state:
                raise ValueError(f"optimizer {self.name} has no state {name!r} (from {full!r})")
            self.state[name][key] = to_device(np.array(arr, copy=True), device)
        self.steps = int(steps)

    def to_device(self, device):
        for slots in self.state.values():
            for key in list(slots):
                slots[key] = to_device(slots[key], device)
        return self


class SGD(Optimizer):
    """``p -= lr * g``."""

    name = "sgd"

    def _update(self, key, p, g, lr):
        p -= np.float32(lr) * g


class Momentum(Optimizer):
    """``v = momentum * v - lr * g; p += v``."""

    name = "momentum"
    state_names = ("velocity",)

    def __init__(self, lr=0.01, momentum=0.9):
        super().__init__(lr)
        self.momentum = float(momentum)

    def config(self):
        return {"lr": self.lr, "momentum": self.momentum}

    def _update(self, key, p, g, lr):
        v = self._slot("velocity", key, p)
        v *= np.float32(self.momentum)
        v -= np.float32(lr) * g
        p += v


class AdaGrad(Optimizer):
    """``h += g*g; p -= lr * g / (sqrt(h) + eps)``."""

    name = "adagrad"
    state_names = ("h",)

    def __init__(self, lr=0.01, eps=1e-7):
        super().__init__(lr)
        self.eps = float(eps)

    def config(self):
        return {"lr": self.lr, "eps": self.eps}

    def _update(self, key, p, g, lr):
        xp = get_array_module(p)
        h = self._slot("h", key, p)
        h += g * g
        p -= np.float32(lr) * g / (xp.sqrt(h) + np.float32(self.eps))


_adam_kernel = None


def _fused_adam():
    """One CuPy kernel for a float32 parameter's whole Adam update, the float32 operations of the
    unfused path in the same order, compiled without contraction into FMAs (``--fmad=false``), so its
    results equal the unfused CuPy and numpy updates bit for bit."""
    global _adam_kernel
    if _adam_kernel is None:
        from .backend import cupy

        _adam_kernel = cupy.ElementwiseKernel(
            "float32 g, float32 c1, float32 c2, float32 step, float32 eps", "float32 p, float32 m, float32 v",
            """
            m = m + c1 * (g - m);
            v = v + c2 * (g * g - v);
            p = p - step * m / (sqrt(v) + eps);
            """,
            "lowbit_adam", options=("--fmad=false",))
    return _adam_kernel


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction folded into the step size:
    ``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``.

    ``fused=True``: on CuPy float32 parameters, one kernel per parameter for the whole update instead
    of a dozen (GPU training is bound by kernel launches), meant to give the op-by-op values bit for
    bit, so ``fused`` is not part of the config.  Off by default until a GPU run has confirmed it:
    ``tests/test_backend_gpu.py::test_adam_on_gpu_equals_numpy_bit_for_bit`` checks the values and
    ``experiments/bench_gpu_step.py`` the speed (written when the session's GPU was no longer lent).
    """

    name = "adam"
    state_names = ("m", "v")

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, fused=False):
        super().__init__(lr)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.fused = bool(fused)

    def config(self):
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "eps": self.eps}

    fuses_bounds = True

    def _update(self, key, p, g, lr, bounds=None):
        xp = get_array_module(p)
        m = self._slot("m", key, p)
        v = self._slot("v", key, p)
        t = self.steps
        b1, b2 = self.beta1, self.beta2
        step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        if self.fused and xp is not np and p.dtype == g.dtype == m.dtype == v.dtype == np.float32:
            _fused_adam()(g, np.float32(1 - b1), np.float32(1 - b2), np.float32(step), np.float32(self.eps),
                          p, m, v)
            if bounds is not None:
                xp.clip(p, bounds[0], bounds[1], out=p)
            return
        # numpy float32: one compiled pass (lowbit.kernels.float_ops); else the numpy expressions
        adam_update(p, g, m, v, 1 - b1, 1 - b2, step, self.eps, bounds)


def _bop_binary(layer, attr):
    """True for the weights Bop flips: ``W`` of a layer whose kernel quantizer has 1 bit."""
    quantizer = getattr(layer, "kernel_quantizer", None)
    return attr == "W" and getattr(quantizer, "precision", None) == 1


class Bop(Adam):
    """Bop (Helwegen et al. 2019, "Latent weights do not exist"), Adam for the other parameters.

    For every binary weight (``W`` of a layer whose ``kernel_quantizer`` has 1 bit) Bop keeps an
    exponential moving average of the gradient, ``m = m + gamma * (g - m)``, and flips the weight
    when the average is larger than ``threshold`` and pushes the same way the weight points:
    ``w = -sign(w)`` where ``w * m > threshold``, else ``w = sign(w)`` (``sign(0) = +1``).  The
    weights are then exactly +-1 (there is no latent weight; the first step binarizes them), and the
    learning rate, its schedule and ``lr_multipliers`` do not touch them.  Every other parameter
    (BatchNorm, biases, real-valued layers) takes the :class:`Adam` step with ``lr``.  The defaults
    are Larq's (``threshold=1e-8``, ``gamma=1e-4``).

    Its state is Adam's ``m``, ``v`` plus ``bop_m`` (the averages of the binary weights), so
    checkpoints resume it exactly.
    """

    name = "bop"
    state_names = ("m", "v", "bop_m")

    def __init__(self, lr=0.001, threshold=1e-8, gamma=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, fused=False):
        super().__init__(lr, beta1=beta1, beta2=beta2, eps=eps, fused=fused)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not (threshold >= 0 and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
            raise ValueError(f"gamma (the adaptivity rate) must be a number in (0, 1], got {gamma!r}")
        self.threshold = float(threshold)
        self.gamma = float(gamma)
        self._binary = set()

    def config(self):
        return {**super().config(), "threshold": self.threshold, "gamma": self.gamma}

    def step(self, model, lr=None):
        # the binary weights of this model by path: _update sends them to _flip, the rest to Adam
        self._binary = {key for key, layer, attr in model.named_arrays(buffers=False) if _bop_binary(layer, attr)}
        super().step(model, lr)

    def _update(self, key, p, g, lr, bounds=None):
        if key in self._binary:
            self._flip(key, p, g)  # exactly +-1: inside any bounds the layer declares
        else:
            super()._update(key, p, g, lr, bounds=bounds)

    def _flip(self, key, w, g):
        xp = get_array_module(w)
        m = self._slot("bop_m", key, w)
        m += w.dtype.type(self.gamma) * (g - m)
        sign = (w >= 0).astype(w.dtype) * w.dtype.type(2) - w.dtype.type(1)
        flip = sign * m > self.threshold
        w[...] = xp.where(flip, -sign, sign)


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adagrad": AdaGrad, "adam": Adam, "bop": Bop}


def get_optimizer(name, **kwargs):
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}") from None
    return cls(**kwargs)


class Schedule:
    """Learning rate as a function of the epoch index (0-based): ``schedule(epoch) -> lr``."""

    name = "schedule"

    def __init__(self, lr):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        self.lr = float(lr)

    def config(self):
        return {"name": self.name, "lr": self.lr}

    def with_epochs(self, epochs):
        """This schedule stretched or shrunk to ``epochs`` epochs in all (the same one when its rates do
        not depend on the run's length).  :class:`~lowbit.trainer.Trainer` uses it when a
        ``time_budget`` fixes the number of epochs after the first one; every schedule here gives the
        first epoch (index 0) its starting ``lr`` whatever the length, so that epoch is the same either way."""
        return self


class ConstantLR(Schedule):
    name = "constant"

    def __call__(self, epoch):
        return self.lr


class StepLR(Schedule):
    """``lr * gamma ** (epoch // step_size)``."""

    name = "step"

    def __init__(self, lr, step_size=10, gamma=0.1):
        super().__init__(lr)
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)

    def config(self):
        return {**super().config(), "step_size": self.step_size, "gamma": self.gamma}

    def __call__(self, epoch):
        return self.lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(Schedule):
    """Geometric decay from ``lr`` at epoch 0 to ``lr_end`` at the last epoch (``epochs - 1``).

    This is the BinaryNet paper's schedule (3e-3 -> 3e-7 over 1000 epochs)."""

    name = "exponential"

    def __init__(self, lr, lr_end, epochs):
        super().__init__(lr)
        if not lr_end > 0:
            raise ValueError(f"lr_end must be > 0, got {lr_end!r}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs!r}")
        self.lr_end = float(lr_end)
        self.epochs = int(epochs)

    def config(self):
        return {**super().config(), "lr_end": self.lr_end, "epochs": self.epochs}

    def __call__(self, epoch):
        if self.epochs == 1:
            return self.lr
        frac = min(epoch, self.epochs - 1) / (self.epochs - 1)
        return self.lr * (self.lr_end / self.lr) ** frac

    def with_epochs(self, epochs):
        return ExponentialLR(self.lr, self.lr_end, epochs)


class CosineLR(Schedule):
    """``lr_min + (lr - lr_min) * (1 + cos(pi * epoch / epochs)) / 2``."""

    name = "cosine"

    def __init__(self, lr, epochs, lr_min=0.0):
        super().__init__(lr)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs!r}")
        self.epochs = int(epochs)
        self.lr_min = float(lr_min)

    def config(self):
        return {**super().config(), "epochs": self.epochs, "lr_min": self.lr_min}

    def __call__(self, epoch):
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2

    def with_epochs(self, epochs):
        return CosineLR(self.lr, epochs, self.lr_min)


SCHEDULES = {"constant": ConstantLR, "step": StepLR, "exponential": ExponentialLR, "cosine": CosineLR}


def get_schedule(name, **kwargs):
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}") from None
    return cls(**kwargs)
