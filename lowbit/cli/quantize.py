"""``lowbit quantize``: post-training quantization of a float model file to a packed file.

The activation ranges are calibrated on the images :func:`lowbit.ptq.calibration_images` picks (the
rule ``lowbit sweep`` uses too): the first ``--calibrate`` training images left after a ``--val``
validation split by ``--seed``.
"""
from __future__ import annotations

import os

import numpy as np

from .common import DeprecatedAliases, check_limit, count, file_size, human_size

#: The calibration rule, as both commands' ``--help`` state it.
CALIBRATION_RULE = ("the first N training images left after holding out the --val validation images "
                    "(default 10000; lowbit.data.train_val_split by the seed: --seed, or each of a sweep's "
                    "--seeds); lowbit quantize and lowbit sweep's PTQ points share this rule "
                    "(lowbit.ptq.calibration_images)")


def quantize_command(model_path, weight_bits, activation_bits, out_path, calibrate=1000, per_channel=True,
                     keep_first=True, keep_last=True, percentile=100.0, limit=0, seed=0, verify=True,
                     data=None, out=print, weight_clipping="mse", activation_clipping="mse", progress=True,
                     val_size=None):
    """``lowbit quantize``: post-training quantization of a saved float model to a packed file.

    Loads ``model_path``, quantizes it (:func:`lowbit.ptq.post_training_quantize`, activation ranges
    on ``calibrate`` training images picked by :func:`lowbit.ptq.calibration_images`), converts it
    (:func:`lowbit.convert.convert`), saves the packed model to ``out_path``, and prints the MNIST
    test accuracy before and after and both file sizes.  With ``verify`` it also runs the quantized
    simulation and reports how many labels agree with the packed model (all of them, by construction).

    Parameters
    ----------
    model_path, out_path : path
    weight_bits, activation_bits : int
        1..8, 16 or 32.
    calibrate : int
        Number of training images for the activation ranges (0: none; k-bit activations need some).
    val_size : int, optional
        Training images held out (by ``seed``) before the calibration images are taken (default
        :data:`lowbit.ptq.CALIBRATION_VAL_SIZE`, the sweep's default).
    limit : int
        Evaluate on the first ``limit`` test images only (0: all 10,000).
    weight_clipping, activation_clipping : "mse" or "max"
        As in :func:`lowbit.ptq.post_training_quantize`.
    data : MNIST, optional
        Preloaded data set (default :func:`lowbit.data.load_mnist`).
    out : callable
        Where the report lines go (default ``print``).
    progress : bool
        Announce each step on stderr and show progress bars over the test images.

    Returns
    -------
    dict
        ``accuracy_before``, ``accuracy_after``, ``size_before``, ``size_after``, ``ratio``,
        ``labels_equal`` (with ``verify``), ``count``, ``notes``.
    """
    from ..convert import convert
    from ..data import float_images, load_mnist
    from ..io import check_output_path, load_model
    from ..progress import batched_scores, step
    from ..ptq import CALIBRATION_VAL_SIZE, check_activation_clipping, check_bit_width, check_weight_clipping

    val_size = CALIBRATION_VAL_SIZE if val_size is None else val_size
    weight_bits = check_bit_width("weight_bits", weight_bits)  # before the data set is loaded
    activation_bits = check_bit_width("activation_bits", activation_bits)
    check_weight_clipping(weight_clipping)  # before the data set is loaded
    check_activation_clipping(activation_clipping, percentile)
    check_limit(limit)
    check_output_path(out_path, "-o/--output")  # before the work, not after it
    model = load_model(model_path)
    mnist = data if data is not None else load_mnist(progress=False)
    x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if limit:
        x_test, y_test = x_test[:limit], y_test[:limit]
    settings = {"weight_bits": int(weight_bits), "activation_bits": int(activation_bits),
                "per_channel": bool(per_channel), "calibration_images": int(calibrate),
                "calibration_val_size": int(val_size), "percentile": float(percentile), "seed": int(seed),
                "weight_clipping": weight_clipping, "activation_clipping": activation_clipping}
    twin = _quantize(model, os.fspath(model_path), mnist.x_train, settings, keep_first, keep_last, progress)
    step("converting the quantized model to a packed one", progress)
    packed = convert(twin)
    packed.save(out_path, metadata={"source_file": os.path.basename(os.fspath(model_path)),
                                    "post_training_quantization": settings})
    before = float((batched_scores(model, x_test, desc="float model", progress=progress).argmax(axis=1)
                    == y_test).mean())
    scores = batched_scores(packed, x_test, desc="packed model", progress=progress)
    after = float((scores.argmax(axis=1) == y_test).mean())
    size_before, size_after = file_size(model_path), file_size(out_path)
    result = {"accuracy_before": before, "accuracy_after": after, "size_before": size_before,
              "size_after": size_after, "ratio": size_before / size_after, "count": int(len(y_test)),
              "notes": list(packed.notes)}
    out(f"float model      {os.fspath(model_path)}: test accuracy {before:.2%} on {len(y_test)} images, "
        f"{human_size(size_before)}")
    out(f"w{weight_bits}a{activation_bits} packed     {os.fspath(out_path)}: test accuracy {after:.2%}, "
        f"{human_size(size_after)} ({size_before / size_after:.1f}x smaller)")
    if verify:
        sim = batched_scores(twin, x_test, desc="quantized simulation", progress=progress).argmax(axis=1)
        result["labels_equal"] = int((sim == scores.argmax(axis=1)).sum())
        out(f"packed vs quantized simulation: {result['labels_equal']}/{len(y_test)} labels equal")
    for line in packed.notes:
        out(f"note: {line}")
    return result


def _quantize(model, name, train_images, settings, keep_first, keep_last, progress):
    """The quantized twin of ``model`` with ``settings`` (those saved in the packed file's metadata),
    calibrated on :func:`lowbit.ptq.calibration_images` of ``train_images``."""
    from ..progress import step
    from ..ptq import calibration_images, post_training_quantize

    count, val_size, seed = settings["calibration_images"], settings["calibration_val_size"], settings["seed"]
    step(f"quantizing {name} to w{settings['weight_bits']}a{settings['activation_bits']}"
         + (f" (activation ranges from the first {count} training images after a {val_size}-image "
            f"validation split, seed {seed})" if count else ""), progress)
    calibration = calibration_images(train_images, count, seed, val_size=val_size) if count else None
    return post_training_quantize(model, settings["weight_bits"], settings["activation_bits"], calibration,
                                  per_channel=settings["per_channel"], keep_first=keep_first, keep_last=keep_last,
                                  percentile=settings["percentile"], seed=seed,
                                  weight_clipping=settings["weight_clipping"],
                                  activation_clipping=settings["activation_clipping"])


def cmd_quantize(args):
    quantize_command(args.model, args.weight_bits, args.activation_bits, args.output,
                     calibrate=args.calibrate, per_channel=not args.per_tensor,
                     percentile=args.percentile, limit=args.limit, seed=args.seed,
                     weight_clipping=args.weight_clipping, activation_clipping=args.activation_clipping,
                     progress=not args.quiet, val_size=args.val)
    return 0


def add_clipping_arguments(parser, act_max="the maximum"):
    """``--weight-clipping`` and ``--activation-clipping``, the ranges of post-training quantization
    (:func:`lowbit.ptq.post_training_quantize`); ``act_max`` says what "max" means for the
    activations.  Shared by ``lowbit quantize`` and ``lowbit sweep``."""
    from ..ptq import ACTIVATION_CLIPPINGS, WEIGHT_CLIPPINGS

    parser.add_argument("--weight-clipping", choices=WEIGHT_CLIPPINGS, default="mse",
                        help="PTQ's 2..8-bit weights: clip to the range of least squared error (mse, "
                             "default) or keep the full max-abs range (max)")
    parser.add_argument("--activation-clipping", choices=ACTIVATION_CLIPPINGS, default="mse",
                        help="PTQ's 2..8-bit activations: calibrated range of least squared error (mse, "
                             f"default) or {act_max} (max)")


def add_parser(sub):
    from ..ptq import CALIBRATION_VAL_SIZE

    p = sub.add_parser("quantize", help="post-training quantization of a float model to a packed file")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.add_argument("--weight-bits", "--weights", dest="weight_bits", type=int, required=True, metavar="BITS",
                   action=DeprecatedAliases, deprecated=("--weights",),
                   help="weight bits: 1..8, 16 or 32 (--weights: the old name, deprecated)")
    p.add_argument("--activation-bits", "--activations", dest="activation_bits", type=int, required=True,
                   metavar="BITS", action=DeprecatedAliases, deprecated=("--activations",),
                   help="activation bits: 1..8, 16 or 32 (--activations: the old name, deprecated)")
    p.add_argument("--calibrate", type=count, default=1000, metavar="N",
                   help=f"training images that calibrate the activation ranges (default 1000): {CALIBRATION_RULE}")
    p.add_argument("--val", type=count, default=CALIBRATION_VAL_SIZE, metavar="N",
                   help="training images held out before the calibration images are taken (default %(default)s, "
                        "as lowbit sweep)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per layer, not per channel")
    p.add_argument("--percentile", type=float, default=100.0,
                   help="with --activation-clipping max: this percentile of |activation| (100 = max)")
    add_clipping_arguments(p, "the --percentile of |activation|")
    p.add_argument("--limit", type=count, default=0, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0,
                   help="the validation split's seed (which images calibrate) and the twin's generators")
    p.add_argument("--quiet", action="store_true", help="no step lines or progress bars")
    p.set_defaults(func=cmd_quantize)
