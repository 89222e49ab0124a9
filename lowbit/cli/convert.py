"""``lowbit convert``: a trained quantized model file -> a packed file, checked against the simulation."""
from __future__ import annotations

import os

import numpy as np

from .common import check_limit, count, file_size, human_size


def convert_command(model_path, out_path, limit=0, verify=True, allow_inexact=False, data=None, out=print,
                    progress=True):
    """``lowbit convert``: convert a trained quantized model file to a packed file and check it.

    Prints both files' sizes and, with ``verify``, the MNIST test accuracy of both and how many of
    the labels agree (all of them) and the largest score difference.  Returns a dict of those.
    A float model (no quantized layer) is refused: it has nothing to pack, ``lowbit quantize`` is
    the command for it.  ``progress``: steps on stderr and progress bars over the test images.
    """
    from ..convert import convert
    from ..data import float_images
    from ..io import check_output_path, load_model
    from ..progress import batched_scores, step
    from ..quant_layers import QuantActivation, QuantAffine, QuantConv2D

    check_limit(limit)
    check_output_path(out_path, "-o/--output")  # before the work, not after it
    model = load_model(model_path)
    if not any(isinstance(layer, (QuantAffine, QuantConv2D, QuantActivation)) for _, layer in model.named_layers()):
        raise ValueError(f"{os.fspath(model_path)} is a float model (no quantized layer): convert has nothing to "
                         f"pack; quantize it instead: lowbit quantize {os.fspath(model_path)} -o OUT.npz "
                         "--weight-bits 1 --activation-bits 1 (or other bits)")
    mnist = None
    if verify:  # before the work: without MNIST it stops here, having written nothing
        from ..data import load_mnist

        mnist = data if data is not None else load_mnist(progress=False)
    step(f"converting {os.fspath(model_path)}", progress)
    packed = convert(model, allow_inexact=allow_inexact)
    packed.save(out_path, metadata={"source_file": os.path.basename(os.fspath(model_path))})
    size_before, size_after = file_size(model_path), file_size(out_path)
    result = {"size_before": size_before, "size_after": size_after, "ratio": size_before / size_after,
              "notes": list(packed.notes)}
    out(f"{os.fspath(model_path)}: {human_size(size_before)} -> {os.fspath(out_path)}: {human_size(size_after)} "
        f"({size_before / size_after:.1f}x smaller)")
    if verify:
        x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
        if limit:
            x_test, y_test = x_test[:limit], y_test[:limit]
        sim = batched_scores(model, x_test, desc="simulation", progress=progress)
        got = batched_scores(packed, x_test, desc="packed model", progress=progress)
        result.update(_agreement(sim, got, y_test))
        out(f"test accuracy: simulation {result['accuracy_simulation']:.2%}, packed "
            f"{result['accuracy_packed']:.2%}; labels equal {result['labels_equal']}/{len(y_test)}; "
            f"max |score difference| {result['max_abs_score_difference']:.3g}"
            f"{' (identical)' if result['scores_identical'] else ''}")
    for line in packed.notes:
        out(f"note: {line}")
    return result


def _agreement(sim, got, y_test):
    """Accuracies of the simulation's and the packed model's scores, and how far they are apart."""
    return {
        "count": int(len(y_test)),
        "accuracy_simulation": float((sim.argmax(axis=1) == y_test).mean()),
        "accuracy_packed": float((got.argmax(axis=1) == y_test).mean()),
        "labels_equal": int((sim.argmax(axis=1) == got.argmax(axis=1)).sum()),
        "max_abs_score_difference": float(np.max(np.abs(sim - got))) if len(y_test) else 0.0,
        "scores_identical": bool(np.array_equal(sim, got)),
    }


def cmd_convert(args):
    convert_command(args.model, args.output, limit=args.limit, allow_inexact=args.allow_inexact,
                    progress=not args.quiet)
    return 0


def add_parser(sub):
    p = sub.add_parser("convert", help="trained quantized model -> packed model (checked exact)")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.add_argument("--limit", type=count, default=0, help="check on the first N test images only")
    p.add_argument("--allow-inexact", action="store_true",
                   help="fuse scaled binary layers whose float rounding may differ in rare cases")
    p.add_argument("--quiet", action="store_true", help="no step lines or progress bars")
    p.set_defaults(func=cmd_convert)
