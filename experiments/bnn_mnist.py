"""Binarized Neural Networks on MNIST (Courbariaux, Hubara et al. 2016, arXiv 1602.02830).

Configurations (``--config``):

``mlp_det``    the paper's MLP (784-4096-4096-4096-10, binary weights and activations in every
               hidden layer, BatchNorm eps 1e-4, dropout 0.2/0.5, squared hinge loss, Adam with the
               learning rate decaying exponentially, latent weights U(-1, 1) clipped to [-1, 1], per-layer
               Glorot learning-rate factor), deterministic binarization.  Target: >= 99.04% (the
               paper's 0.96% error, Theano).
``mlp_stoch``  the same with stochastic binarization of the weights in training (the paper's code);
               deterministic sign at evaluation.
``cnn``        ``lowbit.zoo.binary_cnn``: binary weights and activations in every inner convolution and
               the hidden affine layer, 8-bit input layer, float last layer.  Target: >= 99.3%.

The test accuracy reported is that of the epoch with the best validation accuracy (the paper's rule;
validation = 10,000 training images held out by ``--seed``).  Each run checkpoints every epoch in
``--runs`` and resumes when the same command is run again.  The best model is converted to a packed
model (binary layers as bits, BatchNorm+sign as integer thresholds), checked to predict exactly what
the float simulation predicts on all 10,000 test images, and committed as
``runs/models/bnn_<config>.npz``; results go to ``runs/results/bnn_<config>.json``.

Usage::

    python experiments/bnn_mnist.py --config cnn --epochs 20
    python experiments/bnn_mnist.py --config mlp_det --epochs 100 --lr 3e-3 --lr-end 3e-7

Recipes (``docs/recipes.md``): ``--teacher MODEL.npz`` (distillation, ``--temperature``,
``--distill-weight``), ``--label-smoothing`` (with ``--loss cross_entropy`` for the MLPs),
``--optimizer bop``, ``--stages E1,E2`` (two-stage training), ``--rsign`` (learned sign thresholds).
The results also give the best test epoch beside the validation-chosen one.
"""
from __future__ import annotations

import argparse
import os
import time

import lowbit
from lowbit.augment import augment_option
from lowbit.data import load_mnist, mnist_splits
from lowbit.draws import DRAWS
from lowbit.optimizers import ExponentialLR
from lowbit.recipes import (add_recipe_arguments, best_test_epoch, fit_stages, recipe_config, recipe_loss,
                            recipe_optimizer, recipe_tag, recipe_teacher)
from lowbit.trainer import Trainer, write_json_atomic
from lowbit.zoo import binary_cnn, bnn_mlp

from _common import (HERE, add_budget_arguments, add_eval_limit_argument, add_output_arguments, command_line,
                     environment)


def _paper_mlp(stochastic):
    """The paper's MLP recipe; ``stochastic``: which binarizations are stochastic in training."""
    return {"build": lambda seed, width, init, dropout, draws, rsign=False: bnn_mlp(
                seed, hidden=(width,) * 3, stochastic=stochastic, init=init, draws=draws, rsign=rsign),
            "loss": "squared_hinge", "lr": 3e-3, "lr_end": 3e-7, "target": 0.9904, "width": 4096,
            "init": "uniform"}


CONFIGS = {
    "mlp_det": _paper_mlp(False),  # the builders take rsign= (lowbit.reactnet.RSign for every sign)
    "mlp_stoch": _paper_mlp("weights"),
    "cnn": {"build": lambda seed, width, init, dropout, draws, rsign=False: binary_cnn(
                seed, init=init, dropout=dropout, rsign=rsign),
            "loss": "cross_entropy", "lr": 1e-3,
            "lr_end": 1e-5, "target": 0.993, "width": None, "init": "glorot"},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=None, help="initial lr (default: the config's)")
    parser.add_argument("--lr-end", type=float, default=None, help="final lr of the exponential decay")
    parser.add_argument("--width", type=int, default=None, help="hidden width of the MLPs (default 4096)")
    parser.add_argument("--init", choices=("uniform", "glorot"), default=None,
                        help="latent-weight init of the binary layers (default: the config's; the paper's "
                             "U(-1, 1) for the MLPs, 'glorot' suits short runs)")
    parser.add_argument("--augment", default="", type=augment_option,
                        help="training augmentation, e.g. 'shift=2,rotate=10,scale=0.1' (lowbit.augment.Augment; "
                             "default none)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="cnn only: dropout before the last layer (default 0)")
    parser.add_argument("--bn-recalibrate", type=int, default=0,
                        help="after every epoch set the BatchNorm statistics from this many training images "
                             "(lowbit.trainer.recalibrate_batchnorm; default 0: the running averages)")
    parser.add_argument("--draws", choices=DRAWS, default="generator",
                        help="MLPs: random numbers of dropout and stochastic binarization from the host "
                             "generator (default) or computed on the device from one key per step "
                             "('counter', lowbit.draws: for --device gpu)")
    parser.add_argument("--loss", choices=("cross_entropy", "squared_hinge"), default=None,
                        help="training loss (default: the config's; squared_hinge for the MLPs)")
    parser.add_argument("--rsign", action="store_true",
                        help="learned sign thresholds (ReActNet's RSign) in place of the plain signs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="train on the CPU (numpy) or a CUDA GPU (CuPy); default cpu")
    parser.add_argument("--limit", type=int, default=0, help="train on N images only (smoke runs)")
    parser.add_argument("--name", default=None,
                        help="name of the run, its model and results files (default: from the config and "
                             "options, e.g. bnn_mlp_det)")
    add_eval_limit_argument(parser)
    add_budget_arguments(parser)
    add_recipe_arguments(parser)
    add_output_arguments(parser, "runs", "results", "models")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    loss_name = args.loss or cfg["loss"]
    if args.label_smoothing and loss_name != "cross_entropy":
        parser.error(f"--label-smoothing needs the cross_entropy loss, got {loss_name} (add --loss cross_entropy)")
    epochs = args.stages[1] if args.stages else args.epochs
    lr = args.lr or cfg["lr"]
    lr_end = args.lr_end or cfg["lr_end"]
    width = args.width or cfg["width"]
    init = args.init or cfg["init"]
    if args.dropout and args.config != "cnn":
        parser.error(f"--dropout applies to --config cnn only (the MLPs use the paper's 0.2/0.5), "
                     f"got --config {args.config}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.bn_recalibrate < 0:
        parser.error(f"--bn-recalibrate must be >= 0, got {args.bn_recalibrate}")
    if args.draws != "generator" and args.config == "cnn":
        parser.error(f"--draws applies to the MLP configs, got --config {args.config}")
    augment = args.augment

    x_train, y_train, x_val, y_val, x_test, y_test = mnist_splits(load_mnist(progress=not args.quiet), 10000,
                                                                   args.seed, args.limit, args.eval_limit)

    model = cfg["build"](args.seed, width, init, args.dropout, args.draws, rsign=args.rsign)
    name = (f"bnn_{args.config}" + (f"_w{width}" if width and width != cfg["width"] else "")
            + (f"_{init}" if init != cfg["init"] else "") + ("_aug" if augment else "")
            + (f"_drop{args.dropout:g}" if args.dropout else "")
            + (f"_bn{args.bn_recalibrate}" if args.bn_recalibrate else "")
            + (f"_{args.draws}" if args.draws != "generator" else "")
            + (f"_{loss_name}" if loss_name != cfg["loss"] else "") + ("_rsign" if args.rsign else "")
            + recipe_tag(args)
            + (f"_limit{args.limit}" if args.limit else "")
            + (f"_eval{args.eval_limit}" if args.eval_limit else ""))
    name = args.name or name
    run_dir = os.path.join(args.runs, f"{name}_seed{args.seed}")
    loss = recipe_loss(args, loss_name)
    teacher = recipe_teacher(args, args.device, model.input_shape)

    def make_trainer(net, stage_epochs, out_dir, time_budget):
        return Trainer(net, loss, recipe_optimizer(args, lr), ExponentialLR(lr, lr_end, stage_epochs),
                       epochs=stage_epochs, batch_size=100, augment=augment, seed=args.seed, out_dir=out_dir,
                       progress=not args.quiet, bn_recalibrate=args.bn_recalibrate, device=args.device,
                       time_budget=time_budget, checkpoint_every=args.checkpoint_every, teacher=teacher)

    t0 = time.perf_counter()
    trainer, stage1 = fit_stages(model, make_trainer, args.epochs, (x_train, y_train, x_val, y_val, x_test, y_test),
                                 out_dir=run_dir, stages=args.stages, time_budget=args.time_budget)
    history = trainer.history
    wall = time.perf_counter() - t0
    test_epoch, test_best = best_test_epoch(history)

    best = lowbit.load_model(os.path.join(run_dir, "best.npz"))
    best_epoch = best.metadata["epoch"]
    sim_labels = best.predict(x_test)
    sim_acc = float((sim_labels == y_test).mean())
    packed = lowbit.convert(best)
    packed_labels = packed.predict(x_test)
    packed_path = os.path.join(args.models, f"{name}.npz")
    packed.save(packed_path)
    float_path = os.path.join(run_dir, "best.npz")
    result = {
        "experiment": name, "config": args.config, "seed": args.seed, "epochs": trainer.epochs,
        "max_epochs": epochs, "time_budget": args.time_budget,
        "loss": loss_name, "rsign": args.rsign, "recipe": recipe_config(args),
        "stage1": stage1, "lr": lr, "lr_end": lr_end, "width": width, "init": init,
        "augment": augment.config() if augment else None, "dropout": args.dropout,
        "bn_recalibrate": args.bn_recalibrate, "draws": args.draws, "limit": args.limit,
        "eval_limit": args.eval_limit,
        "best_epoch": best_epoch, "val_acc_at_best": best.metadata["val_acc"],
        "test_acc": sim_acc, "target": cfg["target"],
        "best_test_epoch": test_epoch, "test_acc_at_best_test_epoch": test_best,
        "packed_test_acc": float((packed_labels == y_test).mean()),
        "packed_labels_equal": int((packed_labels == sim_labels).sum()),
        "packed_stages": [stage.kind for stage in packed.stages], "packed_notes": packed.notes,
        "packed_file_bytes": os.path.getsize(packed_path),
        "float_file_bytes": os.path.getsize(float_path),
        "wall_seconds_this_run": wall, "history": history,
        "model": os.path.relpath(packed_path, os.path.dirname(HERE)),
        "command": command_line(__file__, argv), "environment": environment(),
    }
    write_json_atomic(os.path.join(args.results, f"{name}.json"), result)
    print(f"{name}: test accuracy {sim_acc:.4%} at the best validation epoch {best_epoch} "
          f"(target {cfg['target']:.2%}); packed model equal on {result['packed_labels_equal']}/"
          f"{len(y_test)} labels, {result['packed_file_bytes'] / 1e6:.2f} MB "
          f"({result['float_file_bytes'] / result['packed_file_bytes']:.1f}x smaller)")
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
