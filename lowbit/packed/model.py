"""The packed model: a checked chain of stages, batched inference, profiling, files."""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from ..backend import is_cupy_array, to_device, to_numpy
from ..functions import blas_controller, one_blas_thread
from ..io import ModelFileError, read_archive, write_archive
from ..layers import Sequential
from ..model import Classifier, check_no_nan
from .common import PACKED_FORMAT, describe_spec, make_spec
from .stages import FloatStage, ResidualStage, build_stages

# -- the model ------------------------------------------------------------------------------------
class PackedModel(Classifier):
    """A converted model: a chain of :class:`Stage` objects that runs on numpy (Numba) or CuPy.

    Parameters
    ----------
    stages : list of Stage
        Consecutive stages must agree on their domain specs; the first takes float images of
        ``input_shape``, the last returns float scores.
    input_shape : tuple of int
        Shape of one example (``(1, 28, 28)`` for MNIST).
    name : str
    notes : list of str
        What the converter decided where it could not fuse (kept in the file).
    source : dict
        About the model it came from: ``name``, ``parameters`` (trainable + buffers) and
        ``float32_bytes`` (their size at 32 bits).
    """

    def __init__(self, stages, input_shape, name="packed", notes=(), source=None):
        self.stages = list(stages)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = str(name)
        self.notes = [str(n) for n in notes]
        self.source = dict(source or {})
        self.metadata = {}
        self._check_chain()

    def _check_chain(self):
        if not self.stages:
            raise ValueError("a packed model needs at least one stage")
        expected = make_spec("float", None, self.input_shape)
        for index, stage in enumerate(self.stages):
            if stage.input_spec != expected:
                raise ValueError(
                    f"stage {index} ({stage.kind}) takes {describe_spec(stage.input_spec)} but receives "
                    f"{describe_spec(expected)}")
            expected = stage.output_spec
        if expected[0] != "float":
            raise ValueError(f"the last stage must return float scores, it returns {describe_spec(expected)}")

    @property
    def output_shape(self):
        return self.stages[-1].output_spec[2]

    # -- inference ----------------------------------------------------------------------------
    def _blas_limit(self, blas_threads):
        """A context that sets numpy's BLAS threads (see :meth:`predict_scores`)."""
        if blas_threads == "auto":
            packed = any(not isinstance(stage, FloatStage) for stage in self.stages)
            blas_threads = 1 if packed and self.device == "cpu" else None
        if blas_threads is None:
            return contextlib.nullcontext()
        if isinstance(blas_threads, bool) or not isinstance(blas_threads, (int, np.integer)) or blas_threads < 1:
            raise ValueError(f"blas_threads must be 'auto', None or an int >= 1, got {blas_threads!r}")
        if blas_threads == 1:  # BLAS's workers held: the float kernels (float_ops) may take Numba's threads
            return one_blas_thread()
        return blas_controller().limit(limits=int(blas_threads), user_api="blas")

    def forward(self, x):
        """Run every stage on a batch ``x`` (float32, (N,) + input_shape) of the model's array kind.

        Consecutive stages that have a fused kernel (:meth:`Stage.fused_with`: a binary convolution
        and the threshold after it; a first convolution with few input channels and the pack after
        it) run as one step, with the same result.
        """
        for step in self._plan():
            x = step(x)
        return x

    def _plan(self):
        """The steps of :meth:`forward`: ``stage.run`` or a fused pair, remade when ``stages`` change."""
        key = tuple(map(id, self.stages))
        cached = getattr(self, "_cached_plan", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        steps, index = [], 0
        while index < len(self.stages):
            stage = self.stages[index]
            fused = stage.fused_with(self.stages[index + 1]) if index + 1 < len(self.stages) else None
            steps.append(fused or stage.run)
            index += 2 if fused else 1
        self._cached_plan = (key, steps)
        return steps

    def _check_images(self, x):
        arr = x if is_cupy_array(x) else np.asarray(x)
        if arr.ndim != len(self.input_shape) + 1 or tuple(arr.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x must have shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(arr.shape)}")
        if arr.dtype.kind != "f":
            raise TypeError(f"x must be float images in [0, 1] (float32), got dtype {arr.dtype}; "
                            "divide uint8 images by 255 first")
        return check_no_nan(arr).astype(np.float32, copy=False)

    def predict_scores(self, x, batch_size=100, blas_threads="auto"):
        """Scores (N, classes) float32, in batches.

        Equal to ``Model.predict_scores`` of the source model with the same ``batch_size``: float
        stages make the same BLAS calls as the simulation, and BLAS may round a product differently
        for another batch shape.

        ``blas_threads``: threads of numpy's BLAS meanwhile (threadpoolctl).  "auto" is 1 on the CPU
        when the model has packed stages: their float stages are small (first and last layers), and
        BLAS's idle worker threads spin on the cores that the Numba kernels need (several times
        slower end to end on the binary CNN with 2 BLAS threads on 2 cores).  None leaves BLAS alone.
        """
        x = self._check_images(x)
        on_gpu = self.device == "gpu"
        outs = []
        with self._blas_limit(blas_threads):
            for start in range(0, x.shape[0], batch_size):
                batch = x[start:start + batch_size]
                if on_gpu and not is_cupy_array(batch):
                    batch = to_device(batch, "gpu")
                elif not on_gpu and is_cupy_array(batch):
                    batch = to_numpy(batch)
                outs.append(to_numpy(self.forward(batch)).astype(np.float32, copy=False))
        if not outs:
            return np.zeros((0,) + tuple(self.output_shape), dtype=np.float32)
        return np.concatenate(outs, axis=0)

    @property
    def device(self):
        """'cpu' or 'gpu': where the stages' arrays live."""
        for stage in _all_stages(self.stages):
            held = [getattr(stage, name) for name in stage._array_names]
            if getattr(stage, "weights", None) is not None:
                held.append(stage.weights)
            if isinstance(stage, FloatStage):
                held += [getattr(layer, attr) for _, layer, attr in Sequential(stage.layers).named_arrays()]
            if held:
                return "gpu" if is_cupy_array(held[0]) else "cpu"
        return getattr(self, "_device", "cpu")

    def to_device(self, device):
        """Move every stage to 'cpu' (numpy, Numba kernels) or 'gpu' (CuPy, CUDA kernels), in place."""
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        for stage in self.stages:
            stage.to_device(device)
        self._device = device
        return self

    def profile(self, x, repeats=5):
        """Median seconds per row of :meth:`Stage.rows` on batch ``x``: list of ``(stage, label, s)``."""
        x = self._check_images(x)
        if self.device == "gpu":
            x = to_device(x, "gpu")
        timings = [[] for _ in range(sum(len(stage.rows()) for stage in self.stages))]
        labels = []
        with self._blas_limit("auto"):
            self._profile_passes(x, repeats, timings, labels)
        return [(index, label, float(np.median(times))) for (index, label), times in zip(labels, timings)]

    def _profile_passes(self, x, repeats, timings, labels):
        for repeat in range(repeats + 1):  # the first pass compiles / warms up
            value = x
            position = 0
            for index, stage in enumerate(self.stages):
                for label, fn in stage.rows():
                    start = time.perf_counter()
                    value = fn(value)
                    _synchronize(value)
                    elapsed = time.perf_counter() - start
                    if repeat == 0:
                        labels.append((index, label))
                    else:
                        timings[position].append(elapsed)
                    position += 1

    # -- files --------------------------------------------------------------------------------
    def manifest(self):
        stages = []
        for index, stage in enumerate(self.stages):
            stages.append({"type": stage.kind, "config": stage.config(), "arrays": sorted(stage.arrays())})
        return {"name": self.name, "input_shape": list(self.input_shape), "stages": stages,
                "notes": self.notes, "source": self.source}

    def save(self, path, metadata=None):
        """Write the model to one ``.npz`` (format ``lowbit.packed``, see ``docs/packed_format.md``)."""
        arrays = {}
        for index, stage in enumerate(self.stages):
            for name, arr in stage.arrays().items():
                arrays[f"stages.{index}.{name}"] = arr
        meta = dict(self.metadata)
        meta.update(metadata or {})
        return write_archive(path, PACKED_FORMAT, arrays, {"model": self.manifest(), "metadata": meta})

    def __repr__(self):
        inner = ",\n  ".join(repr(stage) for stage in self.stages)
        return f"PackedModel(name={self.name!r}, stages=[\n  {inner}\n])"


def _all_stages(stages):
    """``stages`` and, depth first, the stages inside residual stages."""
    out = []
    for stage in stages:
        out.append(stage)
        if isinstance(stage, ResidualStage):
            out.extend(_all_stages(stage.inner_stages()))
    return out


def _synchronize(value):
    if is_cupy_array(value):
        from ..backend import cupy

        cupy.cuda.get_current_stream().synchronize()


def packed_from_manifest(doc, arrays, source="file"):
    """Build a :class:`PackedModel` from a manifest's ``model`` entry and the file's arrays.

    Raises :class:`~lowbit.io.ModelFileError` naming the stage and what is wrong.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
        raise ModelFileError(f"{source}: the manifest has no stage list")
    input_shape = doc.get("input_shape")
    if not isinstance(input_shape, list) or not all(isinstance(s, int) and s > 0 for s in input_shape):
        raise ModelFileError(f"{source}: input_shape must be a list of positive ints, got {input_shape!r}")
    stages, used = build_stages(doc["stages"], arrays, "stages.", source)
    unused = sorted(set(arrays) - used)
    if unused:
        raise ModelFileError(f"{source}: arrays {unused[:3]} belong to no stage")
    try:
        model = PackedModel(stages, input_shape, name=doc.get("name", "packed"), notes=doc.get("notes", []),
                            source=doc.get("source", {}))
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: the stages do not form a model: {exc}") from None
    return model


def load_packed(path):
    """Load a packed model saved by :meth:`PackedModel.save` onto the CPU.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ModelFileError
        Not a packed lowbit file (a trained model file is named as such), truncated, a checksum
        does not match, or the manifest's stages are inconsistent.
    """
    manifest, arrays = read_archive(path, PACKED_FORMAT)
    model = packed_from_manifest(manifest.get("model"), arrays, source=os.fspath(path))
    model.metadata = manifest.get("metadata", {}) if isinstance(manifest.get("metadata"), dict) else {}
    return model


def load_any(path):
    """Load a trained model (``lowbit.model``) or a packed model (``lowbit.packed``) by its format;
    an ``.onnx`` file is imported (:func:`lowbit.onnx_io.load_onnx`)."""
    from ..io import model_from_manifest
    from ..onnx_io import is_onnx_path

    if is_onnx_path(path):
        from ..onnx_io import load_onnx

        return load_onnx(path)

    manifest, arrays = read_archive(path, ("lowbit.model", PACKED_FORMAT))
    if manifest["format"] != PACKED_FORMAT:
        return model_from_manifest(manifest, arrays, path)
    model = packed_from_manifest(manifest.get("model"), arrays, source=os.fspath(path))
    model.metadata = manifest.get("metadata", {})
    return model
