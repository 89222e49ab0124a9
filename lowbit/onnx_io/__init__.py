"""ONNX import and export: bring a model trained elsewhere, and run lowbit's models elsewhere.

Import (:func:`load_onnx`, ``lowbit import model.onnx -o model.npz``)
----------------------------------------------------------------------
An ONNX graph with one float32 input (batch axis first, NCHW images) and one output becomes a
:class:`~lowbit.Model` of lowbit layers, which every command then treats as a model it trained
itself (evaluate, summarize, post-training quantization, QAT fine-tuning, export).  The ops are
those of MLPs, CNNs, ResNets and inception blocks as ``torch.onnx.export`` (opsets 13-18) and
tf2onnx write them; :data:`SUPPORTED_OPS` lists them.  How the graph is mapped:

* Initializers, ``Constant`` nodes and nodes whose inputs are all constant (``Shape`` of a tensor
  included: its batch entry reads 0, which ``Reshape`` copies) are folded with numpy, so weights
  stored as ``DequantizeLinear`` of integers, transposed, or cast come in as float32 arrays.
* Every other node has one tensor input (the rest constant) and becomes zero or more layers:
  ``Conv``/``Gemm``/``MatMul`` (+ ``Add`` of a bias, fused) -> ``Conv2D``/``Affine``; ``Sub``,
  ``Div``, ``Mul``, ``Add`` of a scalar -> ``Rescale``; ``Dropout`` -> ``Dropout``; ``Identity``
  -> nothing; an activation ``QuantizeLinear`` + ``DequantizeLinear`` pair -> ``FakeQuantize``;
  uneven pads -> ``Pad2D`` before the node.
* Branching: where a tensor feeds several nodes, the branches are followed to the ``Add`` or
  ``Concat`` (channels) that joins them all, and become a :class:`~lowbit.layers.Residual` (two
  branches, one of which may be the identity) or a :class:`~lowbit.layers.Concat` block; nesting
  is allowed.  A graph that does not decompose this way is refused with the node that breaks it.
* Any other op: :class:`OnnxImportError` naming the op, the node and :data:`SUPPORTED_OPS`.

Safety: the file is parsed by the onnx protobuf reader only (nothing in it is executed); tensors
stored outside the file (external data) are refused rather than opened; every tensor shape is
checked against :data:`MAX_ELEMENTS` / :data:`MAX_DIM` before anything is allocated.

Export (:func:`export_onnx`, ``lowbit export model.npz -o model.onnx``)
-----------------------------------------------------------------------
Standard operators only (default opset 13), so onnxruntime and other runtimes load the file:

* float layers: ``Conv``, ``Gemm``, ``Relu``, ``MaxPool``, ``AveragePool``, ``BatchNormalization``,
  ``Flatten``, ``Add`` (residual), ``Concat``; ``Rescale`` as ``Mul`` + ``Add``; ``Dropout`` omitted.
* k-bit weights (``UniformWeight``): int8 codes + per-channel ``DequantizeLinear``; DoReFa weights:
  uint8 codes + ``DequantizeLinear`` + ``Add(-1)``; fp16 weights: float16 + ``Cast``.
* k-bit activations (``DoReFaActivation``): ``Clip`` + ``QuantizeLinear`` + ``DequantizeLinear``
  (QCDQ, as Brevitas and torch export); the signed form shifts by ``max_value`` first.
* binary layers: +-1 (or +-alpha) float weights, and the BNN sign (``sign(0) = +1``) as
  ``Sign(Sign(x) + 0.5)``.
* a packed model (:class:`~lowbit.PackedModel`, e.g. the binary CNN): each stage in float32, with
  packed signs as +-1 and integer accumulators as exact float32 integers: binary products are
  ``Conv``/``MatMul`` on +-1, thresholds are ``GreaterOrEqual`` + ``Where``.

``onnx`` is an optional dependency (``pip install "lowbit[onnx]"``); onnxruntime is only used to
check exported files (tests, ``experiments/onnx_mnist.py``).
"""
from __future__ import annotations

from .common import (MAX_DIM, MAX_ELEMENTS, SUPPORTED_OPS, OnnxExportError, OnnxImportError, is_onnx_path,
                     onnx_module)
from .exporter import BATCHNORM_FORMS, export_onnx, model_to_onnx
from .importer import load_onnx, model_from_onnx

__all__ = ["OnnxImportError", "OnnxExportError", "SUPPORTED_OPS", "MAX_DIM", "MAX_ELEMENTS",
           "load_onnx", "model_from_onnx", "export_onnx", "model_to_onnx", "is_onnx_path", "BATCHNORM_FORMS",
           "onnx_module"]
