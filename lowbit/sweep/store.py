"""The sweep's record on disk: ``sweep.json`` (its settings) and ``points.jsonl`` (one line per point).

Points are appended one JSON line each (keys sorted), flushed and fsynced, so a sweep interrupted at
any moment loses at most the point it was writing, and several processes may append to one folder
(each computing other cells).  A resumed sweep skips the points already there; the reports are
rebuilt from the file alone (:func:`lowbit.sweep.report_sweep`).  The record keys are the on-disk
format and stay as they are (``act_bits``, not the Python API's ``activation_bits``).
"""
from __future__ import annotations

import json
import os

from ..io import write_bytes_atomic

SETTINGS_FILE = "sweep.json"
POINTS_FILE = "points.jsonl"


def point_key(record):
    """``(method, weight_bits, act_bits, seed)`` of a point's record: which cell of the grid it is."""
    return (record["method"], int(record["weight_bits"]), int(record["act_bits"]), int(record["seed"]))


def load_points(path, key, repair=True):
    """Records of ``points.jsonl``, each checked to carry the settings ``key``; an unterminated last
    line (a crash mid-write, or a sweep still writing it) is dropped, and with ``repair`` also cut
    from the file.  A point recorded twice counts once (its last line)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        if repair:
            write_bytes_atomic(path, raw)
    records = {}
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not JSON ({exc}); remove that line to continue") \
                from None
        if record.get("settings_key") != key:
            raise ValueError(f"{path} holds points made with other settings (key "
                             f"{record.get('settings_key')!r}, now {key!r}); use another out_dir")
        records[point_key(record)] = record
    return list(records.values())


def append_point(path, record):
    """Append ``record`` to ``points.jsonl`` as one line, flushed and fsynced."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_settings(out_dir, settings):
    """Write ``sweep.json`` the first time; refuse a resumption under other settings (``ValueError``
    naming each setting that differs)."""
    from ..trainer import write_json_atomic

    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        differ = [key for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
        if differ:
            detail = "; ".join(f"{key}: {saved.get(key)!r} there, {settings.get(key)!r} now"
                               for key in differ)
            raise ValueError(f"{out_dir} holds a sweep made with other settings ({detail}); use another "
                             "out_dir, or the same settings to resume it")
    else:
        write_json_atomic(path, settings)


def load_settings(out_dir):
    """The settings in ``out_dir/sweep.json`` (``FileNotFoundError`` when the folder holds no sweep)."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out_dir} holds no sweep (no sweep.json): give the folder a sweep wrote")
    with open(path) as fh:
        return json.load(fh)
