"""The stages that run on bits or integer accumulators: binary dense and convolution layers, the
thresholds that turn accumulators into the next layer's bits, max-pooling, and the bit-plane first
layer."""
from __future__ import annotations

import numpy as np

from ..backend import to_device, to_numpy
from ..layers import PixelCodes
from .common import check_array, config_int, kernels_module, words_for, make_spec, spec_to_json
from .stages import Stage, stage_specs, register_stage

def _prepared_gemm(stage):
    """``prepare_gemm_weights`` of ``stage.weights`` (length ``stage.k``), made at the first run and
    anew when ``weights`` is replaced (``to_device`` included)."""
    if stage._prepared is None or stage._prepared[0] is not stage.weights:
        stage._prepared = (stage.weights, kernels_module().prepare_gemm_weights(stage.weights, stage.k))
    return stage._prepared[1]


def _repack(bits, k, shape_in, axes, k_out):
    """Unpack rows of ``bits`` (O, words(k)), reshape to ``shape_in``, transpose, pack the last axis."""
    kernels = kernels_module()
    values = kernels.unpack_signs(np.ascontiguousarray(bits), k, np.int8).reshape(shape_in)
    return kernels.pack_signs(np.ascontiguousarray(values.transpose(axes)))


@register_stage
class BinaryDenseStage(Stage):
    """``acc = sign(x) . sign(W)`` exactly, through ``xnor_gemm``.

    ``weights`` (held for the kernel) is uint64 ``(O, words)``.  For a dense input,
    ``words = ceil(K / 64)`` and the columns are the simulation's input features in order.  For a
    feature-map input (NHWC, which the simulation flattens NCHW), the weight rows are permuted to
    ``(h, w, c)`` order and packed per pixel with the activations' per-pixel word padding:
    ``words = H * W * ceil(C / 64)``.  The padding bits are 0 in both operands, so XNOR counts each
    as an agreement and ``acc = xnor_gemm(x, W, 64 * words) - (64 * words - K)``.

    The file stores the canonical form: ``pack_signs(W_eff.T)``, (O, ceil(K / 64)), columns in the
    simulation's feature order (1 bit per weight whatever the layout).
    """

    kind = "binary_dense"

    def __init__(self, input_spec, output_spec, weights, in_features):
        super().__init__(input_spec, output_spec)
        self.weights = weights
        self.in_features = int(in_features)
        if input_spec[1] == "dense":
            self.k = self.in_features
        else:
            self.k = 64 * weights.shape[1]
        self.padding_agreements = self.k - self.in_features
        self._prepared = None  # (the weights it was made from, PreparedGemmWeights)

    def run(self, x):
        x = x.reshape(x.shape[0], -1)
        acc = kernels_module().xnor_gemm(x, _prepared_gemm(self), self.k)
        if self.padding_agreements:
            acc -= np.int32(self.padding_agreements)
        return acc

    def fused_with(self, following):
        """A following threshold: ``xnor_gemm_threshold`` (the int32 products are thresholded in the
        micro-kernel's registers); the padding agreements of a feature-map input move into the
        thresholds (``acc - p >= t`` is ``acc >= t + p``, likewise ``<=``)."""
        if not isinstance(following, ThresholdStage):
            return None
        kernels = kernels_module()

        def dense_threshold(x):
            threshold = following.threshold
            if self.padding_agreements:
                threshold = threshold + self.padding_agreements
            return kernels.xnor_gemm_threshold(x.reshape(x.shape[0], -1), _prepared_gemm(self), self.k, threshold,
                                               following.direction)
        return dense_threshold

    def to_device(self, device):
        self.weights = to_device(self.weights, device)
        self._prepared = None
        return self

    def config(self):
        return {**super().config(), "in_features": self.in_features}

    def arrays(self):
        weights = to_numpy(self.weights)
        if self.input_spec[1] == "dense":
            return {"weights": weights}
        channels, height, width = self.input_spec[2]
        out = weights.shape[0]
        per_pixel = kernels_module().unpack_signs(
            weights.reshape(out, height, width, words_for(channels)), channels, np.int8)  # (O, H, W, C)
        canonical = np.ascontiguousarray(per_pixel.transpose(0, 3, 1, 2)).reshape(out, -1)
        return {"weights": kernels_module().pack_signs(canonical)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[0] != "packed" or output_spec[:2] != ("acc", "dense"):
            raise ValueError("a binary_dense stage maps packed to dense acc")
        in_features = config_int(config, "in_features", 1)
        dims = input_spec[2]
        if int(np.prod(dims)) != in_features:
            raise ValueError(f"in_features {in_features} does not match the input dims {dims}")
        out = output_spec[2][0]
        weights = check_array(arrays, "weights", np.uint64, (out, words_for(in_features)))
        if input_spec[1] != "dense":
            channels, height, width = dims
            weights = _repack(weights, in_features, (out, channels, height, width), (0, 2, 3, 1), channels)
            weights = weights.reshape(out, -1)
        else:
            # unpacking checks that the padding bits are 0
            kernels_module().unpack_signs(np.ascontiguousarray(weights), in_features, np.int8)
        return cls(input_spec, output_spec, np.ascontiguousarray(weights), in_features)


@register_stage
class BinaryConvStage(Stage):
    """``acc = conv(sign(x), sign(W))`` exactly (zero padding), through ``binary_conv2d``.

    ``weights`` (held for the kernel) is uint64 ``(O, KH, KW, ceil(C / 64))``.  The file stores the
    canonical form ``pack_signs(W_eff.reshape(O, C * KH * KW))`` (the simulation's order).  The
    first ``run`` prepares them (``prepare_conv_weights``: the kernel's panels and tap sums, made
    once instead of on every call); the preparation is made anew when ``weights`` is replaced
    (``to_device`` included).
    """

    kind = "binary_conv"

    def __init__(self, input_spec, output_spec, weights, stride, padding):
        super().__init__(input_spec, output_spec)
        self.weights = weights
        self.stride = int(stride)
        self.padding = int(padding)
        self._prepared = None  # (the weights it was made from, PreparedConvWeights)

    def _prepared_weights(self):
        if self._prepared is None or self._prepared[0] is not self.weights:
            self._prepared = (self.weights, kernels_module().prepare_conv_weights(self.weights, self.input_spec[2][0]))
        return self._prepared[1]

    def run(self, x):
        return kernels_module().binary_conv2d(x, self._prepared_weights(), None, self.stride, self.padding)

    def fused_with(self, following):
        """A following threshold: ``binary_conv2d_threshold`` (the int32 accumulators stay in cache);
        a following threshold + max-pool: the same, then ``maxpool_packed`` of the bits with the
        thresholds' directions (OR where the threshold is ``>=``, AND where it is ``<=``), which is
        the threshold of the pooled accumulators."""
        kernels = kernels_module()
        if isinstance(following, ThresholdStage):
            def conv_threshold(x):
                return kernels.binary_conv2d_threshold(x, self._prepared_weights(), following.threshold,
                                                       following.direction, None, self.stride, self.padding)
            return conv_threshold
        if isinstance(following, ThresholdMaxPoolStage):
            def conv_threshold_maxpool(x):
                bits = kernels.binary_conv2d_threshold(x, self._prepared_weights(), following.threshold,
                                                       following.direction, None, self.stride, self.padding)
                return kernels.maxpool_packed(bits, following.kernel, following.stride, following.padding,
                                              direction=following.direction)
            return conv_threshold_maxpool
        return None

    def to_device(self, device):
        self.weights = to_device(self.weights, device)
        self._prepared = None
        return self

    @property
    def kernel_size(self):
        return int(self.weights.shape[1])

    def config(self):
        return {**super().config(), "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding}

    def arrays(self):
        out, kh, kw, _ = self.weights.shape
        channels = self.input_spec[2][0]
        values = kernels_module().unpack_signs(np.ascontiguousarray(to_numpy(self.weights)), channels, np.int8)
        canonical = np.ascontiguousarray(values.transpose(0, 3, 1, 2)).reshape(out, -1)
        return {"weights": kernels_module().pack_signs(canonical)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[:2] != ("packed", "nhwc") or output_spec[:2] != ("acc", "nhwc"):
            raise ValueError("a binary_conv stage maps packed nhwc to nhwc acc")
        kernel = config_int(config, "kernel_size", 1)
        stride, padding = config_int(config, "stride", 1), config_int(config, "padding", 0)
        channels, height, width = input_spec[2]
        out = output_spec[2][0]
        fan_in = channels * kernel * kernel
        weights = check_array(arrays, "weights", np.uint64, (out, words_for(fan_in)))
        expected = (out,) + _pool_shape(input_spec[2], kernel, stride, padding)[1:]
        if output_spec[2] != expected:
            raise ValueError(f"the convolution gives dims {expected}, the stage says {output_spec[2]}")
        weights = _repack(weights, fan_in, (out, channels, kernel, kernel), (0, 2, 3, 1), channels)
        return cls(input_spec, output_spec, np.ascontiguousarray(weights), stride, padding)


def _pool_shape(dims, kernel, stride, padding):
    channels, height, width = dims
    return (channels, (height + 2 * padding - kernel) // stride + 1,
            (width + 2 * padding - kernel) // stride + 1)


class _PoolStage(Stage):
    domain = "acc"

    def __init__(self, input_spec, output_spec, kernel, stride, padding):
        super().__init__(input_spec, output_spec)
        self.kernel, self.stride, self.padding = int(kernel), int(stride), int(padding)

    def config(self):
        return {**super().config(), "kernel": self.kernel, "stride": self.stride, "padding": self.padding}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[:2] != (cls.domain, "nhwc") or output_spec[:2] != (cls.domain, "nhwc"):
            raise ValueError(f"a {cls.kind} stage maps {cls.domain} nhwc to {cls.domain} nhwc")
        kernel = config_int(config, "kernel", 1)
        stride, padding = config_int(config, "stride", 1), config_int(config, "padding", 0)
        if padding >= kernel:
            raise ValueError(f"padding {padding} must be smaller than the kernel {kernel}")
        expected = _pool_shape(input_spec[2], kernel, stride, padding)
        if output_spec[2] != expected:
            raise ValueError(f"pooling gives dims {expected}, the stage says {output_spec[2]}")
        return cls(input_spec, output_spec, kernel, stride, padding)


@register_stage
class IntMaxPoolStage(_PoolStage):
    """Max-pooling of int32 NHWC accumulators (padding ignored, as the simulation's -inf)."""

    kind = "int_maxpool"

    def run(self, acc):
        from ..kernels.pool import maxpool_int

        return maxpool_int(acc, self.kernel, self.stride, self.padding)


@register_stage
class PackedMaxPoolStage(_PoolStage):
    """Max-pooling of packed signs (bitwise OR), through ``maxpool_packed``."""

    kind = "packed_maxpool"
    domain = "packed"

    def run(self, x):
        return kernels_module().maxpool_packed(x, self.kernel, self.stride, self.padding)


@register_stage
class ThresholdStage(Stage):
    """Bit ``c`` = ``direction[c] * acc[..., c] >= direction[c] * threshold[c]`` (``threshold_pack``).

    The thresholds reproduce everything the simulation does between the accumulator and the next
    sign (bias, kernel scale, BatchNorm, ReLU, ..., the sign itself), derived by evaluating those
    layers on every possible accumulator value (:mod:`lowbit.convert`).  Thresholds lie in
    ``[-(K+1), K+1]`` (``K`` the fan-in): stored as int16 when that fits, else int32, directions as
    int8; held as int64 / int8 for the kernel.
    """

    kind = "threshold"
    _array_names = ("threshold", "direction")

    def __init__(self, input_spec, output_spec, threshold, direction):
        super().__init__(input_spec, output_spec)
        self.threshold = threshold
        self.direction = direction

    def run(self, acc):
        return kernels_module().threshold_pack(acc, self.threshold, self.direction)

    def arrays(self):
        threshold = to_numpy(self.threshold)
        narrow = np.int16 if threshold.size == 0 or int(np.abs(threshold).max()) < 2 ** 15 else np.int32
        return {"threshold": threshold.astype(narrow), "direction": to_numpy(self.direction)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[0] != "acc" or output_spec[0] != "packed":
            raise ValueError("a threshold stage maps acc to packed")
        if input_spec[1] == "dense" and output_spec[1] != "dense":
            raise ValueError("a threshold stage keeps a dense layout dense")
        if input_spec[1] == "nhwc" and output_spec[1] not in ("nhwc", "nhwc_flat"):
            raise ValueError("a threshold stage keeps a feature map a feature map")
        if input_spec[2] != output_spec[2]:
            raise ValueError(f"a threshold stage keeps the dims, got {input_spec[2]} -> {output_spec[2]}")
        channels = input_spec[2][0]
        threshold = arrays.get("threshold")
        if threshold is not None and threshold.dtype == np.int16:
            threshold = check_array(arrays, "threshold", np.int16, (channels,))
        else:
            threshold = check_array(arrays, "threshold", np.int32, (channels,))
        direction = check_array(arrays, "direction", np.int8, (channels,))
        if not np.all((direction == 1) | (direction == -1)):
            raise ValueError("array 'direction' must hold only +1 and -1")
        return cls(input_spec, output_spec, threshold.astype(np.int64), np.ascontiguousarray(direction))


@register_stage
class ThresholdMaxPoolStage(_PoolStage):
    """Max-pooling of int32 NHWC accumulators and a :class:`ThresholdStage` in one pass
    (``threshold_maxpool_pack``): acc ``(C, H, W)`` -> packed ``(C, OH, OW)``.

    Equal to an ``int_maxpool`` stage followed by a ``threshold`` stage (padding ignored, as the
    simulation's -inf); arrays as :class:`ThresholdStage`.
    """

    kind = "threshold_maxpool"
    _array_names = ("threshold", "direction")

    def __init__(self, input_spec, output_spec, kernel, stride, padding, threshold, direction):
        super().__init__(input_spec, output_spec, kernel, stride, padding)
        self.threshold = threshold
        self.direction = direction

    def run(self, acc):
        return kernels_module().threshold_maxpool_pack(acc, self.threshold, self.direction, self.kernel, self.stride,
                                                 self.padding)

    arrays = ThresholdStage.arrays

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[:2] != ("acc", "nhwc") or output_spec[:2] != ("packed", "nhwc"):
            raise ValueError("a threshold_maxpool stage maps acc nhwc to packed nhwc")
        pool = IntMaxPoolStage.from_parts(
            {**config, "output": spec_to_json(make_spec("acc", "nhwc", output_spec[2]))}, {})
        threshold = ThresholdStage.from_parts(
            {"input": spec_to_json(make_spec("acc", "nhwc", output_spec[2])), "output": config.get("output")},
            arrays)
        return cls(input_spec, output_spec, pool.kernel, pool.stride, pool.padding, threshold.threshold,
                   threshold.direction)


@register_stage
class BitplaneDenseStage(Stage):
    """A model's ``PixelCodes - [Flatten, Dropout] - binary dense - ... - sign`` start, exactly, on the codes.

    ``codes = rint(clip(x, 0, 1) * L)`` (``L = 2^bits - 1``) as :class:`~lowbit.layers.PixelCodes`
    computes them; ``T = xnor_gemm_bitplanes(pack_bitplanes(codes), weights)`` is the exact
    integer ``2 * codes . w - L * sum(w)``, of which the simulation's float32 layer output is exactly
    ``T / 2^bits``; the per-channel layers up to the next sign are a threshold on T
    (``threshold_pack``).  Arrays: ``weights`` uint64 ``(O, ceil(K/64))``, ``threshold`` int32,
    ``direction`` int8 ``(O,)``.
    """

    kind = "bitplane_dense"
    _array_names = ("weights", "threshold", "direction")

    def __init__(self, input_spec, output_spec, weights, in_features, bits, threshold, direction):
        super().__init__(input_spec, output_spec)
        self.weights = weights
        self.in_features = int(in_features)
        self.bits = int(bits)
        self.threshold = threshold
        self.direction = direction
        self._prepared = None

    def codes(self, x):
        """The pixel codes of ``x`` (N, ...) as (N, K) uint8 / uint16, from ``PixelCodes.codes``."""
        codes = PixelCodes.codes(x.reshape(x.shape[0], -1), self.bits)
        return codes.astype(np.uint8 if self.bits <= 8 else np.uint16)

    @property
    def k(self):
        return self.in_features

    def run(self, x):
        kernels = kernels_module()
        planes = kernels.pack_bitplanes(self.codes(x), self.bits)
        # the plane sums thresholded in the micro-kernel's registers (the two calls where it cannot)
        return kernels.xnor_gemm_bitplanes_threshold(planes, _prepared_gemm(self), self.in_features, self.threshold,
                                                     self.direction)

    def to_device(self, device):
        super().to_device(device)
        self._prepared = None
        return self

    def config(self):
        return {**super().config(), "in_features": self.in_features, "bits": self.bits}

    def arrays(self):
        return {"weights": to_numpy(self.weights), "threshold": to_numpy(self.threshold).astype(np.int32),
                "direction": to_numpy(self.direction)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[0] != "float" or output_spec[:2] != ("packed", "dense"):
            raise ValueError("a bitplane_dense stage maps float to packed dense")
        in_features, bits = config_int(config, "in_features", 1), config_int(config, "bits", 1)
        if bits > 16:
            raise ValueError(f"bits must be <= 16, got {bits}")
        if int(np.prod(input_spec[2])) != in_features:
            raise ValueError(f"in_features {in_features} does not match the input dims {input_spec[2]}")
        if not PixelCodes.sums_exact(bits, in_features):
            raise ValueError("(2^bits - 1) * in_features must be < 2^24 (exact float32 sums)")
        out = output_spec[2][0]
        weights = check_array(arrays, "weights", np.uint64, (out, words_for(in_features)))
        kernels_module().unpack_signs(np.ascontiguousarray(weights), in_features, np.int8)  # padding bits 0
        threshold = check_array(arrays, "threshold", np.int32, (out,))
        direction = check_array(arrays, "direction", np.int8, (out,))
        if not np.all((direction == 1) | (direction == -1)):
            raise ValueError("array 'direction' must hold only +1 and -1")
        return cls(input_spec, output_spec, weights, in_features, bits, threshold.astype(np.int64),
                   np.ascontiguousarray(direction))
