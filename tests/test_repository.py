"""The repository's weight: what is committed under experiments/ stays small and accounted for.

Issue #23 asks that a fresh clone not grow by more than a few MB a month of work. These checks keep the
rules that make that true from eroding silently:

* every trained model under ``experiments/models/`` backs a committed result (its file name appears in a
  result file under ``experiments/results/`` or in ``docs/results.md``), so no model is kept "just in case";
* no two model files are byte-identical (a copy under a second name is a duplicate, not a new result);
* no single model exceeds 5 MiB (binary layers are committed packed: the 3x4096 BNN MLP is 4.6 MiB) and
  the folder stays under a budget that a reviewer raises on purpose, in the commit that needs it;
* every result folder is referenced from the README, ``docs/`` or an experiment script, so none is orphaned.
"""
import hashlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "experiments" / "models"
RESULTS = ROOT / "experiments" / "results"
MODEL_SUFFIXES = {".npz", ".onnx"}
MAX_MODEL_BYTES = 5 * 2**20
# Raise on purpose, in the commit that adds the model and the result it backs.
MODELS_BUDGET_BYTES = 40 * 2**20

pytestmark = pytest.mark.skipif(not MODELS.is_dir(), reason="run from a source checkout (experiments/ absent)")


def _model_files():
    return sorted(p for p in MODELS.rglob("*") if p.is_file() and p.suffix in MODEL_SUFFIXES)


def _text_of(paths):
    chunks = []
    for path in paths:
        try:
            chunks.append(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return "\n".join(chunks)


def _result_texts():
    files = [p for p in RESULTS.rglob("*") if p.is_file() and p.suffix in {".json", ".jsonl", ".md", ".csv", ".log"}]
    return _text_of(files + [ROOT / "docs" / "results.md"])


def _reference_texts():
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "experiments").glob("*.py"),
             *(ROOT / "experiments").glob("*.sh"), *(ROOT / "experiments" / "gpu_jobs").glob("*")]
    return _text_of(p for p in files if p.is_file())


def test_every_model_backs_a_committed_result():
    text = _result_texts() + _text_of(p for p in (ROOT / "experiments").glob("*.py"))
    orphans = [str(p.relative_to(ROOT)) for p in _model_files() if p.stem not in text]
    assert orphans == [], f"models that no committed result or experiment names (delete them or commit the result): {orphans}"


def test_no_duplicate_models():
    seen = {}
    duplicates = []
    for path in _model_files():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            duplicates.append((str(seen[digest].relative_to(ROOT)), str(path.relative_to(ROOT))))
        seen.setdefault(digest, path)
    assert duplicates == [], f"byte-identical model files: {duplicates}"


def test_models_stay_small():
    sizes = {str(p.relative_to(ROOT)): os.path.getsize(p) for p in _model_files()}
    too_big = {name: size for name, size in sizes.items() if size > MAX_MODEL_BYTES}
    assert too_big == {}, f"model files over {MAX_MODEL_BYTES} bytes (commit binary layers packed): {too_big}"
    total = sum(sizes.values())
    assert total <= MODELS_BUDGET_BYTES, (
        f"experiments/models holds {total} bytes, over the {MODELS_BUDGET_BYTES}-byte budget; "
        "drop superseded models or raise the budget on purpose")


def test_every_result_folder_is_referenced():
    text = _reference_texts()
    orphans = sorted(p.name for p in RESULTS.iterdir() if p.is_dir() and p.name not in text)
    assert orphans == [], f"result folders referenced from no README, doc or experiment script: {orphans}"
