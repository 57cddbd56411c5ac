"""Text towers run on token embeddings, so learned context can be injected (method.md 3).

* ``clip-text``: the tower unrolled onto open_clip's ``CLIP`` (OpenAI/LAION CLIPs,
  ConvNeXt, ModifiedResNet, Swin): written out here, with the exact truncation after
  the last pooled position of a causal tower.
* ``text-transformer``: open_clip's ``TextTransformer`` (``CustomTextCLIP``: SigLIP,
  EVA, MobileCLIP, PE-Core, ViTamin; CoCa's appended CLS token).
* ``hf-text``: open_clip's ``HFTextEncoder`` over a Hugging Face model (RoBERTa,
  XLM-R, mT5, NLLB); needs ``grmpiqa[hf]``.

The last two run the tower's own ``forward`` with the token-embedding layer's output
replaced by the given embeddings (a forward hook held for that one call), so masks,
appended tokens, pooling and projection are exactly open_clip's in every release.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from grmpiqa.backbones.base import TextEncoder
from grmpiqa.backbones.openclip_vit import project
from grmpiqa.backbones.registry import HF_EXTRA, has_transformers, register_text

__all__ = ["ClipText", "HFText", "TransformerText", "hf_config_problem"]

_HOOK_LOCK = threading.RLock()


@contextmanager
def _replaced_output(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """``module``'s next outputs are ``value`` (cast to their dtype) while inside."""

    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        if tuple(out.shape) != tuple(value.shape):
            raise ValueError(
                f"token embeddings of shape {tuple(value.shape)} for tokens embedding to "
                f"{tuple(out.shape)}"
            )
        return value.to(out.dtype)

    with _HOOK_LOCK:
        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


@register_text("clip-text")
class ClipText(TextEncoder):
    """The text tower unrolled onto open_clip's ``CLIP``: token + positional embedding,
    transformer (causal mask), ``ln_final``, pooling (EOT by argmax, or as configured),
    projection."""

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        text = model_cfg.get("text_cfg", {})
        return not (
            text.get("hf_model_name")
            or model_cfg.get("custom_text")
            or "multimodal_cfg" in model_cfg
        )

    @property
    def width(self) -> int:
        return int(self.clip.token_embedding.weight.shape[1])

    @property
    def token_embedding(self) -> nn.Module:
        return self.clip.token_embedding  # type: ignore[no-any-return]

    def unit_modules(self) -> list[nn.Module]:
        return list(self.clip.transformer.resblocks)

    def final_norm_modules(self) -> list[nn.Module]:
        return [self.clip.ln_final]

    @property
    def _pool_type(self) -> str:
        return str(getattr(self.clip, "text_pool_type", "argmax"))

    def pooled_positions(self, tokens: torch.Tensor) -> int | None:
        """How many leading positions determine the pooled feature (None: all)."""
        c = self.clip
        if getattr(c, "attn_mask", None) is None:
            return None
        kind = self._pool_type
        if kind == "argmax":
            return int(tokens.argmax(dim=-1).max()) + 1
        if kind == "first":
            return 1
        eos = getattr(c, "text_eos_id", None)
        if kind == "eos" and eos is not None:
            return int((tokens == eos).int().argmax(dim=-1).max()) + 1
        return None

    def forward(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, truncate: bool = False
    ) -> torch.Tensor:
        c = self.clip
        n = self.pooled_positions(tokens) if truncate else None
        n = embeddings.shape[1] if n is None else n
        x = embeddings[:, :n] + c.positional_embedding[:n].to(embeddings.dtype)
        mask = getattr(c, "attn_mask", None)
        if mask is not None:
            mask = mask[:n, :n]
        x = c.transformer(x, attn_mask=mask)
        x = c.ln_final(x)
        pooled = _text_pool(x, tokens[:, :n], self._pool_type, getattr(c, "text_eos_id", None))
        return project(pooled, c.text_projection)


def _text_pool(
    x: torch.Tensor, tokens: torch.Tensor, pool_type: str, eos_id: int | None
) -> torch.Tensor:
    rows = torch.arange(x.shape[0], device=x.device)
    if pool_type == "argmax":  # the EOT token has the highest id of CLIP's vocabulary
        return x[rows, tokens.argmax(dim=-1)]
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    if pool_type == "eos" and eos_id is not None:
        return x[rows, (tokens == eos_id).int().argmax(dim=-1)]
    return x


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out  # type: ignore[no-any-return]


@register_text("text-transformer")
class TransformerText(TextEncoder):
    """open_clip's ``TextTransformer`` (``clip.text``) run by its own forward."""

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        text = model_cfg.get("text_cfg", {})
        return not text.get("hf_model_name") and (
            bool(model_cfg.get("custom_text")) or "multimodal_cfg" in model_cfg
        )

    @property
    def _text(self) -> Any:
        return self.clip.text

    @property
    def width(self) -> int:
        return int(self._text.token_embedding.weight.shape[1])

    @property
    def token_embedding(self) -> nn.Module:
        return self._text.token_embedding  # type: ignore[no-any-return]

    def unit_modules(self) -> list[nn.Module]:
        return list(self._text.transformer.resblocks)

    def final_norm_modules(self) -> list[nn.Module]:
        return [self._text.ln_final]

    def forward(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, truncate: bool = False
    ) -> torch.Tensor:
        with _replaced_output(self.token_embedding, embeddings):
            return _first(self._text(tokens))


def hf_config_problem(model_cfg: dict[str, Any]) -> str | None:
    """Why the Hugging Face text tower of a config cannot be built here (None: it can)."""
    hf_name = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if not hf_name:
        return None
    if not has_transformers():
        return f"its text tower is a Hugging Face model ({hf_name}); {HF_EXTRA}"
    from pathlib import Path

    if Path(str(hf_name)).is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(hf_name), "config.json")
    except Exception:  # noqa: BLE001 - a malformed name is also "not available"
        hit = None
    if isinstance(hit, str):
        return None
    return (
        f"its text tower's architecture (Hugging Face config {hf_name}) is not in the local "
        f"cache (fetch it once: huggingface-cli download {hf_name} config.json)"
    )


@register_text("hf-text")
class HFText(TextEncoder):
    """open_clip's ``HFTextEncoder`` (a Hugging Face encoder, pooler, projection)."""

    @classmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        return bool(model_cfg.get("text_cfg", {}).get("hf_model_name"))

    @classmethod
    def refusal(cls, model_cfg: dict[str, Any]) -> str | None:
        return hf_config_problem(model_cfg)

    @property
    def _text(self) -> Any:
        return self.clip.text

    @property
    def token_embedding(self) -> nn.Module:
        return self._text.transformer.get_input_embeddings()  # type: ignore[no-any-return]

    @property
    def width(self) -> int:
        emb: Any = self.token_embedding
        return int(emb.weight.shape[1])

    def _encoder(self) -> Any:
        tr = self._text.transformer
        return getattr(tr, "encoder", tr)

    def unit_modules(self) -> list[nn.Module]:
        enc = self._encoder()
        for attr in ("layer", "block", "layers"):
            mods = getattr(enc, attr, None)
            if isinstance(mods, nn.ModuleList):
                return list(mods)
        return []

    def final_norm_modules(self) -> list[nn.Module]:
        enc = self._encoder()
        out = [
            getattr(enc, n)
            for n in ("final_layer_norm", "layer_norm", "ln_f")
            if isinstance(getattr(enc, n, None), nn.Module)
        ]
        return out

    def forward(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, truncate: bool = False
    ) -> torch.Tensor:
        with _replaced_output(self.token_embedding, embeddings):
            return _first(self._text(tokens))
