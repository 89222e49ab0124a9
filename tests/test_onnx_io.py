"""ONNX import and export (lowbit.onnx_io): real torch.onnx.export models, one onnx-helper graph per
supported op (checked against onnxruntime), unsupported ops and hostile files, export of float,
k-bit, binary and packed models, and round trips."""
import io
import math
import os

import numpy as np
import pytest

import lowbit
from lowbit.layers import (
    Affine, BatchNorm, Concat, Conv2D, Flatten, GlobalAvgPool2D, MaxPool2D, ReLU, Rescale, Residual,
)
from lowbit.model import Model
from lowbit.onnx_io import SUPPORTED_OPS, OnnxImportError, load_onnx, model_to_onnx
from lowbit.quant_layers import QuantActivation, QuantConv2D

from gradcheck import check_layer_gradients
from test_experiments import fake_mnist, script  # noqa: F401  (fixtures)

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'lowbit[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (dev extra)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

RNG = np.random.default_rng(0)
# torch 2.13 warns that its TorchScript exporter (the one that needs no onnxscript) is the legacy one
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_ort(proto_or_path, x, float_qdq=True):
    """onnxruntime's output; ``float_qdq`` turns off its integer QDQ fusions (which re-quantize float
    weights next to QuantizeLinear nodes), so it computes the graph's own float semantics."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if float_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    model = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def save(proto, tmp_path, name="model.onnx"):
    path = os.path.join(tmp_path, name)
    onnx.save(proto, path)
    return path


def graph(nodes, in_shape, out_shape, inits=(), opset=13):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])]
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()]
    g = helper.make_graph(nodes, "test", inputs, outputs, tensors)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def check_against_ort(proto, tmp_path, in_shape, atol=1e-5, n=4):
    x = RNG.random((n, *in_shape), dtype=np.float32)
    model = load_onnx(save(proto, tmp_path))
    ours = model.forward(x, train=False)
    theirs = run_ort(proto, x)
    np.testing.assert_allclose(ours, theirs.reshape(ours.shape), atol=atol, rtol=1e-5)
    assert ours.shape[1:] == theirs.shape[1:] or math.prod(ours.shape) == math.prod(theirs.shape)
    return model


# -- one graph per supported op ------------------------------------------------------------------------
def _conv(**attrs):
    return [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], {"w": f32(4, 3, 3, 3), "b": f32(4)}


OP_GRAPHS = {
    # name: (nodes, initializers, input shape, output shape)
    "Gemm": ([helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.5, beta=2.0)],
             {"w": f32(5, 6), "b": f32(5)}, (6,), (5,)),
    "MatMul+Add": ([helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
                   {"w": f32(6, 5), "b": f32(5)}, (6,), (5,)),
    "Conv": (*_conv(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), (3, 6, 6), (4, 6, 6)),
    "Conv-stride-uneven-pads": (*_conv(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]), (3, 7, 7),
                                (4, 3, 3)),
    "Conv-same-upper": (*_conv(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), (3, 6, 6),
                        (4, 3, 3)),
    "Relu": ([helper.make_node("Relu", ["x"], ["y"])], {}, (3, 4), (3, 4)),
    "LeakyRelu": ([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2)], {}, (5,), (5,)),
    "Sigmoid": ([helper.make_node("Sigmoid", ["x"], ["y"])], {}, (5,), (5,)),
    "Tanh": ([helper.make_node("Tanh", ["x"], ["y"])], {}, (5,), (5,)),
    "Clip": ([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
             {"lo": np.float32(0.2), "hi": np.float32(0.6)}, (5,), (5,)),
    "MaxPool": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1])], {}, (2, 6, 6), (2, 3, 3)),
    "MaxPool-uneven": ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                         pads=[0, 0, 1, 1])], {}, (2, 5, 5), (2, 3, 3)),
    "AveragePool": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])],
                    {}, (2, 6, 6), (2, 3, 3)),
    "AveragePool-pads": ([helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                           count_include_pad=1)], {}, (2, 4, 4), (2, 4, 4)),
    "GlobalAveragePool+Flatten": ([helper.make_node("GlobalAveragePool", ["x"], ["t"]),
                                   helper.make_node("Flatten", ["t"], ["y"])], {}, (3, 5, 5), (3,)),
    "BatchNormalization": ([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"],
                                             epsilon=1e-3)],
                           {"g": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.1}, (3, 4, 4),
                           (3, 4, 4)),
    "BatchNormalization-2d": ([helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"])],
                              {"g": f32(5), "b": f32(5), "m": f32(5), "v": np.abs(f32(5)) + 0.1}, (5,), (5,)),
    "Flatten": ([helper.make_node("Flatten", ["x"], ["y"])], {}, (2, 3, 3), (18,)),
    "Reshape-shape-gather": ([helper.make_node("Shape", ["x"], ["s"]),
                              helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
                              helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
                              helper.make_node("Concat", ["n1", "minus"], ["shape"], axis=0),
                              helper.make_node("Reshape", ["x", "shape"], ["y"])],
                             {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
                              "minus": np.array([-1], np.int64)}, (2, 3, 3), (18,)),
    "Reshape-constant": ([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                         {"shape": np.array([-1, 18], np.int64)}, (2, 3, 3), (18,)),
    "Add-residual": ([helper.make_node("Conv", ["x", "w"], ["t"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", ["t"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])],
                     {"w": f32(3, 3, 3, 3)}, (3, 5, 5), (3, 5, 5)),
    "Add-projection": ([helper.make_node("Conv", ["x", "w"], ["t"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                        helper.make_node("Conv", ["x", "p"], ["s"], kernel_shape=[1, 1]),
                        helper.make_node("Add", ["t", "s"], ["y"])],
                       {"w": f32(4, 3, 3, 3), "p": f32(4, 3, 1, 1)}, (3, 5, 5), (4, 5, 5)),
    "Concat": ([helper.make_node("Conv", ["x", "w"], ["a"], kernel_shape=[1, 1]),
                helper.make_node("MaxPool", ["x"], ["b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                helper.make_node("Concat", ["a", "b", "x"], ["y"], axis=1)],
               {"w": f32(2, 3, 1, 1)}, (3, 4, 4), (8, 4, 4)),
    "Dropout+Identity": ([helper.make_node("Dropout", ["x"], ["t"]), helper.make_node("Identity", ["t"], ["y"])],
                         {}, (5,), (5,)),
    "Softmax": ([helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}, (5,), (5,)),
    "LogSoftmax": ([helper.make_node("LogSoftmax", ["x"], ["y"])], {}, (5,), (5,)),
    "Constant+Sub+Div+Mul": ([helper.make_node("Constant", [], ["mean"], value_float=0.1307),
                              helper.make_node("Sub", ["x", "mean"], ["a"]),
                              helper.make_node("Div", ["a", "std"], ["b"]),
                              helper.make_node("Mul", ["b", "two"], ["y"])],
                             {"std": np.float32(0.3081), "two": np.float32(2.0)}, (1, 4, 4), (1, 4, 4)),
    "per-channel-normalisation": ([helper.make_node("Sub", ["x", "mean"], ["a"]),
                                   helper.make_node("Div", ["a", "std"], ["y"])],
                                  {"mean": f32(1, 3, 1, 1), "std": np.abs(f32(3, 1, 1)) + 0.5}, (3, 2, 2),
                                  (3, 2, 2)),
    "Pad": ([helper.make_node("Pad", ["x", "pads", "value"], ["y"])],
            {"pads": np.array([0, 0, 1, 2, 0, 0, 0, 1], np.int64), "value": np.float32(0.5)}, (2, 3, 3),
            (2, 4, 6)),
    "GreaterOrEqual+Where+Round": ([helper.make_node("Round", ["x"], ["r"]),
                                    helper.make_node("GreaterOrEqual", ["r", "t"], ["m"]),
                                    helper.make_node("Where", ["m", "hi", "lo"], ["y"])],
                                   {"t": np.array([0.5, 1.5, -0.5], np.float32).reshape(3, 1, 1),
                                    "hi": np.float32(2.0), "lo": np.float32(-3.0)}, (3, 2, 2), (3, 2, 2)),
    "Sign+Neg": ([helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Sign", ["t"], ["y"])], {}, (5,), (5,)),
    "QuantizeLinear+DequantizeLinear": ([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("Clip", ["q", "qlo", "qhi"], ["c"]),
        helper.make_node("DequantizeLinear", ["c", "s", "z"], ["d"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
        helper.make_node("Conv", ["d", "w"], ["y"], kernel_shape=[3, 3])],
        {"s": np.float32(1 / 15), "z": np.uint8(0), "qlo": np.uint8(0), "qhi": np.uint8(15),
         "wq": RNG.integers(-7, 8, (2, 3, 3, 3)).astype(np.int8), "ws": np.abs(f32(2)) / 7,
         "wz": np.zeros(2, np.int8)}, (3, 4, 4), (2, 2, 2)),
    "Transpose+Cast-of-weights+Squeeze": ([
        helper.make_node("Transpose", ["w16"], ["wt"], perm=[1, 0]),
        helper.make_node("Cast", ["wt"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "k"], ["c"], kernel_shape=[4, 4]),
        helper.make_node("Squeeze", ["c", "axes"], ["s"]),
        helper.make_node("MatMul", ["s", "w"], ["y"])],
        {"w16": f32(5, 3).astype(np.float16), "k": f32(3, 2, 4, 4), "axes": np.array([2, 3], np.int64)},
        (2, 4, 4), (5,)),
}


def test_every_supported_op_has_a_graph():
    covered = {n.op_type for nodes, *_ in OP_GRAPHS.values() for n in nodes}
    assert set(SUPPORTED_OPS) <= covered, sorted(set(SUPPORTED_OPS) - covered)


@pytest.mark.parametrize("name", sorted(OP_GRAPHS))
def test_op_graph_matches_onnxruntime(name, tmp_path):
    nodes, inits, in_shape, out_shape = OP_GRAPHS[name]
    proto = graph(nodes, in_shape, out_shape, inits)
    onnx.checker.check_model(proto)
    model = check_against_ort(proto, str(tmp_path), in_shape)
    # the imported model saves, loads and exports again with the same outputs
    path = os.path.join(str(tmp_path), "m.npz")
    lowbit.save_model(model, path)
    again = lowbit.load_model(path)
    x = RNG.random((3, *in_shape), dtype=np.float32)
    np.testing.assert_array_equal(again.forward(x), model.forward(x))
    np.testing.assert_allclose(run_ort(model_to_onnx(again), x).reshape(-1),
                               model.forward(x).reshape(-1), atol=1e-5, rtol=1e-5)


def test_branches_become_blocks(tmp_path):
    nodes, inits, in_shape, out_shape = OP_GRAPHS["Add-residual"]
    model = load_onnx(save(graph(nodes, in_shape, out_shape, inits), str(tmp_path)))
    assert isinstance(model.layers[0], Residual) and model.layers[0].shortcut is None
    nodes, inits, in_shape, out_shape = OP_GRAPHS["Concat"]
    model = load_onnx(save(graph(nodes, in_shape, out_shape, inits), str(tmp_path)))
    assert isinstance(model.layers[0], Concat) and len(model.layers[0].branches) == 3


# -- refused graphs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes, inits, shapes, message", [
    ([helper.make_node("Erf", ["x"], ["y"], name="my_erf")], {}, ((5,), (5,)), "'Erf'"),
    ([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], group=3)], {"w": f32(3, 1, 3, 3)},
     ((3, 5, 5), (3, 3, 3)), "group"),
    ([helper.make_node("Concat", ["x", "x"], ["y"], axis=2)], {}, ((3, 2, 2), (3, 4, 2)), "channel axis"),
    ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "x"], ["y"])], {},
     ((4,), (4,)), "one tensor input"),
    ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]),
      helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Add", ["c", "a"], ["y"])], {},
     ((4,), (4,)), "branch"),
    ([helper.make_node("Reshape", ["x", "s"], ["y"])], {"s": np.array([-1, 3, 6], np.int64)},
     ((2, 3, 3), (3, 6)), "flattening"),
    ([helper.make_node("Mul", ["x", "m"], ["y"])], {"m": f32(2, 3)}, ((2, 3), (2, 3)), "per channel"),
])
def test_unsupported_graph_is_refused_clearly(nodes, inits, shapes, message, tmp_path):
    path = save(graph(nodes, *shapes, inits), str(tmp_path))
    with pytest.raises(OnnxImportError, match=message) as info:
        load_onnx(path)
    assert "node" in str(info.value) or "branches" in str(info.value)


def test_unsupported_op_names_op_node_and_supported_list(tmp_path):
    path = save(graph([helper.make_node("Resize", ["x"], ["y"], name="upsample1")], (3, 4, 4), (3, 8, 8)),
                str(tmp_path))
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    text = str(info.value)
    assert "'Resize'" in text and "upsample1" in text and "Conv, " in text and "Gemm" in text


def test_custom_domain_is_refused(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"], domain="com.example")
    proto = graph([node], (4,), (4,))
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(OnnxImportError, match="com.example"):
        load_onnx(save(proto, str(tmp_path)))


def test_hostile_files(tmp_path):
    folder = str(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_onnx(os.path.join(folder, "missing.onnx"))
    junk = os.path.join(folder, "junk.onnx")
    with open(junk, "wb") as fh:
        fh.write(b"\x08\x07not a protobuf at all\xff\xff\xff")
    with pytest.raises(OnnxImportError):
        load_onnx(junk)
    # external data: refused, the named file is never opened
    w = numpy_helper.from_array(f32(4, 4), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="/etc/passwd")
    proto = graph([helper.make_node("MatMul", ["x", "w"], ["y"])], (4,), (4,))
    proto.graph.initializer.append(w)
    with pytest.raises(OnnxImportError, match="external data"):
        load_onnx(save(proto, folder, "external.onnx"))
    # absurd declared shapes
    big = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 30, 1 << 30])
    proto = graph([helper.make_node("MatMul", ["x", "w"], ["y"])], (4,), (4,))
    proto.graph.initializer.append(big)
    with pytest.raises(OnnxImportError, match="absurd"):
        load_onnx(save(proto, folder, "big.onnx"))
    proto = graph([helper.make_node("Relu", ["x"], ["y"])], (1 << 21,), (1 << 21,))
    with pytest.raises(OnnxImportError, match="absurd"):
        load_onnx(save(proto, folder, "wide.onnx"))


# -- torch.onnx.export models ---------------------------------------------------------------------------
torch = None
try:
    import torch
    import torch.nn as nn
except ImportError:  # pragma: no cover - torch is in the bench extra
    pass

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (bench extra)")


def _torch_models():
    class ResidualBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + x)

    class ResNetish(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.block = ResidualBlock()
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            x = self.block(torch.relu(self.stem(x)))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 3, 1)
            self.b = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1))
            self.c = nn.MaxPool2d(3, 1, 1)
            self.head = nn.Linear(7 * 14 * 14, 10)

        def forward(self, x):
            x = nn.functional.avg_pool2d(x, 2)
            y = torch.cat([self.a(x), self.b(x), self.c(x)], 1)
            return self.head(torch.relu(y).reshape(y.shape[0], -1))

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 8, 3, stride=2), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    return {"mlp": mlp, "cnn_bn": cnn, "residual": ResNetish(), "concat": Inception()}


@needs_torch
@pytest.mark.parametrize("kind", ["mlp", "cnn_bn", "residual", "concat"])
@pytest.mark.parametrize("opset", [13, 18])
def test_torch_exported_model(kind, opset, tmp_path):
    torch.manual_seed(0)
    net = _torch_models()[kind]
    for module in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    net.eval()
    x = torch.rand(6, 1, 28, 28)
    buffer = io.BytesIO()
    # do_constant_folding=False keeps the BatchNormalization nodes (folding merges them into Conv)
    torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, do_constant_folding=(kind != "cnn_bn"))
    path = os.path.join(str(tmp_path), f"{kind}.onnx")
    with open(path, "wb") as fh:
        fh.write(buffer.getvalue())
    ops = {n.op_type for n in onnx.load(path).graph.node}
    if kind == "cnn_bn":
        assert "BatchNormalization" in ops
    model = load_onnx(path)
    with torch.no_grad():
        expected = net(x).numpy()
    ours = model.predict_scores(x.numpy())
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours, run_ort(path, x.numpy()), atol=1e-4, rtol=1e-4)
    if kind == "residual":
        assert any(isinstance(layer, Residual) for layer in model.layers)
    if kind == "concat":
        assert any(isinstance(layer, Concat) for layer in model.layers)


# -- export ----------------------------------------------------------------------------------------------
def _float_cnn(seed=0):
    model = Model([Rescale(2.0, -1.0), Conv2D(1, 4, 3, padding=1, seed=seed), BatchNorm(4), ReLU(), MaxPool2D(2),
                   Residual([Conv2D(4, 4, 3, padding=1, seed=seed + 1), ReLU()]),
                   Concat([[Conv2D(4, 2, 1, seed=seed + 2)], [MaxPool2D(3, 1, 1)]]),
                   GlobalAvgPool2D(), Affine(6, 10, seed=seed + 3)], input_shape=(1, 8, 8), name="tiny")
    bn = model.layers[2]
    bn.running_mean = f32(4, scale=0.1)
    bn.running_var = np.abs(f32(4)) + 0.5
    bn.gamma = np.abs(f32(4)) + 0.5
    return model


def _images(n=64, shape=(1, 8, 8)):
    return RNG.random((n, *shape), dtype=np.float32)


@pytest.mark.parametrize("batchnorm", ["folded", "op"])
def test_export_float_model_and_round_trip(batchnorm, tmp_path):
    model = _float_cnn()
    x = _images()
    path = lowbit.export_onnx(model, os.path.join(str(tmp_path), "m.onnx"), batchnorm=batchnorm)
    expected = model.predict_scores(x)
    np.testing.assert_allclose(run_ort(path, x), expected, atol=1e-5, rtol=1e-5)
    again = load_onnx(path)
    np.testing.assert_allclose(again.predict_scores(x), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(again.predict(x), model.predict(x))


@pytest.mark.parametrize("bits", [(4, 4), (2, 2), (8, 8), (16, 16), (1, 32)])
def test_export_ptq_model(bits, tmp_path):
    model = _float_cnn()
    x = _images(128)
    twin = lowbit.post_training_quantize(model, *bits, calibration_images=_images(64), keep_first=False)
    path = lowbit.export_onnx(twin, os.path.join(str(tmp_path), "q.onnx"))
    ops = {n.op_type for n in onnx.load(path).graph.node}
    if bits[0] in (2, 4, 8):
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    expected = twin.predict_scores(x)
    np.testing.assert_allclose(run_ort(path, x), expected, atol=1e-4, rtol=1e-4)
    again = load_onnx(path)
    np.testing.assert_array_equal(again.predict(x), twin.predict(x))


def _binary_model(seed=0):
    sign = {"name": "ste_sign"}
    model = Model([
        Conv2D(1, 8, 3, padding=1, bias=False, seed=seed), BatchNorm(8), QuantActivation("ste_sign"),
        QuantConv2D(8, 16, 3, padding=1, bias=False, input_quantizer=None, kernel_quantizer=sign, seed=seed + 1),
        MaxPool2D(2), BatchNorm(16), QuantActivation("ste_sign"), Flatten(),
        lowbit.quant_layers.QuantAffine(16 * 16, 10, bias=False, kernel_quantizer=sign, seed=seed + 2),
        BatchNorm(10)], input_shape=(1, 8, 8), name="binary")
    for layer in model.layers:
        if isinstance(layer, BatchNorm):
            layer.running_mean = f32(layer.num_features, scale=0.5)
            layer.running_var = np.abs(f32(layer.num_features)) * 4 + 1
    return model


def test_export_binary_and_packed_models(tmp_path):
    model = _binary_model()
    x = _images(200)
    packed = lowbit.convert(model)
    assert any(stage.kind == "binary_conv" for stage in packed.stages)
    sim = model.predict_scores(x)
    for name, m in (("sim", model), ("packed", packed)):
        proto = model_to_onnx(m)
        ops = {n.op_type for n in proto.graph.node}
        assert "Sign" in ops if name == "sim" else "GreaterOrEqual" in ops
        ours = run_ort(proto, x)
        np.testing.assert_array_equal(ours.argmax(1), sim.argmax(1))
        np.testing.assert_allclose(ours, sim, atol=1e-4, rtol=1e-4)
    weights = [numpy_helper.to_array(t) for t in model_to_onnx(model).graph.initializer if t.dims and
               len(t.dims) == 4 and t.dims[0] == 16]
    assert weights and np.all(np.abs(weights[0]) == 1)  # +-1 binary kernel
    again = load_onnx(save(model_to_onnx(model), str(tmp_path)))
    np.testing.assert_array_equal(again.predict_scores(x), sim)
    again = load_onnx(save(model_to_onnx(packed), str(tmp_path), "packed.onnx"))
    np.testing.assert_array_equal(again.predict_scores(x), packed.predict_scores(x))


def test_bnn_sign_of_zero_is_plus_one():
    model = Model([QuantActivation("ste_sign")], input_shape=(4,))
    x = np.array([[0.0, -0.0, -1e-30, 2.0]], np.float32)
    np.testing.assert_array_equal(run_ort(model_to_onnx(model), x), model.forward(x))


# -- commands ---------------------------------------------------------------------------------------------
def test_cli_import_export_and_onnx_everywhere(tmp_path, capsys):
    from lowbit.cli import main

    folder = str(tmp_path)
    model = _float_cnn()
    npz = os.path.join(folder, "m.npz")
    lowbit.save_model(model, npz)
    onnx_path = os.path.join(folder, "m.onnx")
    assert main(["export", npz, "-o", onnx_path]) == 0
    back = os.path.join(folder, "back.npz")
    assert main(["import", onnx_path, "-o", back]) == 0
    x = _images()
    np.testing.assert_allclose(lowbit.load_model(back).predict_scores(x), model.predict_scores(x), atol=1e-5)
    assert isinstance(lowbit.load_any(onnx_path), Model)
    assert main(["summary", onnx_path]) == 0
    assert "Conv2D" in capsys.readouterr().out
    assert main(["import", os.path.join(folder, "nothing.onnx"), "-o", back]) == 2


# -- the new layers' gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: lowbit.onnx_layers.LeakyReLU(0.1), lambda: lowbit.onnx_layers.Sigmoid(),
    lambda: lowbit.onnx_layers.Tanh(), lambda: lowbit.onnx_layers.Clip(-0.5, 0.5),
    lambda: lowbit.onnx_layers.Softmax(), lambda: lowbit.onnx_layers.LogSoftmax(),
    lambda: lowbit.onnx_layers.Pad2D((1, 0, 2, 1)),
])
def test_new_layer_gradients(make):
    layer = make()
    shape = (3, 2, 3, 3) if isinstance(layer, lowbit.onnx_layers.Pad2D) else (3, 5)
    x = RNG.standard_normal(shape) * 0.9 + 0.05  # away from the kinks at 0 and +-0.5 (mostly)
    if isinstance(layer, (lowbit.onnx_layers.LeakyReLU, lowbit.onnx_layers.Clip)):
        x = np.where(np.abs(np.abs(x) - 0.5) < 0.05, x + 0.2, x)
        x = np.where(np.abs(x) < 0.05, x + 0.1, x)
    check_layer_gradients(layer, x)


def test_channel_op_gradients():
    for op in lowbit.onnx_layers.ChannelOp.OPS:
        layer = lowbit.onnx_layers.ChannelOp(op, 3)
        layer.value = np.array([0.5, 2.0, -1.5])
        check_layer_gradients(layer, RNG.standard_normal((2, 3, 2, 2)))


def test_sweep_from_an_imported_onnx_model(tmp_path):
    """``sweep --pretrained model.onnx --methods ptq qat --qat-init ptq``: PTQ and QAT fine-tuning start
    from the imported weights (the ONNX model may carry any name; --arch then picks the recipe)."""
    from test_sweep import DATA

    from lowbit import sweep
    from lowbit.data import float_images

    model = sweep.float_model("tfc", seed=3)
    model.name = "my_torch_mlp"
    path = os.path.join(str(tmp_path), "mine.onnx")
    lowbit.export_onnx(model, path, batchnorm="op")
    imported = load_onnx(path)
    x_test = float_images(DATA.x_test[:300])
    np.testing.assert_array_equal(imported.predict(x_test), model.predict(x_test))
    result = sweep.run_sweep("tfc", out_dir=str(tmp_path / "sweep"), quick=True, data=DATA, methods=("ptq", "qat"),
                             weight_bits=(2, 32), act_bits=(32,), pretrained=path, qat_init="ptq", progress=False)
    points = {(r["method"], r["weight_bits"]): r for r in result.records}
    assert points[("ptq", 32)]["accuracy"] == model.evaluate(x_test, DATA.y_test[:300])
    assert "mine.onnx" in points[("ptq", 2)]["source"] and "fine-tuning" in points[("qat", 2)]["source"]


@needs_torch
@pytest.mark.slow
def test_onnx_mnist_experiment_smoke_run(script, tmp_path):
    """experiments/onnx_mnist.py end to end on the fabricated MNIST of test_experiments (smoke file names)."""
    argv = ["--epochs", "1", "--train-limit", "200", "--limit", "50", "--work", str(tmp_path / "work"),
            "--results", str(tmp_path / "results"), "--models", str(tmp_path / "models"), "--quiet"]
    result = script("onnx_mnist").main(argv)
    assert os.path.exists(tmp_path / "results" / "onnx" / "onnx_mnist_smoke.json")
    for row in result["import"].values():
        assert row["lowbit_vs_onnxruntime"]["labels_equal"] == 50
        assert row["lowbit_vs_onnxruntime"]["max_abs_diff"] < 1e-4
    for row in result["export"].values():
        assert row["onnxruntime"]["labels_equal"] == 50
        assert row.get("round_trip", {"labels_equal": 50})["labels_equal"] == 50
