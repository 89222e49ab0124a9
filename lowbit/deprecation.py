"""Renamed arguments: the old name still works for a release, with a warning that names the new one."""
from __future__ import annotations

import warnings

__all__ = ["renamed_argument"]


def renamed_argument(function, old_name, old_value, new_name, new_value, default=None):
    """The value of an argument of ``function`` renamed from ``old_name`` to ``new_name``.

    ``None`` means not given: ``new_value`` when given, else ``old_value`` with a
    :class:`DeprecationWarning` naming ``new_name`` (pointing at the caller of ``function``), else
    ``default``.  Both given is a :class:`TypeError`.
    """
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"{function}() got {old_name}={old_value!r} and {new_name}={new_value!r}; "
                        f"give only {new_name} ({old_name} is its deprecated old name)")
    warnings.warn(f"{function}(): {old_name} is deprecated and will be removed in the next release; "
                  f"use {new_name}", DeprecationWarning, stacklevel=3)
    return old_value
