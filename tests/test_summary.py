"""Model summaries (lowbit.summary): per-layer counts, bits, memory, MAC split, totals, profiling."""
import numpy as np
import pytest

from lowbit import save_model, zoo
from lowbit.convert import convert
from lowbit.layers import BatchNorm, Flatten
from lowbit.model import Model
from lowbit.quant_layers import QuantActivation, QuantAffine
from lowbit.cli.summary import summary_command
from lowbit.summary import Summary, summarize


def small_model():
    """Binary weights on real input, a binary layer, a float last layer on binary input."""
    return Model([
        Flatten(),
        QuantAffine(16, 8, bias=False, kernel_quantizer="ste_sign", seed=0),  # w1a32: float MACs
        BatchNorm(8),
        QuantActivation("ste_sign"),
        QuantAffine(8, 6, bias=False, kernel_quantizer="ste_sign", seed=1),   # +-1 input: binary
        BatchNorm(6),
        QuantAffine(6, 4, bias=True, input_quantizer="ste_sign", seed=2),     # float weights: w32a1
    ], input_shape=(1, 4, 4), name="small")


def columns(summary, key):
    return [row[key] for row in summary.rows]


def test_model_summary_rows_and_totals():
    s = summarize(small_model())
    assert columns(s, "layer") == ["Flatten", "QuantAffine", "BatchNorm", "QuantActivation", "QuantAffine",
                                   "BatchNorm", "QuantAffine"]
    assert columns(s, "kind") == ["-", "w1a32", "-", "a1", "binary", "-", "w32a1"]
    assert columns(s, "output") == ["(16)", "(8)", "(8)", "(8)", "(6)", "(6)", "(4)"]
    assert columns(s, "params") == [0, 128, 32, 0, 48, 24, 28]
    assert columns(s, "bits") == [None, 1, 32, None, 1, 32, 32]
    assert columns(s, "memory") == [0, 16, 128, 0, 6, 96, 112]
    assert columns(s, "binary_macs") == [0, 0, 0, 0, 48, 0, 0]
    assert columns(s, "float_macs") == [0, 128, 0, 0, 0, 0, 24]
    assert s.totals == {"params": 260, "memory": 358, "binary_macs": 48, "float_macs": 152,
                        "float32_bytes": 1040}
    text = s.table()
    assert "total" in text and "float32 equivalent 1.02 KiB (2.9x)" in text and "48 binary = 24.0%" in text


def test_packed_summary_keeps_the_mac_split_and_counts_stored_bytes():
    model = small_model()
    s = summarize(convert(model))
    # the BatchNorm before the first sign became the pack stage's float32 thresholds (+ int8 directions)
    assert columns(s, "layer") == ["Flatten", "QuantAffine", "pack", "binary_dense", "threshold",
                                   "unpack", "QuantAffine"]
    assert columns(s, "index") == ["0.0", "0.1", "1", "2", "3", "4", "5.0"]
    assert columns(s, "bits") == [None, 1, None, 1, None, None, 32]
    # sign bits are stored one uint64 word per output unit here; a threshold is int16 + int8
    assert columns(s, "memory") == [0, 8 * 8, 8 * 5, 6 * 8, 6 * 3, 0, 112]
    assert columns(s, "output")[3:5] == ["(6) acc", "(6) packed"]
    assert s.totals["binary_macs"] == 48 and s.totals["float_macs"] == 152
    assert s.totals["float32_bytes"] == 1040  # the source model's
    assert "binary" in columns(s, "kind")


def test_zoo_binary_mlp_macs_are_binary():
    s = summarize(zoo.tfc())
    assert s.totals["binary_macs"] == 784 * 64 + 2 * 64 * 64 + 64 * 10 and s.totals["float_macs"] == 0
    cnn = summarize(zoo.binary_cnn(channels=(8, 8, 16, 16), hidden=32))
    first_conv = 8 * 9 * 28 * 28
    assert cnn.rows[0]["float_macs"] == first_conv and cnn.rows[2]["binary_macs"] == 8 * 8 * 9 * 28 * 28
    assert cnn.totals["float_macs"] == first_conv + 32 * 10


@pytest.mark.parametrize("packed", [False, True])
def test_profile_times_every_row(packed):
    model = small_model()
    target = convert(model) if packed else model
    s = summarize(target, profile=True, batch_size=8, repeats=2)
    assert all(row["time_ms"] >= 0 for row in s.rows) and s.totals["time_ms"] > 0
    assert "time ms" in s.table()


def test_summary_command_reads_both_kinds_of_file(tmp_path):
    model = small_model()
    model_path = save_model(model, tmp_path / "m.npz")
    packed_path = convert(model).save(tmp_path / "p.npz")
    for path, title in ((model_path, "model 'small'"), (packed_path, "packed model 'small'")):
        lines = []
        result = summary_command(path, out=lines.append)
        assert isinstance(result, Summary) and lines[0].startswith(title)
        assert "file size" in lines[0]


def test_summarize_refuses_other_objects():
    with pytest.raises(TypeError, match="Model or PackedModel"):
        summarize(np.zeros(3))
