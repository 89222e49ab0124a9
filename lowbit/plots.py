"""Writing matplotlib figures: one PNG writer for every report lowbit draws."""
from __future__ import annotations

import io

from .io import write_bytes_atomic

__all__ = ["save_figure"]


def save_figure(figure, path, dpi=120):
    """Write ``figure`` (a :class:`matplotlib.figure.Figure`, drawn without pyplot) to ``path`` as a PNG,
    atomically, cut to its contents (``bbox_inches="tight"``).  Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())
