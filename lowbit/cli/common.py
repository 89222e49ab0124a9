"""What every ``lowbit`` subcommand shares: the parser class, argument types, deprecated aliases,
one-line errors, the test-image limit and file sizes."""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["Parser", "DeprecatedAliases", "check_limit", "count", "human_size", "one_line", "positive_seconds"]


class Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr (``lowbit train: error: ... (see lowbit train --help)``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DeprecatedAliases(argparse.Action):
    """Stores the value like ``store``; an option string named in ``deprecated`` also prints one line
    on stderr naming the flag to use instead (the first option string)."""

    def __init__(self, option_strings, dest, deprecated=(), **kwargs):
        self.deprecated = tuple(deprecated)
        unknown = [flag for flag in self.deprecated if flag not in option_strings]
        if unknown:
            raise ValueError(f"deprecated flags {unknown} are not among the option strings {option_strings}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            print(f"{parser.prog}: note: {option_string} is deprecated and will be removed; use "
                  f"{self.option_strings[0]}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def positive_seconds(text):
    """argparse type of ``--time-budget``: a positive finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def count(text):
    """argparse type of ``--limit`` and the like: an int >= 0 (0: all)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (0: all), got {value}")
    return value


def one_line(exc) -> str:
    """An error as one line: MNIST's list of sources folded, any other newlines too."""
    folded = getattr(exc, "one_line", None)
    text = folded() if callable(folded) else str(exc)
    return "; ".join(part.strip(" -") for part in text.splitlines() if part.strip())


def check_limit(limit):
    """``limit`` (test images evaluated) must be an int >= 0 (0: all)."""
    import numpy as np

    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit must be an int >= 0 (0: all test images), got {limit!r}")


def human_size(n):
    """Bytes as ``"512 B"``, ``"48.5 KiB"``, ``"1.2 MiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def file_size(path):
    return os.path.getsize(path)
