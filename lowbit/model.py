"""The model container: a :class:`~lowbit.layers.Sequential` with batched inference and bookkeeping.

A ``Model`` takes float32 images (N, 1, 28, 28) in [0, 1] (or whatever ``input_shape`` says) and returns
class scores; any normalisation the model was trained with is one of its layers (``Rescale``), so a
saved model is self-contained.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, is_cupy_array, to_numpy
from .functions import direct_conv_enabled, fast_ops_enabled, one_blas_thread
from .layers import Conv2D, Dropout, Sequential, register_layer

__all__ = ["Classifier", "Model", "check_no_nan"]


def check_no_nan(arr, name="x"):
    """Raise ValueError naming ``name`` when the float array ``arr`` (numpy or CuPy) holds a NaN.

    Every inference entry point (:class:`Model`, :class:`~lowbit.packed.PackedModel`, and so the CLI)
    refuses NaN the same way, as the binary simulation's sign does, instead of returning labels for it.
    """
    if arr.size and arr.dtype.kind == "f":
        xp = get_array_module(arr)
        bad = xp.isnan(arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr[:, None]).any(axis=1)
        if bool(bad.any()):
            rows = to_numpy(xp.flatnonzero(bad))
            raise ValueError(f"{name} holds NaN in {len(rows)} of {arr.shape[0]} images (first: index "
                             f"{int(rows[0])}); images must be numbers in [0, 1]")
    return arr


class Classifier:
    """Mixin: ``predict`` and ``evaluate`` for anything with ``predict_scores(x, batch_size)``."""

    def predict(self, x, batch_size=100):
        """Predicted class labels (N,) int64."""
        return self.predict_scores(x, batch_size).argmax(axis=1)

    def evaluate(self, x, y, batch_size=100) -> float:
        """Accuracy in [0, 1] on images ``x`` and int labels ``y``."""
        y = np.asarray(to_numpy(y))
        if y.shape != (len(x),):
            raise ValueError(f"y must have shape ({len(x)},), got {y.shape}")
        return float((self.predict(x, batch_size) == y).mean())


@register_layer
class Model(Classifier, Sequential):
    """Sequential model with ``predict``, ``evaluate`` and parameter access.

    Parameters
    ----------
    layers : list of Layer
    input_shape : tuple of int
        Shape of one example, without the batch axis; ``(1, 28, 28)`` for MNIST images.
    name : str
        Free-form name stored in the model file.
    """

    def __init__(self, layers=(), input_shape=(1, 28, 28), name="model"):
        super().__init__(layers)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = str(name)

    def config(self):
        return {"input_shape": list(self.input_shape), "name": self.name}

    @classmethod
    def from_spec(cls, spec):
        base = Sequential.from_spec(spec)
        return cls(base.layers, **spec.get("config", {}))

    # -- passes -------------------------------------------------------------------------------
    def forward(self, x, train=False):
        with self._blas_policy(x):
            return super().forward(x, train)

    def backward(self, dout, input_grad=True):
        """The gradients of the last ``forward``: returns the input gradient, or None with
        ``input_grad=False`` (only the parameter gradients; the first layer with parameters skips its
        input gradient, see :meth:`~lowbit.layers.Sequential.backward_params`), which a training step
        that discards it should pass."""
        with self._blas_policy(dout):
            return super().backward(dout, input_grad)

    def _blas_policy(self, x):
        """numpy's BLAS on one thread through a pass whose convolutions run on the parallel Numba
        kernels (fast ops and direct convolutions on, numpy float32; :func:`lowbit.functions.one_blas_thread`):
        the idle workers of a multi-threaded product spin on the cores those kernels need.
        binary_cnn at 2 threads on a 2-core AMD EPYC, batch 100: 160-167 ms a step with BLAS on 2
        threads, 99-105 ms with it on one (137 ms on 1 thread of each)."""
        held = (fast_ops_enabled() and direct_conv_enabled() and type(x) is np.ndarray and x.dtype == np.float32
                and any(isinstance(layer, Conv2D) for _, layer in self.named_layers()))
        return one_blas_thread(held)

    # -- parameters ---------------------------------------------------------------------------
    def parameters(self):
        """List of ``(path, layer, attribute)`` for every trainable array."""
        return list(self.named_arrays(buffers=False))

    def num_parameters(self) -> int:
        return int(sum(getattr(layer, attr).size for _, layer, attr in self.parameters()))

    def seed(self, seed):
        """Re-seed every stochastic layer (Dropout, stochastic quantizers) from one integer."""
        rngs = [layer for _, layer in self.named_layers() if hasattr(layer, "rng")]
        children = np.random.SeedSequence(seed).spawn(len(rngs))
        for layer, ss in zip(rngs, children):
            layer.rng = np.random.default_rng(ss)
        return self

    def rng_states(self) -> dict:
        """JSON-serialisable bit-generator states of every stochastic layer, keyed by path."""
        return {path: layer.rng.bit_generator.state
                for path, layer in self.named_layers() if hasattr(layer, "rng")}

    def set_rng_states(self, states: dict):
        for path, layer in self.named_layers():
            if hasattr(layer, "rng"):
                if path not in states:
                    raise ValueError(f"checkpoint has no random state for layer {path!r}")
                layer.rng.bit_generator.state = states[path]

    compute_dtype = np.float32

    def astype(self, dtype):
        """Cast every parameter to ``dtype`` (float16 or float32) and run inference in it, in place.

        ``model.astype(np.float16)`` gives half-precision inference: float16 weights and activations,
        products accumulated in float32 (:func:`lowbit.functions.matmul`), BatchNorm statistics kept in
        float32.  Returns the model.
        """
        dtype = np.dtype(dtype)
        if dtype not in (np.float16, np.float32):
            raise ValueError(f"dtype must be float16 or float32, got {dtype}")
        for _, layer, attr in self.named_arrays(buffers=False):
            setattr(layer, attr, getattr(layer, attr).astype(dtype))
        for _, layer in self.named_layers():
            layer._clear_cache()
        self.compute_dtype = dtype.type
        return self

    # -- inference ----------------------------------------------------------------------------
    def _check_images(self, x):
        if is_cupy_array(x):
            arr = x
        else:
            arr = np.asarray(x)
        if arr.ndim == len(self.input_shape) + 1 and tuple(arr.shape[1:]) == self.input_shape:
            pass
        else:
            raise ValueError(
                f"x must have shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(arr.shape)}"
            )
        if arr.dtype.kind != "f":
            raise TypeError(
                f"x must be float images in [0, 1] (float32), got dtype {arr.dtype}; "
                "divide uint8 images by 255 first"
            )
        return check_no_nan(arr).astype(self.compute_dtype, copy=False)

    def predict_scores(self, x, batch_size=100):
        """Class scores (N, classes) float32 for images ``x``, computed in batches (evaluation mode)."""
        x = self._check_images(x)
        xp_model = self._array_module()
        outs = []
        for start in range(0, x.shape[0], batch_size):
            batch = x[start:start + batch_size]
            if xp_model is not np and not is_cupy_array(batch):
                batch = xp_model.asarray(batch)
            outs.append(to_numpy(self.forward(batch, train=False)).astype(np.float32, copy=False))
        if not outs:  # an empty batch: no scores, of the model's output width
            return np.zeros((0,) + tuple(self.output_shape((1,) + self.input_shape)[1:]), dtype=np.float32)
        return np.concatenate(outs, axis=0)

    def _array_module(self):
        for _, layer, attr in self.named_arrays():
            return get_array_module(getattr(layer, attr))
        return np

    def has_dropout(self):
        return any(isinstance(layer, Dropout) for _, layer in self.named_layers())
