"""The quantizer encoding protocol (``Quantizer.packed_encoding``): every registered quantizer says
what its output is, the encoding agrees with its forward, and a quantizer defined only here (in this
file, registered by name) converts and summarizes without any change to lowbit."""
import numpy as np
import pytest

from lowbit.convert import convert
from lowbit.layers import BatchNorm, Flatten
from lowbit.model import Model
from lowbit.packed import BinaryDenseStage, PackStage, ThresholdStage
from lowbit.quant_layers import QuantActivation, QuantAffine
from lowbit.quantizers import QUANTIZERS, PackedEncoding, Quantizer, get_quantizer
from lowbit.functions import sign, ste_grad
from lowbit.summary import summarize


# -- every registered quantizer -----------------------------------------------------------------------
def registered():
    """One instance of every registered quantizer, at each of its settings that changes the encoding."""
    out = []
    for name, cls in QUANTIZERS.items():
        if name == "ste_sign":
            out += [cls(), cls(scale="tensor"), cls(scale="channel")]
        elif name == "stochastic_binary":
            out += [cls(seed=0), cls(deterministic_eval=False, seed=0)]
        elif name == "dorefa_activation":
            out += [cls(2), cls(3, signed=True, max_value=2.5)]
        elif name in ("dorefa_weight", "uniform_weight"):
            out += [cls(3)]
        else:
            out.append(cls())
    return out


@pytest.mark.parametrize("quantizer", registered(), ids=repr)
def test_every_quantizer_describes_its_output(quantizer):
    encoding = quantizer.packed_encoding()
    assert isinstance(encoding, PackedEncoding)
    assert encoding.bits == quantizer.precision
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    x[0, :2] = 0.0
    q = np.asarray(quantizer(x, train=False, channel_axis=1))
    if encoding.passthrough:
        np.testing.assert_array_equal(q, x)
    if encoding.sign:
        np.testing.assert_array_equal(q, np.where(x >= 0, 1.0, -1.0).astype(np.float32))
    if encoding.levels is not None and encoding.deterministic:
        units = q.T if encoding.scale == "channel" else [q]  # channel_axis=1: the columns
        assert max(len(np.unique(unit)) for unit in units) <= encoding.levels
    if not encoding.signed:
        assert np.all(q >= 0)
    if encoding.max_value is not None:
        assert np.all(np.abs(q) <= encoding.max_value)
    assert encoding.codes == (hasattr(quantizer, "codes") and hasattr(quantizer, "from_codes"))


def test_a_quantizer_that_does_not_describe_itself_says_so():
    class Silent(Quantizer):
        name = "silent"

    with pytest.raises(NotImplementedError, match="Silent does not describe its packed encoding"):
        Silent().packed_encoding()


def test_encoding_checks_its_fields():
    with pytest.raises(ValueError, match="bits must be an int in 1..32, got 0"):
        PackedEncoding(0)
    with pytest.raises(ValueError, match="scale must be None"):
        PackedEncoding(4, scale="row")
    with pytest.raises(ValueError, match="sign=True means an unscaled, deterministic 1-bit output"):
        PackedEncoding(2, sign=True)
    with pytest.raises(ValueError, match="passthrough encoding is neither"):
        PackedEncoding(32, passthrough=True, codes=True)


# -- quantizers defined only in this file ---------------------------------------------------------------
class SignSwish(Quantizer):
    """SignSwish (Darabi et al. 2018, arXiv 1812.11800): forward ``sign(x)``; pseudo-gradient the
    derivative of ``2 sigmoid(b x) (1 + b x (1 - sigmoid(b x))) - 1``."""

    name = "sign_swish_test"
    precision = 1

    def __init__(self, beta=5.0):
        self.beta = float(beta)

    def config(self):
        return {"name": self.name, "beta": self.beta}

    def forward(self, x, train=False, channel_axis=None):
        return sign(x, type(self).__name__)

    def backward(self, x, dout, channel_axis=None):
        s = 1 / (1 + np.exp(-self.beta * x))
        return dout * self.beta * s * (1 - s) * (2 + self.beta * x * (1 - 2 * s))

    def packed_encoding(self):
        return PackedEncoding(1, levels=2, sign=True)


class HalfSign(Quantizer):
    """``0.5 * sign(x)``, a binary kernel on a fixed scale: straight-through gradient."""

    name = "half_sign_test"
    precision = 1

    def forward(self, x, train=False, channel_axis=None):
        return sign(x, type(self).__name__) * x.dtype.type(0.5)

    def backward(self, x, dout, channel_axis=None):
        return ste_grad(x, dout, 1.0) * 0.5

    def packed_encoding(self):
        return PackedEncoding(1, levels=2)  # +-0.5: one bit, but not the sign itself


class Ternary(Quantizer):
    """Inputs rounded to {-1, 0, 1} (2 bits, not a sign): the converter keeps them in float."""

    name = "ternary_test"
    precision = 2

    def forward(self, x, train=False, channel_axis=None):
        return np.clip(np.rint(x), -1, 1).astype(x.dtype)

    def backward(self, x, dout, channel_axis=None):
        return dout * (np.abs(x) <= 1)

    def packed_encoding(self):
        return PackedEncoding(2, levels=3)


class RandomSign(SignSwish):
    """A sign that stays random at evaluation: no packed model can reproduce it."""

    name = "random_sign_test"

    def packed_encoding(self):
        return PackedEncoding(1, levels=2, deterministic=False)


@pytest.fixture
def register(monkeypatch):
    """The test quantizers in the registry (models are copied through their spec, by name)."""
    for cls in (SignSwish, HalfSign, Ternary, RandomSign):
        monkeypatch.setitem(QUANTIZERS, cls.name, cls)


def model_with(activation, kernel, last_input):
    return Model([
        Flatten(),
        QuantAffine(16, 8, bias=False, kernel_quantizer=kernel, seed=0),
        BatchNorm(8),
        QuantActivation(activation),
        QuantAffine(8, 6, bias=False, kernel_quantizer=kernel, seed=1),
        BatchNorm(6),
        QuantAffine(6, 4, bias=True, input_quantizer=last_input, seed=2),
    ], input_shape=(1, 4, 4), name="new_quantizers")


def images(n=50):
    return np.random.default_rng(3).random((n, 1, 4, 4), dtype=np.float32)


def test_a_new_sign_quantizer_runs_on_packed_bits(register):
    model = model_with(SignSwish(), HalfSign(), SignSwish())
    assert get_quantizer(SignSwish().config()) == SignSwish()
    packed = convert(model)
    kinds = [type(stage) for stage in packed.stages]
    assert PackStage in kinds and BinaryDenseStage in kinds and ThresholdStage in kinds
    x = images()
    np.testing.assert_array_equal(packed.predict_scores(x), model.predict_scores(x))
    s = summarize(model)
    assert [row["kind"] for row in s.rows] == ["-", "w1a32", "-", "a1", "binary", "-", "w32a1"]
    assert [row["bits"] for row in s.rows] == [None, 1, 32, None, 1, 32, 32]
    assert summarize(packed).totals["binary_macs"] == 48


def test_a_new_multibit_quantizer_stays_float_and_is_counted_at_its_bits(register):
    model = model_with(Ternary(), HalfSign(), Ternary())
    packed = convert(model)
    assert not any(isinstance(stage, (PackStage, BinaryDenseStage)) for stage in packed.stages)
    x = images()
    np.testing.assert_array_equal(packed.predict_scores(x), model.predict_scores(x))
    assert [row["kind"] for row in summarize(model).rows] == ["-", "w1a32", "-", "a2", "w1a2", "-", "w32a2"]


def test_a_new_quantizer_random_at_evaluation_is_refused(register):
    with pytest.raises(ValueError, match="stochastic at evaluation .RandomSign"):
        convert(model_with(RandomSign(), HalfSign(), SignSwish()))
