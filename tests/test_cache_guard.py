"""kernels/_cache_guard.py: Numba's cached kernels are recompiled when any kernel source changes."""
from __future__ import annotations

import os

from lowbit.kernels import _cache_guard


def write_sources(directory):
    (directory / "a.py").write_text("X = 1\n")
    (directory / "b.py").write_text("Y = 2\n")
    (directory / "notes.txt").write_text("not a source\n")


def set_old_mtimes(directory):
    for path in directory.glob("*.py"):
        os.utime(path, (1_000_000, 1_000_000))


def mtimes(directory):
    return {path.name: path.stat().st_mtime for path in directory.glob("*.py")}


def test_touches_sources_when_their_digest_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_CACHE_GUARD", raising=False)
    sources, stamp = tmp_path / "pkg", tmp_path / "cache" / "stamp.sha256"
    sources.mkdir()
    write_sources(sources)
    set_old_mtimes(sources)
    # first look: no stamp, so caches of an unknown version may exist: every source is touched
    assert _cache_guard.refresh_cache_stamps(sources, stamp)
    assert all(t > 1_000_000 for t in mtimes(sources).values())
    assert stamp.read_text().strip() == _cache_guard.sources_digest(sources)
    # unchanged sources: nothing touched
    set_old_mtimes(sources)
    assert not _cache_guard.refresh_cache_stamps(sources, stamp)
    assert set(mtimes(sources).values()) == {1_000_000}
    # a non-source file does not count; an edit to one source touches all of them
    (sources / "notes.txt").write_text("changed\n")
    assert not _cache_guard.refresh_cache_stamps(sources, stamp)
    (sources / "b.py").write_text("Y = 3\n")
    set_old_mtimes(sources)
    assert _cache_guard.refresh_cache_stamps(sources, stamp)
    assert all(t > 1_000_000 for t in mtimes(sources).values())


def test_can_be_turned_off_and_survives_an_unwritable_stamp(tmp_path, monkeypatch):
    sources = tmp_path / "pkg"
    sources.mkdir()
    write_sources(sources)
    monkeypatch.setenv("LOWBIT_CACHE_GUARD", "0")
    assert not _cache_guard.refresh_cache_stamps(sources, tmp_path / "stamp")
    assert not (tmp_path / "stamp").exists()
    monkeypatch.setenv("LOWBIT_CACHE_GUARD", "1")
    blocker = tmp_path / "file"
    blocker.write_text("")
    # the stamp's directory cannot be made (a file is in the way): sources touched, no error
    assert _cache_guard.refresh_cache_stamps(sources, blocker / "stamp")


def test_the_package_digest_is_recorded(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    stamp = _cache_guard.stamp_file()
    assert stamp.parent == tmp_path / "lowbit"
    assert stamp.name.startswith("kernel_sources_")
    assert len(_cache_guard.sources_digest()) == 64
