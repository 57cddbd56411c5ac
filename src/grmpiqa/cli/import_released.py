"""``grmpiqa import-released FILE.pt --out CKPT.safetensors``: convert the authors' files."""

from __future__ import annotations

import argparse
import sys

from grmpiqa.cli.common import pretrained_arg
from grmpiqa.config import DEFAULT_BACKBONE, DEFAULT_PRETRAINED


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "import-released",
        help="convert a checkpoint saved by the authors' GRMP-IQA code",
        description="Read a state dict saved by the authors' released GRMP-IQA code (OpenAI CLIP "
        "layout under image_encoder./text_encoder., prompt_learner2.ctx, VPT prompts; possibly "
        "nested under 'state_dict' and prefixed 'module.') and write a grmpiqa checkpoint with "
        "the prompts and every backbone tensor that differs from the base weights.",
    )
    p.add_argument(
        "file",
        metavar="FILE.pt",
        help="the released state dict, or hf-hub:OWNER/REPO/FILE (e.g. "
        "hf-hub:zzhowe/GRMP-IQA/clive_50_prompt_lda_5.0.pt; fetched into the Hugging Face cache)",
    )
    p.add_argument("--out", required=True, metavar="CKPT.safetensors", help="checkpoint to write")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"default {DEFAULT_BACKBONE}")
    p.add_argument(
        "--pretrained",
        default=DEFAULT_PRETRAINED,
        help="base weights the file was trained from: tag, file, or 'random' "
        f"(default {DEFAULT_PRETRAINED})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a random base backbone")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.hub import fetch, is_hub_ref
    from grmpiqa.released import import_released

    file, source = args.file, None
    if is_hub_ref(args.file):
        file, source = fetch(
            args.file, cli_hint="download {url} and pass the local file as FILE.pt"
        )
    out = import_released(
        file,
        args.out,
        backbone=args.backbone,
        pretrained=pretrained_arg(args.pretrained),
        seed=args.seed,
        source=source,
    )
    print(f"grmpiqa: wrote {out}", file=sys.stderr)
    return 0
