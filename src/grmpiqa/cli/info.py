"""``grmpiqa info CKPT``: the model card of a checkpoint (also ``hf-hub:`` and released files)."""

from __future__ import annotations

import argparse
import json

from grmpiqa.cli.common import pretrained_arg


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "info",
        help="print the model card of a checkpoint",
        description="Print what a checkpoint is: backbone and weights identity, prompts, what "
        "was trained on which data, the p -> MOS map and its fit (RMSE, R2, range; a warning "
        "when poor), the recorded figures (final training figures, held-out images), the "
        "preprocessing and the grmpiqa version. Reads the metadata only (no backbone weights "
        "are loaded); CKPT may be a grmpiqa .safetensors file, an authors' released .pt file or "
        "hf-hub:OWNER/REPO/FILE.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or hf-hub:OWNER/REPO/FILE")
    p.add_argument("--json", action="store_true", help="print the whole metadata record as JSON")
    p.add_argument(
        "--backbone", default=None, help="released files: the backbone they are converted onto"
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="released files: the base weights (tag or file) they are converted with",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.card import card_rows, format_card, read_card

    meta, _ = read_card(
        args.checkpoint, backbone=args.backbone, pretrained=pretrained_arg(args.pretrained)
    )
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
    else:
        print(format_card(card_rows(meta, args.checkpoint)))
    return 0
