"""``lowbit eval``: test accuracy of saved or packed models (several files: each, and their ensemble)."""
from __future__ import annotations

import hashlib
import os
import shlex

from .common import count


class _Scored:
    """A model's scores on the test images, computed once: the ensemble reuses them."""

    def __init__(self, scores):
        self.scores = scores

    def predict_scores(self, x, batch_size=100):
        return self.scores


def cmd_eval(args):
    from ..data import float_images as _float_images
    from ..data import load_mnist
    from ..ensemble import Ensemble
    from ..io import check_output_path
    from ..packed import load_any
    from ..progress import batched_scores

    if args.json:
        check_output_path(args.json, "--json")  # before the work, not after it
    loaded = [load_any(path) for path in args.models]  # every file checked before any is evaluated
    mnist = load_mnist(progress=not args.quiet)
    x_test, y_test = _float_images(mnist.x_test), mnist.y_test
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    models, rows = [], []
    for path, model in zip(args.models, loaded):  # trained model files or packed ones
        scores = batched_scores(model, x_test, desc=os.path.basename(path), progress=not args.quiet)
        acc = float((scores.argmax(axis=1) == y_test).mean())
        print(f"{path}: test accuracy {acc:.4%} on {len(y_test)} images")
        models.append(_Scored(scores))
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        rows.append({"file": path, "sha256": digest, "bytes": os.path.getsize(path), "test_accuracy": acc,
                     "metadata": getattr(model, "metadata", None) or {}})
    ensemble_acc = None
    if len(models) > 1:
        ensemble_acc = Ensemble(models).evaluate(x_test, y_test)
        print(f"ensemble of {len(models)} (mean softmax): test accuracy {ensemble_acc:.4%}")
    if args.json:
        from ..trainer import write_json_atomic

        command = ["lowbit", "eval", *args.models] + (["--limit", str(args.limit)] if args.limit else [])
        write_json_atomic(args.json, {"command": " ".join(shlex.quote(a) for a in command + ["--json", args.json]),
                                      "test_images": int(len(y_test)), "models": rows,
                                      "ensemble_test_accuracy": ensemble_acc})
        print(f"wrote {args.json}")
    return 0


def add_parser(sub):
    p = sub.add_parser("eval", help="test accuracy of saved or packed models (and of their ensemble)")
    p.add_argument("models", nargs="+", metavar="MODEL.npz")
    p.add_argument("--limit", type=count, default=0, help="evaluate the first N test images only")
    p.add_argument("--json", metavar="PATH", help="also write the accuracies (and each file's sha256) to PATH")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)
