"""The one builder of a learning-rate schedule from a command's or a sweep's settings.

``lowbit train`` (``--schedule``, ``--lr``, ``--lr-end``, ``--step-size``, ``--gamma``), the sweep's
settings and the fine-tuning of ``lowbit mixed`` all name a schedule the same way; this turns the name
and its numbers into a :mod:`lowbit.optimizers` schedule for a run of ``epochs`` epochs.
"""
from __future__ import annotations

from .optimizers import SCHEDULES, get_schedule

__all__ = ["build_schedule"]


def build_schedule(name, lr, epochs, lr_end=None, step_size=None, gamma=None):
    """The schedule ``name`` starting at ``lr`` for ``epochs`` epochs.

    ``lr_end`` is the last epoch's rate of ``"exponential"`` (required there) and the floor of
    ``"cosine"`` (None: 0); ``step_size`` and ``gamma`` are ``"step"``'s (None: its defaults);
    ``"constant"`` keeps ``lr``.
    Raises ``ValueError`` for any other name, listing the known ones.
    """
    if name == "constant":
        return get_schedule("constant", lr=lr)
    if name == "step":
        given = {key: value for key, value in (("step_size", step_size), ("gamma", gamma)) if value is not None}
        return get_schedule("step", lr=lr, **given)
    if name == "exponential":
        return get_schedule("exponential", lr=lr, lr_end=lr_end, epochs=epochs)
    if name == "cosine":
        return get_schedule("cosine", lr=lr, epochs=epochs, lr_min=lr_end if lr_end else 0.0)
    raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
