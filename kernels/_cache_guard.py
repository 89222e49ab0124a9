"""Keep Numba's on-disk cache of the kernels in step with their sources.

Numba's ``cache=True`` keys each cached function on the stamp (mtime and size) of the one file that
defines it.  A kernel here inlines code from other files of this package (the LLVM micro-kernels of
``_intrinsics.py``, helpers of ``gemm.py``, ``threshold.py``, ``_checks.py``), so an edit to one of
those leaves the cached machine code of every caller stale: ``conv.py``'s kernels kept running the
old micro-kernel after ``_intrinsics.py`` changed, and a timing or a test then measured code that
was no longer in the tree.

:func:`refresh_cache_stamps` (called once when ``lowbit.kernels`` is imported) hashes the package's
Python sources and compares the digest with the one recorded at the previous import; when they
differ it touches every source file, so that Numba finds every stamp changed and recompiles each
kernel on its first call (a one-time cost of the order of a minute for the whole package).  An
installed copy that no one edits keeps its digest and pays nothing but the hashing (about a
millisecond); one that cannot be touched (read-only) is left alone.  ``LOWBIT_CACHE_GUARD=0`` turns
the check off.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["refresh_cache_stamps", "sources_digest"]

PACKAGE = Path(__file__).resolve().parent


def sources_digest(directory=PACKAGE):
    """SHA-256 over the names and contents of the ``*.py`` files of ``directory``, sorted by name."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.py")):
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def stamp_file(directory=PACKAGE):
    """Where the digest of ``directory``'s sources is kept: ``$XDG_CACHE_HOME/lowbit`` (else
    ``~/.cache/lowbit``), one file per package location."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    key = hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()[:16]
    return base / "lowbit" / f"kernel_sources_{key}.sha256"


def refresh_cache_stamps(directory=PACKAGE, stamp=None):
    """Touch every ``*.py`` of ``directory`` when their digest differs from the recorded one, then
    record it.  Returns True when it touched the files (Numba will recompile), False otherwise."""
    if os.environ.get("LOWBIT_CACHE_GUARD", "1") == "0":
        return False
    directory = Path(directory)
    stamp = Path(stamp) if stamp is not None else stamp_file(directory)
    digest = sources_digest(directory)
    try:
        if stamp.read_text(encoding="ascii").strip() == digest:
            return False
    except (OSError, UnicodeDecodeError):
        pass  # first import here (caches of an unknown version may exist), or an unreadable stamp
    touched = False
    for path in directory.glob("*.py"):
        try:
            os.utime(path)
            touched = True
        except OSError:
            pass  # a read-only install: no one edits it
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        partial = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        partial.write_text(digest + "\n", encoding="ascii")
        os.replace(partial, stamp)
    except OSError:
        pass  # no writable cache directory: check again at the next import
    return touched
