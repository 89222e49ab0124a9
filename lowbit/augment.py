"""Image data augmentation for float batches ``(N, C, H, W)``, driven by an explicit Generator.

:class:`Augment` draws one set of parameters per image from the ``np.random.Generator`` it is
given, so the same generator state gives the same output.  It is off by default: ``Augment()``
changes nothing.  Steps, in this order, each only when enabled:

1. **Geometry.**  A random integer shift in ``[-shift, shift]`` pixels per axis, a rotation by an
   angle in ``[-rotate, rotate]`` degrees and a zoom by a factor in ``[1 - scale, 1 + scale]``.
   When ``rotate`` or ``scale`` is on, all three are one affine warp about the image centre with
   bilinear interpolation (:func:`affine_warp`); a shift alone is an exact integer shift
   (:func:`shift_images`).  Pixels that come from outside the image are 0.
2. **Random crop with padding** (``crop_pad = p``): pad ``p`` zero pixels on every side and take a
   random ``H x W`` window, which is the same as an integer shift in ``[-p, p]`` per axis.
3. **Brightness** (``brightness = b``): per image, ``x * m + a`` with ``m`` uniform in
   ``[1 - b, 1 + b]`` and ``a`` uniform in ``[-b, b]``, clipped to ``[0, 1]``.

Conventions: axis 2 is rows (downward), axis 3 is columns (rightward).  A shift ``(dr, dc)`` moves
content down by ``dr`` and right by ``dc``: ``out[r, c] = x[r - dr, c - dc]``.  A positive angle
turns the content counter-clockwise as displayed, so a 90 degree turn of a square image is
``np.rot90(x, 1, axes=(2, 3))``.  A zoom above 1 enlarges the content.  The centre of rotation and
zoom is ``((H - 1) / 2, (W - 1) / 2)``.

Speed: a 100 x 1 x 28 x 28 float32 batch with shift, rotation and zoom takes about 1 ms on one
CPU core.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, Mapping

import numpy as np

__all__ = ["Augment", "affine_warp", "augment_option", "shift_images"]


# --------------------------------------------------------------------------------------------------
# Array operations
# --------------------------------------------------------------------------------------------------

def shift_images(x: np.ndarray, shifts) -> np.ndarray:
    """Shift each image by a whole number of pixels, filling with zeros.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    shifts : array of int, shape (N, 2)
        ``(rows, cols)`` per image; ``out[n, :, r, c] = x[n, :, r - rows, c - cols]``.

    Returns
    -------
    ndarray, shape (N, C, H, W), dtype of ``x``; a new array.
    """
    _check_batch(x, "x")
    shifts = _per_image(shifts, "shifts", len(x), (2,), integer=True)
    return _shift(x, shifts)


def affine_warp(x: np.ndarray, angle, zoom, translate) -> np.ndarray:
    """Rotate, zoom and translate each image about its centre, with bilinear interpolation.

    The content of image ``n`` is mapped by ``p -> R(angle[n]) * zoom[n] * (p - centre) + centre
    + translate[n]``; each output pixel samples the input at the inverse image of its position,
    bilinearly, with zeros outside.  An output pixel is a convex combination of input pixels and 0,
    so inputs in ``[0, 1]`` give outputs in ``[0, 1]``.

    Parameters
    ----------
    x : ndarray, floating, shape (N, C, H, W)
    angle : array_like, shape (N,) or scalar
        Degrees, counter-clockwise as displayed.
    zoom : array_like, shape (N,) or scalar, > 0
    translate : array_like, shape (N, 2) or (2,)
        ``(rows, cols)`` in pixels, may be fractional.

    Returns
    -------
    ndarray, shape (N, C, H, W), dtype of ``x``; a new array.
    """
    _check_batch(x, "x")
    n = len(x)
    angle = _per_image(angle, "angle", n, ())
    zoom = _per_image(zoom, "zoom", n, ())
    translate = _per_image(translate, "translate", n, (2,))
    if np.any(zoom <= 0):
        raise ValueError(f"affine_warp: zoom must be > 0, got minimum {zoom.min()}")
    return _warp(x, angle, zoom, translate)


def _shift(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    # Shifts past the edge give all zeros; clipping them bounds the padding.
    rows = np.clip(shifts[:, 0], -h, h)
    cols = np.clip(shifts[:, 1], -w, w)
    pad = int(max(np.abs(rows).max(initial=0), np.abs(cols).max(initial=0)))
    if pad == 0:
        return x.copy()
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    row_index = (pad - rows)[:, None] + np.arange(h)  # (N, H)
    col_index = (pad - cols)[:, None] + np.arange(w)  # (N, W)
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  row_index[:, None, :, None], col_index[:, None, None, :]]


def _warp(x: np.ndarray, angle: np.ndarray, zoom: np.ndarray, translate: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    # Zero border: one row/column before the image and two after, so that every clipped sample
    # position u in [0, h + 1] has both floor(u) and floor(u) + 1 inside the padded frame.
    ph, pw = h + 3, w + 3
    padded = np.zeros((n, c, ph, pw), dtype=x.dtype)
    padded[:, :, 1:h + 1, 1:w + 1] = x

    # Inverse map as one (2N x 3) @ (3 x HW) product: src = M_n @ (row, col, 1), +1 for the
    # border.  float32 positions (float64 for float64 images) are exact for integer shifts and
    # quarter turns and within ~2e-6 pixel otherwise; they halve the memory traffic.
    coord_dtype = np.float64 if x.dtype == np.float64 else np.float32
    centre_r, centre_c = (h - 1) / 2.0, (w - 1) / 2.0
    theta = np.deg2rad(angle)
    cos, sin = np.cos(theta) / zoom, np.sin(theta) / zoom
    d_r, d_c = -centre_r - translate[:, 0], -centre_c - translate[:, 1]
    inverse = np.empty((n, 2, 3))
    inverse[:, 0, 0], inverse[:, 0, 1] = cos, sin
    inverse[:, 1, 0], inverse[:, 1, 1] = -sin, cos
    inverse[:, 0, 2] = cos * d_r + sin * d_c + centre_r + 1.0
    inverse[:, 1, 2] = cos * d_c - sin * d_r + centre_c + 1.0
    grid = np.empty((3, h * w), dtype=coord_dtype)
    grid[0], grid[1] = np.divmod(np.arange(h * w), w)
    grid[2] = 1.0
    src = (inverse.astype(coord_dtype).reshape(2 * n, 3) @ grid).reshape(n, 2, h * w)
    # Positions far outside land on the zero border.
    np.clip(src, 0, np.array([[h + 1.0], [w + 1.0]], dtype=coord_dtype), out=src)

    # int32 gathers are about twice as fast as int64 ones; fall back when the batch is huge.
    index_dtype = np.int32 if padded.size < 2**31 else np.intp
    corner = src.astype(index_dtype)  # floor, since src >= 0
    frac = np.subtract(src, corner, dtype=x.dtype)
    frac_r, frac_c = frac[:, None, 0], frac[:, None, 1]
    top_left = corner[:, 0] * index_dtype(pw) + corner[:, 1]  # (N, HW)
    image_start = np.arange(n * c, dtype=index_dtype).reshape(n, c, 1) * index_dtype(ph * pw)
    top_left = top_left[:, None, :] + image_start  # (N, C, HW) into padded.ravel()

    flat = padded.reshape(-1)
    out = flat[top_left]
    right = flat[top_left + 1]
    below = flat[top_left + pw]
    below_right = flat[top_left + (pw + 1)]
    # Bilinear blend in place: out = lerp(lerp(tl, tr), lerp(bl, br)).
    right -= out
    right *= frac_c
    out += right
    below_right -= below
    below_right *= frac_c
    below += below_right
    below -= out
    below *= frac_r
    out += below
    # A convex combination of pixels and 0 lies in [min(0, x), max(0, x)]; clipping to that hull
    # only removes rounding, so inputs in [0, 1] give outputs in [0, 1].
    lo = min(0.0, float(x.min(initial=0)))
    hi = max(0.0, float(x.max(initial=0)))
    np.clip(out, lo, hi, out=out)
    return out.reshape(n, c, h, w)


def _check_batch(x, name: str) -> None:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype (float32 images in [0, 1]), "
                        f"got {x.dtype}")


def _per_image(value, name: str, n: int, tail: tuple, integer: bool = False) -> np.ndarray:
    arr = np.asarray(value)
    if integer and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if not integer and not (np.issubdtype(arr.dtype, np.integer)
                            or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be numbers, got dtype {arr.dtype}")
    if arr.shape == tail:
        arr = np.broadcast_to(arr, (n, *tail))
    if arr.shape != (n, *tail):
        raise ValueError(f"{name} must have shape {(n, *tail)} or {tail}, got {arr.shape}")
    if not integer and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr.astype(np.int64 if integer else np.float64)


# --------------------------------------------------------------------------------------------------
# The callable
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augment:
    """Random augmentation of float image batches; ``Augment()`` is the identity.

    Parameters
    ----------
    shift : int, >= 0
        Largest integer shift in pixels, per axis.
    rotate : float, in [0, 180]
        Largest rotation in degrees, either way.
    scale : float, in [0, 1)
        Zoom factors are drawn from ``[1 - scale, 1 + scale]``.
    crop_pad : int, >= 0
        Zero padding on every side before a random crop back to ``H x W``.
    brightness : float, in [0, 1]
        Range of the multiplicative (``1 +- b``) and additive (``+- b``) jitter; the result is
        clipped to ``[0, 1]``.

    Examples
    --------
    >>> aug = Augment.from_string("shift=2,rotate=10,scale=0.1")
    >>> x_aug = aug(x, np.random.default_rng(0))   # x: float32 (N, C, H, W)
    """

    shift: int = 0
    rotate: float = 0.0
    scale: float = 0.0
    crop_pad: int = 0
    brightness: float = 0.0

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the stored types once, here
        set_(self, "shift", _check_int("shift", self.shift))
        set_(self, "crop_pad", _check_int("crop_pad", self.crop_pad))
        set_(self, "rotate", _check_float("rotate", self.rotate, 0.0, 180.0, "in [0, 180] degrees"))
        set_(self, "scale", _check_float("scale", self.scale, 0.0, 1.0, "in [0, 1)",
                                         open_high=True))
        set_(self, "brightness", _check_float("brightness", self.brightness, 0.0, 1.0,
                                              "in [0, 1]"))

    @property
    def enabled(self) -> bool:
        """False when every setting is zero, i.e. ``__call__`` is the identity."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment a batch.

        Parameters
        ----------
        x : ndarray, floating (float32 expected), shape (N, C, H, W), values in [0, 1]
            Not modified.
        rng : numpy.random.Generator
            Source of every random draw; not used at all when the augmentation is disabled.

        Returns
        -------
        ndarray, same shape and dtype as ``x``; always a new array (a copy when disabled).
        """
        _check_batch(x, "x")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        n = len(x)
        out = x
        if self.rotate or self.scale:
            angle = rng.uniform(-self.rotate, self.rotate, n) if self.rotate else np.zeros(n)
            zoom = (rng.uniform(1.0 - self.scale, 1.0 + self.scale, n) if self.scale
                    else np.ones(n))
            shifts = self._draw_shifts(rng, n, self.shift)
            out = _warp(out, angle, zoom, shifts.astype(np.float64))
        elif self.shift:
            out = _shift(out, self._draw_shifts(rng, n, self.shift))
        if self.crop_pad:
            # Window offset o in [0, 2p] of the padded image is a shift of p - o.
            offsets = rng.integers(0, 2 * self.crop_pad + 1, size=(n, 2))
            out = _shift(out, self.crop_pad - offsets)
        if self.brightness:
            b = self.brightness
            gain = rng.uniform(1.0 - b, 1.0 + b, n).astype(x.dtype)[:, None, None, None]
            offset = rng.uniform(-b, b, n).astype(x.dtype)[:, None, None, None]
            out = np.clip(out * gain + offset, 0, 1).astype(x.dtype, copy=False)
        return out.copy() if out is x else out

    @staticmethod
    def _draw_shifts(rng: np.random.Generator, n: int, shift: int) -> np.ndarray:
        if not shift:
            return np.zeros((n, 2), dtype=np.int64)
        return rng.integers(-shift, shift + 1, size=(n, 2))

    # ---------------------------------------------------------------------------------------------
    # Configuration
    # ---------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """All settings as a JSON-able dict; ``Augment.from_config(a.config()) == a``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Augment":
        """Build from a dict such as :meth:`config` returns; missing keys take their defaults."""
        if not isinstance(config, Mapping):
            raise TypeError(f"Augment.from_config: config must be a mapping, "
                            f"got {type(config).__name__}")
        unknown = sorted(set(config) - set(_FIELD_TYPES))
        if unknown:
            raise ValueError(f"Augment.from_config: unknown key(s) {unknown}; "
                             f"known keys are {sorted(_FIELD_TYPES)}")
        return cls(**config)

    @classmethod
    def from_string(cls, text: str) -> "Augment":
        """Parse a CLI flag such as ``"shift=2,rotate=10,scale=0.1"``.

        ``""``, ``"none"`` and ``"off"`` give the identity.  Keys are the constructor's argument
        names; spaces around keys and values are ignored.
        """
        if not isinstance(text, str):
            raise TypeError(f"Augment.from_string: expected a str, got {type(text).__name__}")
        if text.strip().lower() in ("", "none", "off"):
            return cls()
        settings: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not key or not value:
                raise ValueError(f"Augment.from_string: expected key=value, got {item.strip()!r} "
                                 f"in {text!r}")
            if key not in _FIELD_TYPES:
                raise ValueError(f"Augment.from_string: unknown key {key!r}; "
                                 f"known keys are {sorted(_FIELD_TYPES)}")
            if key in settings:
                raise ValueError(f"Augment.from_string: {key!r} given twice in {text!r}")
            try:
                settings[key] = _FIELD_TYPES[key](value)
            except ValueError:
                kind = "an integer" if _FIELD_TYPES[key] is int else "a number"
                raise ValueError(f"Augment.from_string: {key} must be {kind}, "
                                 f"got {value!r}") from None
        return cls(**settings)

    def to_string(self) -> str:
        """The inverse of :meth:`from_string`: non-default settings only, or ``"none"``."""
        items = [f"{k}={v!r}" for k, v in self.config().items() if v]
        return ",".join(items) if items else "none"


def augment_option(text):
    """``type=`` of an argparse ``--augment`` flag: :meth:`Augment.from_string`, with the identity
    (``""``, ``"none"``, ``"off"``) as None, so that ``if augment:`` means "augmenting".

    A bad setting becomes an ``argparse.ArgumentTypeError`` carrying from_string's message, which
    argparse reports as ``argument --augment: <message>``.
    """
    import argparse

    try:
        augment = Augment.from_string(text)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return None if augment == Augment() else augment


_FIELD_TYPES = {"shift": int, "rotate": float, "scale": float, "crop_pad": int,
                "brightness": float}


def _check_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Augment: {name} must be an int >= 0, got {value!r}")
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"Augment: {name} must be an int >= 0, got {value}")
    return value


def _check_float(name: str, value, low: float, high: float, expected: str,
                 open_high: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"Augment: {name} must be a number {expected}, got {value!r}")
    value = float(value)
    too_high = value >= high if open_high else value > high
    if not math.isfinite(value) or value < low or too_high:
        raise ValueError(f"Augment: {name} must be a number {expected}, got {value!r}")
    return value
