"""Renamed arguments: the old name still works for a release, with a warning that names the new one."""
from __future__ import annotations

import warnings

__all__ = ["moved_names", "renamed_argument"]


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


def moved_names(module, moved):
    """A module ``__getattr__`` for names that moved: ``moved`` maps an old name of ``module`` to the
    ``"package.module"`` it lives in now (same name there); asking for one imports it from there with
    a :class:`DeprecationWarning` that names the new place, for a release.

    Use: ``__getattr__ = moved_names(__name__, {"old_command": "lowbit.cli.mixed"})``.
    """
    def __getattr__(name):
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        import importlib

        warnings.warn(f"{module}.{name} moved to {moved[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__
