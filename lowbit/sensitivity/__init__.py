"""Per-layer sensitivity to quantization: which layers can lose their bits.

:class:`LayerwisePTQ` quantizes a trained float model layer by layer: every quantizable layer
(``Affine``/``Conv2D``, depth first, first and last included) gets its own weight width and its own
input-activation width, each of 1..8, 16 or 32 bits.  The weight and activation quantizers are
those of :func:`lowbit.ptq.post_training_quantize` (2..8-bit weights on a symmetric integer grid
over their least-squared-error range, 1-bit weights ``sign(W) * mean|W|`` per output unit with an
exact scale, 2..8-bit activations :class:`~lowbit.quantizers.DoReFaActivation` over their
least-squared-error range calibrated on training images, 16 bits float16, 32 bits none), so a
uniform assignment with the first and last kernels kept in float and an 8-bit image is exactly
``post_training_quantize``'s model (for 2..8-bit activations; checked by the tests).  The one
difference is a 1-bit *activation*: ``post_training_quantize`` removes every ReLU and takes the sign of
the pre-activation, which only works when every layer is binary; here a 1-bit input is
``DoReFaActivation(1)`` over its calibrated range ``m`` (``{0, m}`` after a ReLU, ``{-m, m}`` for a
signed input), so one layer can take 1-bit inputs while its neighbours do not.  The calibration runs
once (one pass of the float model over the calibration images, the same random sample of each
layer's inputs as ``post_training_quantize`` takes with the same ``seed``); the ranges and the clipped
weights of each width are computed once and cached.

:func:`measure_sensitivity` quantizes one layer at a time, its weights to each width (inputs float)
and its inputs to each width (weights float), the rest of the model float, and measures accuracy and
mean cross-entropy on held-out *training* images (never the test set): the drop in accuracy and the
increase in loss against the float model.  A layer at 32 bits is the float layer itself, so its
sensitivity is exactly 0.  When the quantizable layers sit at the top level of the model, the float
activations in front of each layer are computed once and only the rest of the network is rerun.

:func:`hessian_traces` estimates, per layer, the average trace of the loss Hessian with respect to
the layer's weights and with respect to its inputs by Hutchinson's method (Avron and Toledo 2011;
as HAWQ, Dong et al. 2019-2021, arXiv 1905.03696, 1911.03852, 2011.10680): ``E[v^T H v]`` over
Rademacher vectors ``v``, with ``H v`` a central difference of gradients (lowbit has no
double back-propagation).  One pair of passes perturbs every layer's weights and inputs at once; each
block's quadratic form is an unbiased estimate of that block's trace (the cross terms have mean 0).
:func:`hessian_scores` turns them into HAWQ's second-order estimate of the loss increase,
``0.5 * trace / n * ||Q(z) - z||^2`` (``z`` the weights or the inputs, ``n`` their count), and
:func:`rank_correlation` says how well that ranks against the measured increase.
"""
from __future__ import annotations

from ..deprecation import moved_names
from .hessian import hessian_scores, hessian_traces, rank_correlation
from .layerwise import KINDS, WIDTHS, LayerInfo, LayerwisePTQ, held_out_images, measure_sensitivity, quantizable_layers
from .report import draw_heatmap, read_sensitivity_csv, sensitivity_table, write_sensitivity_reports

__all__ = [
    "WIDTHS", "LayerInfo", "LayerwisePTQ", "quantizable_layers", "measure_sensitivity", "hessian_traces",
    "hessian_scores", "rank_correlation", "sensitivity_table", "write_sensitivity_reports",
    "read_sensitivity_csv", "held_out_images", "draw_heatmap",
]


# The command moved to the command-line layer (issue 23); the old name still works for a release.
__getattr__ = moved_names(__name__, {"sensitivity_command": "lowbit.cli.mixed"})
