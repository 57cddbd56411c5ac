"""The model card of a checkpoint: what ``grmpiqa info CKPT`` prints (pyiqa-style).

Read from the checkpoint's metadata alone (no backbone weights are loaded): the backbone
and its weights identity, the adapted parts, what was trained on which data, the p -> MOS
map and its fit, the recorded figures (final training figures, held-out images), the
preprocessing and the grmpiqa version. ``hf-hub:`` references and the authors' released
``.pt`` files are resolved as ``--checkpoint`` resolves them; a released file that cannot
be converted here (its base weights missing) is described from its tensors.

Example:
    >>> rows = card_rows({"format": "grmpiqa-checkpoint/1", "grmpiqa_version": "0.1.0",
    ...     "backbone": {"name": "test-tiny", "pretrained": {"kind": "random", "seed": 0}}})
    >>> rows[0]
    ('format', 'grmpiqa-checkpoint/1, written by grmpiqa 0.1.0')
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from grmpiqa.errors import GrmpiqaError

__all__ = ["card_rows", "format_card", "read_card", "weights_identity"]


def weights_identity(p: dict[str, Any]) -> str:
    """A weights identity record as words."""
    kind = p.get("kind")
    if kind == "random":
        return f"RANDOM (seed {p.get('seed')}): scores carry no learned quality knowledge"
    if kind == "tag":
        return f"open_clip tag '{p.get('tag')}'"
    if kind == "hf-hub":
        return f"Hugging Face Hub {p.get('repo')} at {str(p.get('revision'))[:12]}"
    if kind == "file":
        digest = p.get("sha256") or p.get("sha256_1mb")
        name = Path(str(p.get("path", "?"))).name
        return f"file {name}" + (f" (sha256 {str(digest)[:12]}...)" if digest else "")
    if kind == "local-dir":
        return f"open_clip folder {Path(str(p.get('path', '?'))).name}"
    return str(p) if p else "unknown"


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.{digits}f}"
    return "n/a" if v is None or isinstance(v, float) else str(v)


def _model_rows(mc: dict[str, Any]) -> list[tuple[str, str]]:
    if not mc:
        return []
    if mc.get("hand_prompts"):
        prompts = "hand prompts " + " / ".join(repr(t) for t in mc["hand_prompts"])
    else:
        names = " / ".join(str(c) for c in mc.get("class_names", []))
        prompts = f"{mc.get('n_ctx')} learned context vectors + class names {names}"
    vpt = (
        f"VPT-deep, {mc.get('vpt_tokens')} tokens per layer"
        if mc.get("visual_prompts")
        else "no visual prompts"
    )
    return [("prompts", prompts), ("visual", vpt)]


def _training_rows(extra: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    stage = extra.get("stage")
    if extra.get("imported_from"):
        src = extra.get("source") or {}
        where = (
            f"hf-hub:{src['hf_hub']}/{src.get('filename')} at {str(src.get('revision'))[:12]}"
            if src.get("hf_hub")
            else extra["imported_from"]
        )
        base = extra.get("released_for") or {}
        rows.append(
            (
                "trained",
                f"by the authors' code (released file {where}; trained from "
                f"{base.get('backbone', '?')} '{base.get('pretrained', '?')}')",
            )
        )
    elif stage == "finetune":
        ft = extra.get("finetune") or {}
        split = extra.get("split") or {}
        held = (
            f", {split.get('test')} held out"
            if split.get("test")
            else (", none held out" if split else "")
        )
        rows.append(
            (
                "trained",
                f"stage 2 (few-shot fine-tuning, method.md 7) on {split.get('shots', '?')} shots "
                f"of {extra.get('data') or extra.get('train_spec')}{held}; lambda "
                f"{ft.get('lam')}, lr {ft.get('lr')}; {extra.get('epoch')} epochs, stopped by "
                f"{extra.get('stopped') or 'n/a'}",
            )
        )
        rows.append(("from", str(extra.get("init") or "random prompts (no meta init)")))
    elif stage == "pretrain":
        tasks = extra.get("tasks") or []
        specs = ", ".join(str(t.get("spec")) for t in tasks)
        n_types = sum(len(t.get("types", [])) for t in tasks)
        rows.append(
            (
                "trained",
                f"stage 1 (meta-prompt pre-training, method.md 6, {extra.get('variant')}) on "
                f"{n_types} distortion types of {specs}; {extra.get('epochs_done')} of "
                f"{extra.get('epochs_planned')} epochs",
            )
        )
    else:
        rows.append(("trained", "nothing recorded"))
    return rows


def _figure_rows(extra: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    fig = extra.get("figures") or {}
    if fig:
        parts = [
            f"{k.replace('_', ' ')} {_num(fig[k])}"
            for k in ("train_srcc", "train_plcc", "val_srcc", "val_plcc")
            if k in fig
        ]
        rows.append(("final", f"epoch {fig.get('epoch')}: " + ", ".join(parts)))
    held = extra.get("held_out")
    if held:
        mos = f", MOS-map RMSE {_num(held.get('mos_rmse'), 3)}" if "mos_rmse" in held else ""
        rows.append(
            (
                "held out",
                f"{held.get('n')} images never trained on: SRCC {_num(held.get('srcc'))}, "
                f"PLCC {_num(held.get('plcc'))}{mos}",
            )
        )
    if extra.get("best_val_srcc") is not None:
        rows.append(
            ("best val", f"SRCC {_num(extra['best_val_srcc'])} at epoch {extra.get('best_epoch')}")
        )
    return rows


def card_rows(meta: dict[str, Any], ref: str | None = None) -> list[tuple[str, str]]:
    """The model card as (field, text) rows."""
    from grmpiqa.scale import scale_from_metadata

    bb = meta.get("backbone") or {}
    extra = meta.get("extra") or {}
    rows: list[tuple[str, str]] = [
        (
            "format",
            f"{meta.get('format')}, written by grmpiqa {meta.get('grmpiqa_version')}"
            + (f" on {meta['created']}" if meta.get("created") else ""),
        )
    ]
    if ref:
        rows.insert(0, ("checkpoint", ref))
    rows.append(("backbone", str(bb.get("name"))))
    rows.append(("weights", weights_identity(bb.get("pretrained") or {})))
    rows += _model_rows(meta.get("model_config") or {})
    rows += _training_rows(extra)
    scale = scale_from_metadata(meta, ref or "checkpoint")
    if scale is not None:
        rows.append(("scale", scale.label.describe() + f" (from {scale.label.source})"))
        rows.append(("MOS map", scale.quality_line()))
        if scale.fit.get("quality") is not None:
            rows.append(("map fit", str(scale.fit["quality"])))
        warning = scale.warning()
        if warning:
            rows.append(("WARNING", warning))
    else:
        rows.append(("scale", "none recorded (scores are p(high quality) in (0, 1))"))
    rows += _figure_rows(extra)
    if extra.get("note"):
        rows.append(("note", str(extra["note"])))
    pre = meta.get("preprocess") or {}
    if pre:
        rows.append(
            (
                "preprocess",
                f"resize {pre.get('resize')} ({pre.get('interpolation')}, aspect not kept), "
                f"centre crop {pre.get('crop')}, {pre.get('stats')} mean/std",
            )
        )
    if (bb.get("pretrained") or {}).get("kind") == "random":
        rows.append(("WARNING", "RANDOM backbone: the numbers above say nothing about quality"))
    return rows


def format_card(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def read_card(checkpoint: str | os.PathLike[str], **resolve: Any) -> tuple[dict[str, Any], str]:
    """The metadata of ``checkpoint`` (resolved like ``--checkpoint``) and the local file.

    A released file that cannot be converted here (no base weights) is described from its
    tensors (format ``released``), with the reason.
    """
    from grmpiqa.checkpoint import read_metadata
    from grmpiqa.factory import resolve_checkpoint

    try:
        path = resolve_checkpoint(checkpoint, **resolve)
    except GrmpiqaError as err:
        if "needs its base weights" not in str(err):
            raise
        return _released_summary(checkpoint, err), str(checkpoint)
    return read_metadata(path), str(path)


def _released_summary(checkpoint: str | os.PathLike[str], err: GrmpiqaError) -> dict[str, Any]:
    from grmpiqa.backbone import read_state_dict
    from grmpiqa.hub import fetch, is_hub_ref
    from grmpiqa.released import RELEASED_BASE, map_released_key

    ref = os.fspath(checkpoint)
    path, source = fetch(ref) if is_hub_ref(ref) else (Path(ref), {})
    sd = read_state_dict(path)
    mapped = {map_released_key(k): v for k, v in sd.items()}
    ctx = mapped.get("prompt_learner.ctx")
    vpt = mapped.get("visual.prompt_embeddings")
    return {
        "format": "released GRMP-IQA state dict (not converted here)",
        "grmpiqa_version": "n/a",
        "backbone": {
            "name": RELEASED_BASE["backbone"],
            "pretrained": {"kind": "tag", "tag": RELEASED_BASE["pretrained"]},
        },
        "model_config": {
            "n_ctx": int(ctx.shape[0]) if ctx is not None else None,
            "class_names": ["high quality", "low quality"],
            "visual_prompts": vpt is not None,
            "vpt_tokens": int(vpt.shape[1]) if vpt is not None else None,
        },
        "extra": {
            "imported_from": path.name,
            "source": source,
            "released_for": dict(RELEASED_BASE),
            "note": f"{len(sd)} tensors, not converted here: {err.for_cli()}",
        },
    }
