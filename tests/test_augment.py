"""Tests for lowbit.augment: exact properties where they exist, a slow per-pixel reference for the
bilinear warp, and configuration round trips."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.augment import Augment, affine_warp, shift_images


def batch(seed=0, shape=(6, 2, 9, 11), dtype=np.float32):
    return np.random.default_rng(seed).random(shape, dtype=np.float64).astype(dtype)


def naive_shift(image, rows, cols):
    """Slow reference: out[r, c] = image[r - rows, c - cols], zero outside."""
    h, w = image.shape[-2:]
    out = np.zeros_like(image)
    for r in range(h):
        for c in range(w):
            if 0 <= r - rows < h and 0 <= c - cols < w:
                out[..., r, c] = image[..., r - rows, c - cols]
    return out


def naive_warp(image, angle, zoom, translate):
    """Slow reference for one (C, H, W) image: invert the map per pixel, blend 4 neighbours."""
    _, h, w = image.shape
    centre_r, centre_c = (h - 1) / 2, (w - 1) / 2
    theta = math.radians(angle)

    def pixel(r, c):
        return image[:, r, c] if 0 <= r < h and 0 <= c < w else np.zeros(image.shape[0])

    out = np.zeros(image.shape)
    for r in range(h):
        for c in range(w):
            d_r, d_c = r - centre_r - translate[0], c - centre_c - translate[1]
            src_r = (math.cos(theta) * d_r + math.sin(theta) * d_c) / zoom + centre_r
            src_c = (-math.sin(theta) * d_r + math.cos(theta) * d_c) / zoom + centre_c
            r0, c0 = math.floor(src_r), math.floor(src_c)
            fr, fc = src_r - r0, src_c - c0
            out[:, r, c] = ((1 - fr) * ((1 - fc) * pixel(r0, c0) + fc * pixel(r0, c0 + 1))
                            + fr * ((1 - fc) * pixel(r0 + 1, c0) + fc * pixel(r0 + 1, c0 + 1)))
    return out


ALL_ON = Augment(shift=2, rotate=20.0, scale=0.2, crop_pad=3, brightness=0.3)
CONFIGS = [Augment(shift=3), Augment(rotate=30.0), Augment(scale=0.3), Augment(crop_pad=2),
           Augment(brightness=0.5), Augment(shift=1, rotate=10.0), ALL_ON]


# --------------------------------------------------------------------------------------------------
# The array operations
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols", [(0, 0), (1, 0), (0, -2), (3, 4), (-9, 2), (20, 0)])
def test_shift_images_moves_pixels_exactly(rows, cols):
    x = batch(shape=(2, 2, 9, 11))
    out = shift_images(x, np.array([[rows, cols], [rows, cols]]))
    np.testing.assert_array_equal(out, naive_shift(x, rows, cols))


def test_shift_images_per_image():
    x = batch(shape=(3, 1, 5, 5))
    shifts = np.array([[1, 1], [0, -3], [-2, 4]])
    out = shift_images(x, shifts)
    for image, result, (rows, cols) in zip(x, out, shifts):
        np.testing.assert_array_equal(result, naive_shift(image, rows, cols))


def test_affine_warp_identity_is_exact():
    x = batch()
    np.testing.assert_array_equal(affine_warp(x, 0.0, 1.0, (0.0, 0.0)), x)


def test_affine_warp_integer_translation_equals_shift():
    x = batch()
    shifts = np.random.default_rng(1).integers(-4, 5, (len(x), 2))
    np.testing.assert_array_equal(affine_warp(x, 0.0, 1.0, shifts.astype(float)),
                                  shift_images(x, shifts))


@pytest.mark.parametrize("quarter_turns", [1, 2, 3, -1])
@pytest.mark.parametrize("size", [6, 7])
def test_affine_warp_quarter_turn_equals_rot90(quarter_turns, size):
    x = batch(shape=(3, 2, size, size))
    out = affine_warp(x, 90.0 * quarter_turns, 1.0, (0.0, 0.0))
    np.testing.assert_allclose(out, np.rot90(x, quarter_turns, axes=(2, 3)), rtol=0, atol=1e-6)


def test_affine_warp_half_turn_of_non_square_equals_rot90():
    x = batch(shape=(2, 1, 6, 9), dtype=np.float64)
    np.testing.assert_allclose(affine_warp(x, 180.0, 1.0, (0.0, 0.0)),
                               np.rot90(x, 2, axes=(2, 3)), rtol=0, atol=1e-12)


@settings(deadline=None, max_examples=30)
@given(angle=st.floats(-180, 180), zoom=st.floats(0.5, 2.0),
       t_r=st.floats(-4, 4), t_c=st.floats(-4, 4), seed=st.integers(0, 2**16))
def test_affine_warp_matches_reference(angle, zoom, t_r, t_c, seed):
    x = batch(seed, shape=(1, 2, 6, 7), dtype=np.float64)
    out = affine_warp(x, angle, zoom, (t_r, t_c))
    np.testing.assert_allclose(out[0], naive_warp(x[0], angle, zoom, (t_r, t_c)),
                               rtol=0, atol=1e-9)


def test_affine_warp_float32_matches_reference():
    x = batch(3, shape=(4, 1, 12, 10))
    params = [(17.0, 1.1, (0.5, -1.25)), (-33.0, 0.8, (2.0, 0.0)), (5.0, 1.0, (0.0, 0.0)),
              (120.0, 1.4, (-3.5, 1.5))]
    angles, zooms, translates = (np.array(column) for column in zip(*params))
    out = affine_warp(x, angles, zooms, translates)
    assert out.dtype == np.float32
    for image, result, (angle, zoom, translate) in zip(x, out, params):
        np.testing.assert_allclose(result, naive_warp(image.astype(np.float64), angle, zoom,
                                                      translate), rtol=0, atol=2e-5)


def test_affine_warp_far_outside_is_zero():
    x = np.ones((1, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(affine_warp(x, 0.0, 1.0, (100.0, -50.0)), 0)
    np.testing.assert_array_equal(affine_warp(x, 45.0, 1e-3, (0.0, 0.0))[0, 0, 0, 0], 0)


@pytest.mark.parametrize("call, error, message", [
    (lambda: affine_warp(np.zeros((2, 1, 4, 4), np.float32), [0.0] * 3, 1.0, (0, 0)),
     ValueError, r"angle must have shape \(2,\)"),
    (lambda: affine_warp(np.zeros((2, 1, 4, 4), np.float32), 0.0, 0.0, (0, 0)),
     ValueError, "zoom must be > 0"),
    (lambda: affine_warp(np.zeros((2, 1, 4, 4), np.float32), np.nan, 1.0, (0, 0)),
     ValueError, "angle must be finite"),
    (lambda: shift_images(np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 2))),
     TypeError, "shifts must be integers"),
    (lambda: shift_images(np.zeros((2, 4, 4), np.float32), np.zeros((2, 2), int)),
     ValueError, r"x must have shape \(N, C, H, W\)"),
])
def test_array_operation_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------------
# Augment
# --------------------------------------------------------------------------------------------------

def test_disabled_is_identity_copy_and_draws_nothing():
    x = batch()
    rng = np.random.default_rng(5)
    out = Augment()(x, rng)
    assert not Augment().enabled
    np.testing.assert_array_equal(out, x)
    assert out is not x and not np.shares_memory(out, x)
    assert rng.bit_generator.state == np.random.default_rng(5).bit_generator.state


def test_zero_rotation_and_zoom_range_is_identity():
    # rotate=0 and scale=0 switch the warp off; a warp with angle 0 and zoom 1 is exact anyway.
    x = batch()
    np.testing.assert_array_equal(Augment(rotate=0.0, scale=0.0)(x, np.random.default_rng(0)), x)


@pytest.mark.parametrize("aug", CONFIGS, ids=lambda a: a.to_string())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_dtype_range_and_input_untouched(aug, dtype):
    x = batch(dtype=dtype)
    before = x.copy()
    out = aug(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(x, before)


@settings(deadline=None, max_examples=25)
@given(shift=st.integers(0, 5), rotate=st.floats(0, 180), scale=st.floats(0, 0.9),
       crop_pad=st.integers(0, 4), brightness=st.floats(0, 1), seed=st.integers(0, 2**32 - 1),
       n=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9))
def test_values_stay_in_unit_interval(shift, rotate, scale, crop_pad, brightness, seed, n, c, h, w):
    x = np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32)
    x[..., 0] = 1.0  # edges of the interval
    x[..., -1, :] = 0.0
    out = Augment(shift, rotate, scale, crop_pad, brightness)(x, np.random.default_rng(seed))
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("aug", CONFIGS, ids=lambda a: a.to_string())
def test_same_seed_same_output(aug):
    x = batch()
    a = aug(x, np.random.default_rng(42))
    b = aug(x, np.random.default_rng(42))
    c = aug(x, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shift_moves_each_image_by_some_allowed_offset():
    x = batch(shape=(8, 1, 7, 7))
    out = Augment(shift=2)(x, np.random.default_rng(0))
    for image, result in zip(x, out):
        matches = [(r, c) for r in range(-2, 3) for c in range(-2, 3)
                   if np.array_equal(result, naive_shift(image, r, c))]
        assert matches, "output is not an integer shift of the input within +-2"


def test_crop_pad_output_is_a_window_of_the_padded_image():
    pad = 2
    x = batch(shape=(8, 2, 6, 5))
    out = Augment(crop_pad=pad)(x, np.random.default_rng(1))
    for image, result in zip(x, out):
        padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
        windows = [padded[:, r:r + 6, c:c + 5] for r in range(2 * pad + 1)
                   for c in range(2 * pad + 1)]
        assert any(np.array_equal(result, window) for window in windows)


def test_brightness_is_affine_per_image_before_clipping():
    x = np.tile(np.linspace(0.3, 0.7, 5, dtype=np.float32), (4, 1, 5, 1))
    out = Augment(brightness=0.2)(x, np.random.default_rng(0))
    for image, result in zip(x, out):
        # gain in [0.8, 1.2], offset in [-0.2, 0.2] keep 0.3..0.7 inside [0, 1]: no clipping.
        gain, offset = np.polyfit(image.ravel(), result.ravel(), 1)
        np.testing.assert_allclose(result, gain * image + offset, atol=1e-6)
        assert 0.8 <= gain <= 1.2 and -0.2 <= offset <= 0.2


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aug", [Augment(), *CONFIGS], ids=lambda a: a.to_string())
def test_config_round_trips(aug):
    config = aug.config()
    assert json.loads(json.dumps(config)) == config
    assert Augment.from_config(config) == aug
    assert Augment.from_string(aug.to_string()) == aug


def test_from_string():
    aug = Augment.from_string("shift=2,rotate=10,scale=0.1")
    assert aug == Augment(shift=2, rotate=10.0, scale=0.1)
    assert isinstance(aug.shift, int) and isinstance(aug.rotate, float)
    assert Augment.from_string(" crop_pad = 4 , brightness=0.25 ") == Augment(crop_pad=4,
                                                                              brightness=0.25)
    for text in ("", "none", "OFF"):
        assert Augment.from_string(text) == Augment()


def test_config_types_are_normalised():
    aug = Augment(shift=np.int64(2), rotate=10, scale=np.float32(0.5))
    assert type(aug.shift) is int and type(aug.rotate) is float and type(aug.scale) is float
    assert json.dumps(aug.config())


@pytest.mark.parametrize("kwargs, error, message", [
    ({"shift": -1}, ValueError, r"shift must be an int >= 0, got -1"),
    ({"shift": 1.5}, TypeError, r"shift must be an int >= 0, got 1.5"),
    ({"crop_pad": True}, TypeError, r"crop_pad must be an int >= 0, got True"),
    ({"rotate": 200}, ValueError, r"rotate must be a number in \[0, 180\] degrees, got 200.0"),
    ({"rotate": "10"}, TypeError, r"rotate must be a number in \[0, 180\] degrees, got '10'"),
    ({"scale": 1.0}, ValueError, r"scale must be a number in \[0, 1\), got 1.0"),
    ({"scale": float("nan")}, ValueError, r"scale must be a number in \[0, 1\), got nan"),
    ({"brightness": -0.1}, ValueError, r"brightness must be a number in \[0, 1\], got -0.1"),
])
def test_argument_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        Augment(**kwargs)


@pytest.mark.parametrize("text, message", [
    ("shift=2,zoom=0.1", r"unknown key 'zoom'; known keys are \['brightness', 'crop_pad'"),
    ("shift", r"expected key=value, got 'shift'"),
    ("shift=", r"expected key=value"),
    ("shift=2.5", r"shift must be an integer, got '2.5'"),
    ("rotate=ten", r"rotate must be a number, got 'ten'"),
    ("shift=1,shift=2", r"'shift' given twice"),
    ("scale=1.5", r"scale must be a number in \[0, 1\)"),
])
def test_from_string_errors(text, message):
    with pytest.raises(ValueError, match=message):
        Augment.from_string(text)


def test_from_config_errors():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['zoom'\]"):
        Augment.from_config({"shift": 1, "zoom": 2})
    with pytest.raises(TypeError, match="config must be a mapping"):
        Augment.from_config("shift=1")


@pytest.mark.parametrize("x, rng, error, message", [
    (np.zeros((2, 1, 4, 4), np.uint8), np.random.default_rng(0), TypeError, "floating dtype"),
    (np.zeros((1, 4, 4), np.float32), np.random.default_rng(0), ValueError, r"\(N, C, H, W\)"),
    ([[[[0.0]]]], np.random.default_rng(0), TypeError, "numpy array"),
    (np.zeros((2, 1, 4, 4), np.float32), 0, TypeError, "numpy.random.Generator"),
])
def test_call_errors(x, rng, error, message):
    with pytest.raises(error, match=message):
        ALL_ON(x, rng)


def test_augment_option_for_argparse():
    import argparse

    from lowbit.augment import augment_option

    parser = argparse.ArgumentParser(prog="train")
    parser.add_argument("--augment", default="", type=augment_option)
    assert parser.parse_args([]).augment is None  # argparse converts the string default too
    assert parser.parse_args(["--augment", "off"]).augment is None
    assert parser.parse_args(["--augment", "shift=2,rotate=10"]).augment == Augment(shift=2, rotate=10.0)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown key 'zoom'"):
        augment_option("zoom=2")


def test_lowbit_train_parses_augment_with_augment_option(capsys):
    from lowbit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--model", "mlp"]).augment is None
    assert parser.parse_args(["train", "--model", "mlp", "--augment", "none"]).augment is None
    assert parser.parse_args(["train", "--model", "mlp", "--augment", "shift=2"]).augment == Augment(shift=2)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model", "mlp", "--augment", "zoom=2"])
    assert "argument --augment: " in capsys.readouterr().err
