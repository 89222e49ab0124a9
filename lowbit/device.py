"""The one check of a ``device`` argument: ``"cpu"``, or ``"gpu"`` when CuPy found a CUDA device.

Every place that takes ``device=`` (the :class:`~lowbit.trainer.Trainer`, the sweep, a teacher, the
commands' ``--device``) calls :func:`check_device` before any work, so a wrong value or a missing GPU
fails the same way everywhere.
"""
from __future__ import annotations

__all__ = ["DEVICES", "check_device"]

#: The devices lowbit runs on.
DEVICES = ("cpu", "gpu")


def check_device(device, argument="device"):
    """Return ``device`` when it is ``"cpu"``, or ``"gpu"`` with CuPy and a CUDA device present.

    Raises
    ------
    ValueError
        ``device`` is not one of :data:`DEVICES` (the message names ``argument``).
    RuntimeError
        ``"gpu"`` without CuPy or without a usable CUDA device.
    """
    from . import backend  # read at call time: tests stand in for a missing GPU with backend.cupy = None

    if not isinstance(device, str) or device not in DEVICES:
        raise ValueError(f"{argument} must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and backend.cupy is None:
        raise RuntimeError(f"{argument}='gpu' needs CuPy and a CUDA device; neither was found")
    return device
