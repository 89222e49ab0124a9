"""``lowbit train``: train a model from :data:`lowbit.zoo.MODELS` on MNIST (checkpoints, ``--resume``;
data-parallel under ``mpiexec -n N``, :mod:`lowbit.distributed`)."""
from __future__ import annotations

import json
import os
import time

from ..device import DEVICES
from .common import count, positive_seconds


def _model_options(pairs):
    """Parse ``key=value`` pairs (values as JSON where possible) for a model builder."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"lowbit: --model-option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _schedule(args, epochs):
    from ..schedules import build_schedule

    return build_schedule(args.schedule, args.lr, epochs, lr_end=args.lr_end, step_size=args.step_size,
                          gamma=args.gamma)


def cmd_train(args):
    from ..data import float_images as _float_images
    from ..data import load_mnist
    from ..optimizers import get_optimizer
    from ..recipes import fit_stages, recipe_config, recipe_loss, recipe_optimizer, recipe_teacher
    from ..trainer import Trainer, write_json_atomic
    from ..distributed import get_comm
    from ..zoo import build_model

    from ..io import check_output_path

    check_output_path(args.out, "--out", folder=True)  # before training, not after it
    comm = get_comm(args.comm, timeout=args.comm_timeout)  # before any work: NCCL picks the rank's GPU
    augment = args.augment  # an Augment, or None for none (lowbit.augment.augment_option)
    model = build_model(args.model, seed=args.seed, **_model_options(args.model_option))
    loss = recipe_loss(args, args.loss)
    teacher = recipe_teacher(args, args.device, model.input_shape)
    mnist = load_mnist(progress=not args.quiet and comm.is_root)
    x_train, y_train = _float_images(mnist.x_train), mnist.y_train
    x_test, y_test = _float_images(mnist.x_test), mnist.y_test
    x_val = y_val = None
    if args.val:
        from ..data import train_val_split

        x_train, y_train, x_val, y_val = train_val_split(x_train, y_train, args.val, args.seed)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    def make_trainer(net, epochs, out_dir, time_budget):
        optimizer = (recipe_optimizer(args, args.lr) if args.optimizer == "bop"
                     else get_optimizer(args.optimizer, lr=args.lr))
        return Trainer(net, loss, optimizer, _schedule(args, epochs), epochs=epochs,
                       batch_size=args.batch_size, augment=augment, seed=args.seed, out_dir=out_dir,
                       device=args.device, progress=not args.quiet, precision=args.precision,
                       time_budget=time_budget, teacher=teacher,
                       comm=comm, sync_batchnorm=args.sync_bn)

    t0 = time.perf_counter()
    trainer, stage1 = fit_stages(model, make_trainer, args.epochs, (x_train, y_train, x_val, y_val, x_test, y_test),
                                 out_dir=args.out, stages=args.stages, time_budget=args.time_budget,
                                 resume=args.resume)
    history = trainer.history
    if not comm.is_root:  # rank 0 reports and writes
        return 0
    acc = model.evaluate(x_test, y_test)
    summary = {"model": args.model, "epochs": trainer.epochs, "seed": args.seed, "test_acc": acc,
               "seconds": time.perf_counter() - t0, "recipe": recipe_config(args), "stage1": stage1,
               "history": history,
               **({"ranks": comm.size, "communicator": comm.name, **comm.stats()} if comm.size > 1 else {})}
    write_json_atomic(os.path.join(args.out, "result.json"), summary)
    print(f"test accuracy {acc:.4%}; model saved to {os.path.join(args.out, 'model.npz')}")
    return 0


def add_parser(sub):
    from ..augment import augment_option
    from ..losses import LOSSES
    from ..optimizers import OPTIMIZERS, SCHEDULES
    from ..recipes import add_recipe_arguments
    from ..zoo import MODELS

    p = sub.add_parser("train", help="train a model on MNIST")
    p.add_argument("--model", default="deep_convnet", choices=sorted(MODELS))
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="builder option, e.g. hidden=[1024,1024] (repeatable)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--loss", default="cross_entropy", choices=list(LOSSES))
    p.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--schedule", default="constant", choices=sorted(SCHEDULES))
    p.add_argument("--lr-end", type=float, default=0.0, help="final lr (exponential, cosine)")
    p.add_argument("--step-size", type=int, default=10, help="epochs per step (step schedule)")
    p.add_argument("--gamma", type=float, default=0.1, help="decay factor (step schedule)")
    p.add_argument("--augment", type=augment_option, default=None,
                   help='e.g. "shift=2,rotate=10,scale=0.1" (off by default; "none" also means off)')
    p.add_argument("--val", type=count, default=0, help="hold out this many training images for validation")
    p.add_argument("--limit", type=count, default=0, help="train on the first N images only (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--precision", default="fp32", choices=["fp32", "mixed16"],
                   help="mixed16: float16 passes, float32 master weights, dynamic loss scaling")
    p.add_argument("--out", default="runs/train", help="folder for checkpoints, history and model.npz")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--time-budget", type=positive_seconds, default=None, metavar="SECONDS",
                   help="train as many epochs as fit in SECONDS (at most --epochs; lowbit.Trainer time_budget)")
    add_recipe_arguments(p, optimizer=False)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--comm", default="auto", choices=["auto", "single", "mpi", "nccl"],
                   help="data-parallel communicator: auto (MPI when started by mpiexec with several ranks), "
                        "single, mpi (numpy), nccl (CuPy on GPUs); --batch-size is then the global batch")
    p.add_argument("--comm-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long a rank waits for the others before ending the run with an error "
                        "(longer than rank 0's evaluation and checkpoint)")
    p.add_argument("--sync-bn", action="store_true",
                   help="with several ranks: BatchNorm statistics of the global batch, not each rank's")
    p.set_defaults(func=cmd_train)
