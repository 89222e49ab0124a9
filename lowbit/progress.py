"""Progress reporting shared by the library, the CLI and the experiment scripts.

* :class:`tqdm` -- ``tqdm.auto.tqdm`` on a terminal.  When stderr is not a terminal (a log file, a
  pipe, CI) it writes plain lines instead of redrawing one with carriage returns and escape codes:
  one line when it starts, one every ``LOWBIT_PROGRESS_SECONDS`` seconds (default 30) and one at
  the end, so a long run leaves a short, readable log.
* :func:`batched_scores` -- a model's scores over many images with a progress bar, equal to one
  ``predict_scores`` call with the same batch size.
* :func:`step` -- one line on stderr announcing a step of a long command.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np
from tqdm.auto import tqdm as _auto_tqdm

__all__ = ["tqdm", "line_mode", "progress_interval", "batched_scores", "step"]

# tqdm.auto gives notebook widgets inside Jupyter: those are left alone
_TEXT_BARS = not _auto_tqdm.__module__.startswith("tqdm.notebook")
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
DEFAULT_SECONDS = 30.0


def progress_interval() -> float:
    """Seconds between lines when not on a terminal: ``$LOWBIT_PROGRESS_SECONDS`` or 30."""
    text = os.environ.get("LOWBIT_PROGRESS_SECONDS", "")
    try:
        value = float(text)
    except ValueError:
        return DEFAULT_SECONDS
    return value if value >= 0 else DEFAULT_SECONDS


def line_mode(stream=None) -> bool:
    """True when ``stream`` (default stderr) is not a terminal: progress is written as plain lines."""
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return True


class _LineFile:
    """A file for tqdm that turns each redraw into one plain line (no ``\\r``, no escape codes)."""

    def __init__(self, stream):
        self.stream = stream
        self.last = None

    def write(self, text):
        for part in re.split(r"[\r\n]", _ESCAPES.sub("", text)):
            part = part.strip()
            if part and part != self.last:
                self.stream.write(part + "\n")
                self.last = part

    def flush(self):
        self.stream.flush()


class tqdm(_auto_tqdm):  # noqa: N801 - a drop-in for tqdm.auto.tqdm
    """``tqdm.auto.tqdm`` that writes one plain line per ``progress_interval()`` seconds when stderr is
    not a terminal (see the module docstring).  Takes tqdm's arguments."""

    def __init__(self, *args, **kwargs):
        if _TEXT_BARS and kwargs.get("file") is None and not kwargs.get("disable") \
                and line_mode():
            interval = progress_interval()
            kwargs.update(file=_LineFile(sys.stderr), ascii=True, dynamic_ncols=False, ncols=100,
                          mininterval=interval, maxinterval=max(interval, 1.0), position=None)
        super().__init__(*args, **kwargs)


def batched_scores(model, x, batch_size=100, desc="scoring", progress=True, chunk_batches=10):
    """``model.predict_scores(x, batch_size)`` with a progress bar over the images.

    The images go to ``predict_scores`` in chunks of ``chunk_batches * batch_size``, so every batch
    is the one a single call would make and the scores are the same bit for bit.
    """
    chunk = max(1, int(chunk_batches)) * int(batch_size)
    if len(x) <= chunk or not progress:
        return model.predict_scores(x, batch_size)
    parts = []
    with tqdm(total=len(x), desc=desc, unit="img", leave=False) as bar:
        for start in range(0, len(x), chunk):
            parts.append(model.predict_scores(x[start:start + chunk], batch_size))
            bar.update(min(chunk, len(x) - start))
    return np.concatenate(parts, axis=0)


def step(message, enabled=True):
    """Announce a step of a long command: ``lowbit: <message>`` on stderr."""
    if enabled:
        print(f"lowbit: {message}", file=sys.stderr, flush=True)
