"""What the packed-model modules share: domain specs, array checks and the lazy kernel import."""
from __future__ import annotations

import numpy as np

PACKED_FORMAT = "lowbit.packed"


def kernels_module():
    # lowbit.kernels imports Numba; load it when a packed model first runs, not on ``import lowbit``.
    from .. import kernels

    return kernels


def words_for(k):
    return (int(k) + 63) // 64


# -- domain specs ---------------------------------------------------------------------------------
_LAYOUTS = {"float": (None,), "packed": ("nhwc", "nhwc_flat", "dense"), "acc": ("nhwc", "dense")}


def make_spec(domain, layout, dims):
    """A validated ``(domain, layout, dims)`` tuple (see the module docstring)."""
    if domain not in _LAYOUTS:
        raise ValueError(f"domain must be one of {sorted(_LAYOUTS)}, got {domain!r}")
    if layout not in _LAYOUTS[domain]:
        raise ValueError(f"layout of a {domain} array must be one of {list(_LAYOUTS[domain])}, "
                         f"got {layout!r}")
    if not isinstance(dims, (list, tuple)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"dims must be a list of positive ints, got {dims!r}")
    dims = tuple(int(d) for d in dims)
    expected = {"nhwc": 3, "nhwc_flat": 3, "dense": 1}.get(layout)
    if expected is not None and len(dims) != expected:
        raise ValueError(f"layout {layout!r} needs {expected} dims, got {list(dims)}")
    return (domain, layout, dims)


def spec_from_json(value):
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"a domain spec must be [domain, layout, dims], got {value!r}")
    return make_spec(value[0], value[1], value[2])


def spec_to_json(spec):
    return [spec[0], spec[1], list(spec[2])]


def sim_shape(spec):
    """Per-example shape of the array the simulation holds at this point."""
    domain, layout, dims = spec
    if layout == "nhwc_flat":
        return (dims[0] * dims[1] * dims[2],)
    return dims


def describe_spec(spec):
    domain, layout, dims = spec
    shape = "(" + ", ".join(str(d) for d in sim_shape(spec)) + ")"
    return shape if domain == "float" else f"{shape} {domain}"


def check_array(arrays, name, dtype, shape=None):
    if name not in arrays:
        raise ValueError(f"array {name!r} is missing")
    arr = arrays[name]
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"array {name!r} must be {np.dtype(dtype).name}, got {arr.dtype.name}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"array {name!r} must have shape {tuple(shape)}, got {tuple(arr.shape)}")
    return arr


def config_int(config, name, minimum=0):
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
