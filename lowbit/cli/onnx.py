"""``lowbit import`` (an ONNX model -> a lowbit model file) and ``lowbit export`` (a trained, quantized
or packed model -> ONNX with standard ops; :mod:`lowbit.onnx_io`)."""
from __future__ import annotations

import os


def cmd_import(args):
    from ..io import check_output_path, save_model
    from ..onnx_io import load_onnx

    check_output_path(args.output, "-o/--output")
    model = load_onnx(args.model)
    save_model(model, args.output, metadata=model.metadata)
    print(f"{args.model}: {len(model.layers)} top-level layers, {model.num_parameters():,} parameters, "
          f"input {model.input_shape}; saved to {args.output}")
    return 0


def cmd_export(args):
    from ..io import check_output_path
    from ..onnx_io import export_onnx
    from ..packed import load_any

    check_output_path(args.output, "-o/--output")
    model = load_any(args.model)
    export_onnx(model, args.output, opset=args.opset, batchnorm=args.batchnorm)
    print(f"{args.model} -> {args.output} (ONNX opset {args.opset}, {os.path.getsize(args.output):,} bytes)")
    return 0


def add_parsers(sub):
    p = sub.add_parser("import", help="an ONNX model (NCHW, float32) -> a lowbit model file")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="a trained, quantized or packed model -> ONNX (standard ops)")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset, 13..21 (default 13)")
    p.add_argument("--batchnorm", choices=["folded", "op"], default="folded",
                   help="BatchNorm as Sub/Mul/Mul/Add, bit for bit lowbit's arithmetic (folded, default), "
                        "or as one BatchNormalization node (op)")
    p.set_defaults(func=cmd_export)
