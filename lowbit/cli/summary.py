"""``lowbit summary``: the per-layer table of a trained or packed model (:mod:`lowbit.summary`)."""
from __future__ import annotations

import os


def summary_command(path, profile=False, batch_size=100, repeats=5, out=print):
    """``lowbit summary MODEL.npz [--profile]``: print the summary of a trained or packed model file.

    Returns the :class:`~lowbit.summary.Summary`.
    """
    from ..packed import load_any
    from ..summary import summarize

    model = load_any(path)
    result = summarize(model, profile=profile, batch_size=batch_size, repeats=repeats,
                       file_size=os.path.getsize(path))
    out(result.table())
    return result


def cmd_summary(args):
    summary_command(args.model, profile=args.profile, batch_size=args.batch_size, repeats=args.repeats)
    return 0


def add_parser(sub):
    p = sub.add_parser("summary", help="per-layer table of a trained or packed model")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("--profile", action="store_true", help="also measure the time of every layer")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=cmd_summary)
