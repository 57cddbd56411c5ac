"""The table of backbones ``grmpiqa backbones`` prints, and the names that work.

GFLOP per image is the image tower's forward at its input size without prompts,
counted by ``torch.utils.flop_counter`` on the meta device (no weights, no memory),
2 FLOPs per multiply-add (ViT-B/16: 35.1). Visual prompts add the cost of their rows
(100 prompts on ViT-B/16: about 1.5x, method.md 4). The counts of open_clip's registry
are stored in ``gflops.json`` beside this module (regenerate with
``python -m grmpiqa.backbones.catalog --write``); a name missing there is counted on
the spot.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grmpiqa.backbones.build import model_config_of, resolve_name

__all__ = ["BackboneRow", "gflops", "list_working", "rows"]

_STORE = Path(__file__).with_name("gflops.json")


@dataclass(frozen=True)
class BackboneRow:
    name: str
    family: str
    label: str
    visual_prompts: bool
    input_size: int
    gflops: float | None
    tags: tuple[str, ...]
    refusal: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d


def _stored() -> dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(_STORE.read_text()).items()}
    except (OSError, ValueError):
        return {}


def count_gflops(name: str) -> float | None:
    """GFLOP of one image through the image tower (meta device), None if unbuildable."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_config_of(name)
    if cfg is None:
        return None
    vis = dict(cfg.get("vision_cfg", {}))
    size = vis.get("image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            clip = open_clip.CLIP(
                embed_dim=int(cfg.get("embed_dim", 512)),
                vision_cfg=vis,
                text_cfg={"layers": 1, "width": 64, "heads": 1, "vocab_size": 8},
                quick_gelu=bool(cfg.get("quick_gelu", False)),
            )
            x = torch.empty(1, 3, size, size)
            with FlopCounterMode(display=False) as fc:
                clip.visual.eval()(x)
        return round(fc.get_total_flops() / 1e9, 2)
    except Exception:  # noqa: BLE001 - a tower that cannot be counted shows "?"
        return None
    finally:
        logging.getLogger().setLevel(level)


def gflops(name: str) -> float | None:
    stored = _stored()
    return stored[name] if name in stored else count_gflops(name)


def rows(names: list[str] | None = None, *, with_refused: bool = False) -> list[BackboneRow]:
    """One row per backbone name (open_clip's registry by default)."""
    import open_clip

    names = list(open_clip.list_models()) if names is None else names
    stored = _stored()
    out = []
    for name in names:
        r = resolve_name(name)
        if r.refusal is not None and not with_refused:
            continue
        cfg = model_config_of(name) or {}
        size = cfg.get("vision_cfg", {}).get("image_size", 224)
        size = int(size[0] if isinstance(size, list | tuple) else size)
        tags = tuple(str(t) for t in open_clip.list_pretrained_tags_by_model(name))
        g = stored[name] if name in stored else count_gflops(name)
        out.append(
            BackboneRow(
                name, r.family or "-", r.label, r.visual_prompts is None, size, g, tags, r.refusal
            )
        )
    return out


def list_working(names: list[str] | None = None) -> list[str]:
    """Names that resolve to an adapter with everything they need installed."""
    import open_clip

    names = list(open_clip.list_models()) if names is None else names
    return [n for n in names if resolve_name(n).ok]


def _write() -> None:  # pragma: no cover - maintenance
    import open_clip

    table = {}
    for name in open_clip.list_models():
        g = count_gflops(name)
        if g is not None:
            table[name] = g
            print(f"{name:40s} {g:9.2f}", flush=True)
    _STORE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":  # pragma: no cover
    if "--write" in sys.argv:
        _write()
