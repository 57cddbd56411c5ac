"""``grmpiqa export CKPT --format onnx --out model.onnx``: the whole scorer as one graph."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grmpiqa.cli.common import CHECKPOINT_HELP, add_backbone_args, model_from_args
from grmpiqa.errors import GrmpiqaError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="export a checkpoint's scorer (e.g. to ONNX for onnxruntime)",
        description="Write the whole scorer of a checkpoint as one graph: input 'image', a "
        "preprocessed float32 batch [N, 3, 224, 224] (resize 244 bicubic, aspect not kept, "
        "centre crop 224, ImageNet mean/std: the values are in the graph's metadata), output "
        "'p', float32 [N], p(high quality); the prompts' text features are baked in; the batch "
        "axis is dynamic. The graph's metadata also carries the backbone, weights identity "
        "and the MOS map. Needs pip install 'grmpiqa[onnx]'. See docs/export.md.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help=CHECKPOINT_HELP.split(" (default")[0])
    p.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (default)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, e.g. model.onnx")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    add_backbone_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.export import _require_onnx, check_onnx, export_onnx

    out = Path(args.out)
    if out.is_dir():
        raise GrmpiqaError(f"{out}: is a folder; --out needs a file name")
    _require_onnx()  # before loading a model: one line naming the extra
    if args.device not in ("cpu", "auto"):  # auto: the CPU here
        raise GrmpiqaError("--device: the export runs on the CPU (the graph runs anywhere)")
    args.device = "cpu"
    model = model_from_args(args, checkpoint=args.checkpoint)
    print(f"grmpiqa: exporting {model.describe()} to {out} (ONNX)", file=sys.stderr)
    export_onnx(model, out, opset=args.opset)
    print(f"grmpiqa: wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    diff = check_onnx(model, out)
    if diff is not None:
        print(
            f"grmpiqa: onnxruntime agrees with torch: max |p diff| {diff:.2g} on 3 random inputs",
            file=sys.stderr,
        )
    return 0
