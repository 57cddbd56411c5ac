"""``grmpiqa backbones``: the CLIP backbones that run the whole method, one per line.

Imports torch and open_clip only when run (CLI start-up stays light).
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "backbones",
        help="list the CLIP backbones grmpiqa can adapt (family, visual prompts, size, cost)",
        description="List open_clip's model names that run the whole method (score, pretrain, "
        "finetune, evaluate, explain, serve): family, whether visual prompts apply, input "
        "size, GFLOP per image of the image tower (2 FLOPs per multiply-add, no prompts) and "
        "the pretrained tags open_clip knows. Names that cannot run here are left out; "
        "--all lists them too, with the reason.",
    )
    p.add_argument("--all", action="store_true", help="also list refused names and why")
    p.add_argument("--family", default=None, help="only this family (e.g. eva, timm-vit)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from grmpiqa.backbone import list_backbones  # noqa: F401 - registers grmpiqa's configs
    from grmpiqa.backbones.catalog import rows

    table = rows(with_refused=args.all)
    if args.family:
        table = [r for r in table if r.family == args.family]
    if args.json:
        for r in table:
            print(json.dumps(r.to_dict()))
        return 0
    cols = ("name", "family", "architecture", "VPT", "size", "GFLOP")
    print(
        f"{cols[0]:34s} {cols[1]:16s} {cols[2]:22s} {cols[3]:3s} {cols[4]:>4s} {cols[5]:>8s}  tags"
    )
    for r in table:
        g = "?" if r.gflops is None else f"{r.gflops:.1f}"
        vp = "yes" if r.visual_prompts else "no"
        tags = ", ".join(r.tags) if r.tags else "-"
        line = (
            f"{r.name:34s} {r.family:16s} {r.label:22s} {vp:3s} {r.input_size:4d} {g:>8s}  {tags}"
        )
        if r.refusal is not None:
            line += f"  [refused: {r.refusal}]"
        print(line)
    works = sum(r.refusal is None for r in table)
    print(f"grmpiqa: {works} backbone(s) run the whole method", file=sys.stderr)
    return 0
