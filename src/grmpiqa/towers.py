"""The two towers every path runs through: the prompted image tower and the text tower.

:class:`PromptedVisionTower` owns the whole image forward of GRMP-IQA (method.md 4):
patch embedding, insertion of the input prompts after CLS, the deep prompts that
replace the prompt rows before blocks ``1..deep_layers``, the blocks, and the head
(``prompt_norm`` on the sequence, ``ln_post``, CLS pooling, projection). With no
prompts (``prompts=None`` or 0 tokens) it is plain CLIP. Scoring, stage 1, the stage-2
feature cache and live blocks, the scene teacher and the baselines all use it.

Split points, as open_clip's ``VisionTransformer``: :meth:`~PromptedVisionTower.embed`,
:meth:`~PromptedVisionTower.blocks` ``(x, start, end)``, :meth:`~PromptedVisionTower.head`;
:meth:`~PromptedVisionTower.forward_features` / :meth:`~PromptedVisionTower.forward_head`
as timm's. :meth:`~PromptedVisionTower.forward` and
:meth:`~PromptedVisionTower.forward_from` run the *exact fast path*: the output rows at
prompt positions are discarded whenever the next block replaces them, so those rows
serve only as keys and values (no queries, attention output or MLP for them), and the
last block computes the CLS row only. The result equals the reference path up to
float rounding (tested); :func:`grmpiqa._openclip.fast_path_problem` is checked once at
construction and a :class:`~grmpiqa.log.FallbackWarning` says when it cannot be used.

Precision (:mod:`grmpiqa.precision`): under bf16 autocast the matrix products run in
bf16 while the residual stream between blocks stays fp32.

:class:`TextTower` runs CLIP's text transformer on token embeddings (so learned context
can be injected), optionally truncated after the last pooled position (exact for a
causal tower pooled at EOT).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from grmpiqa import _openclip as oc
from grmpiqa.log import FallbackWarning
from grmpiqa.prompts import VisualPrompts

__all__ = ["PromptedVisionTower", "TextTower"]


class PromptedVisionTower(nn.Module):
    """VPT-deep over an open_clip ``VisionTransformer`` (weights stay owned elsewhere).

    Args:
        visual: open_clip ``VisionTransformer`` (not registered as a submodule: the
            :class:`~grmpiqa.model.QualityModel` owns the CLIP weights).
        prompts: the visual prompts, or None for plain CLIP.
        fast: allow the exact fast path (False: always the reference path).

    Layout: a hidden sequence is ``[N, 1 + P + L, W]`` (CLS, P prompt rows, L patches).
    The state entering a block whose prompts are replaced is stored *compact*, without
    the prompt rows (:meth:`hidden`, :meth:`forward_from`), since they are unused.
    """

    visual: Any
    prompts: VisualPrompts | None

    def __init__(
        self, visual: nn.Module, prompts: VisualPrompts | None = None, *, fast: bool = True
    ) -> None:
        super().__init__()
        # plain attributes (not submodules): the state dict stays the model's
        self.__dict__["visual"] = visual
        self.__dict__["prompts"] = prompts if prompts is not None and prompts.num_tokens else None
        self.n_blocks = len(oc.vision_blocks(visual))
        self.grid_size = oc.grid_size(visual)
        self._batch_first = oc.batch_first(visual)
        self.fast_problem = oc.fast_path_problem(visual) if fast else "disabled"
        if fast and self.fast_problem is not None:
            warnings.warn(
                f"image tower: exact fast path unavailable ({self.fast_problem}); "
                "running every row of every block",
                FallbackWarning,
                stacklevel=2,
            )

    # -- geometry -------------------------------------------------------------------------

    @property
    def num_prompts(self) -> int:
        return self.prompts.num_tokens if self.prompts is not None else 0

    @property
    def num_prefix_tokens(self) -> int:
        """Rows before the patch tokens: CLS and the prompts."""
        return 1 + self.num_prompts

    @property
    def fast(self) -> bool:
        return self.fast_problem is None

    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks, in order (for parameter groups and freezing)."""
        return list(oc.vision_blocks(self.visual))

    def head_parameters(self) -> list[nn.Parameter]:
        """CLIP's head parameters (``ln_post``, projection, any attention pooler)."""
        return oc.vision_head_parameters(self.visual)

    def frozen_copy(self, dtype: torch.dtype = torch.bfloat16) -> PromptedVisionTower:
        """A tower for inference under ``dtype`` autocast whose matrix weights are stored
        in ``dtype`` (:func:`grmpiqa._openclip.matmul_parameters`): autocast no longer
        casts the frozen weights at every call, and the result is the same bit for bit
        (autocast would round them to the same values). Every other tensor (norms,
        embeddings, prompts) is shared with this tower, not copied. Only for frozen
        weights: later changes of this tower's matrix weights do not reach the copy.
        """
        memo: dict[int, Any] = {}
        mods: list[nn.Module] = [self.visual] + ([self.prompts] if self.prompts else [])
        cast = {id(getattr(m, n)) for mod in mods for m, n in oc.matmul_parameters(mod)}
        for mod in mods:
            for t in [*mod.parameters(), *mod.buffers()]:
                if id(t) in cast:
                    memo[id(t)] = nn.Parameter(t.detach().to(dtype), requires_grad=False)
                else:
                    memo[id(t)] = t
        visual = copy.deepcopy(self.visual, memo)
        prompts = copy.deepcopy(self.prompts, memo) if self.prompts is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)  # already said for this tower
            out = PromptedVisionTower(visual, prompts, fast=self.fast_problem != "disabled")
        return out.eval()

    def shared_blocks(self, other: PromptedVisionTower) -> int:
        """How many leading blocks ``other`` computes exactly as this tower does.

        ``s`` means: for any images, the state entering block ``s`` (:meth:`hidden`) is
        the same in both towers, so it can be computed once and finished per tower with
        :meth:`forward_from`. That holds when the architectures agree (the ViT's modules,
        prompt tokens, deep layers, fast path), every tensor the embedding reads (the ViT's tensors
        outside its blocks and head, the input prompts and their projection) is equal,
        and blocks ``0..s-1`` with the deep prompts entering them are equal. Stage-2
        checkpoints fine-tuned from one stage-1 checkpoint (method.md 7) share every
        block before their fine-tuned ones. 0 when even the embedding differs.
        """
        if other is self:
            return self.n_blocks
        a, b = self.prompts, other.prompts
        layout = (self.n_blocks, self.num_prompts, self.fast, self.grid_size)
        if layout != (other.n_blocks, other.num_prompts, other.fast, other.grid_size):
            return 0
        if repr(self.visual) != repr(other.visual):  # same modules (activations, norms)
            return 0
        if (a is None) != (b is None) or (
            a is not None and b is not None and a.deep_layers != b.deep_layers
        ):
            return 0
        if not _same_tensors(self._embedding_tensors(), other._embedding_tensors()):
            return 0
        if a is not None and b is not None:
            if not _same_tensors(
                [a.prompt_embeddings, *a.prompt_proj.parameters()],
                [b.prompt_embeddings, *b.prompt_proj.parameters()],
            ):
                return 0
        mine, theirs = self.block_modules(), other.block_modules()
        for i in range(self.n_blocks):
            if not _same_tensors(_module_tensors(mine[i]), _module_tensors(theirs[i])):
                return i
            if a is not None and b is not None and a.replaces(i):
                if not _same_tensors(
                    [a.deep_prompt_embeddings[i - 1]], [b.deep_prompt_embeddings[i - 1]]
                ):
                    return i
        return self.n_blocks

    def _embedding_tensors(self) -> list[torch.Tensor]:
        """The ViT's tensors read before the first block (outside the blocks and head)."""
        inner = {id(t) for blk in self.block_modules() for t in _module_tensors(blk)}
        inner |= {id(p) for p in self.head_parameters()}
        return [t for t in _module_tensors(self.visual) if id(t) not in inner]

    def _replaces(self, block: int) -> bool:
        return self.prompts is not None and self.prompts.replaces(block)

    def is_compact(self, block: int) -> bool:
        """Whether the state entering ``block`` is stored without prompt rows."""
        return self.prompts is None or (self._replaces(block) and self.fast)

    # -- reference path (every row) ------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS, positional embedding, ``ln_pre``, then the input prompts
        after CLS: ``[N, 3, H, W]`` -> ``[N, 1 + P + L, W]`` (fp32 residual stream)."""
        x = self._embed_rows(images)
        if self.prompts is None:
            return x
        p = self.prompts.prompts(0, x.shape[0]).to(x.dtype)
        return torch.cat([x[:, :1], p, x[:, 1:]], dim=1)

    def blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Blocks ``start..end-1`` on a full sequence, replacing the deep prompts before
        each; every row is computed (the reference path)."""
        end = self.n_blocks if end is None else end
        blocks = oc.vision_blocks(self.visual)
        for i in range(start, end):
            if self._replaces(i):
                x = self._with_prompts(x, i)
            x = oc.run_block(blocks[i], x, self._batch_first)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``prompt_norm`` on the sequence, ``ln_post``, pooling, projection: ``[N, D]``."""
        return oc.vision_pool(self.visual, self._norm(x))

    def token_head(self, x: torch.Tensor) -> torch.Tensor:
        """The head applied to every token (no pooling): ``[N, T, W]`` -> ``[N, T, D]``."""
        return oc.vision_tokens(self.visual, self._norm(x))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final hidden sequence, every row computed: ``[N, 1 + P + L, W]``."""
        return self.blocks(self.embed(images))

    def forward_head(self, x: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """Embedding ``[N, D]`` (``pool``) or per-token embeddings ``[N, T, D]``."""
        return self.head(x) if pool else self.token_head(x)

    # -- exact fast path -----------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embedding ``[N, D]`` (fast path when available)."""
        if not self.fast:
            return self.head(self.forward_features(images))
        r = self._embed_rows(images)
        p = None if self.prompts is None else self.prompts.prompts(0, r.shape[0]).to(r.dtype)
        return self._finish(*self._run(r, p, 0, self.n_blocks, cls_only=True))

    def hidden(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The state entering ``block`` (compact when :meth:`is_compact`), for caches."""
        if not self.fast:
            return self.blocks(self.embed(images), 0, block)
        r = self._embed_rows(images)
        p = None if self.prompts is None else self.prompts.prompts(0, r.shape[0]).to(r.dtype)
        r, p = self._run(r, p, 0, block, cls_only=False)
        if self.is_compact(block) or p is None:
            return r
        return torch.cat([r[:, :1], p, r[:, 1:]], dim=1)

    def forward_from(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Unnormalised embedding from the state entering block ``start`` (as
        :meth:`hidden` returns it)."""
        if not self.fast:
            return self.head(self.blocks(self.expand(hidden, start), start))
        hidden = hidden.float()
        if self.is_compact(start):
            r, p = hidden, None
        else:
            k = self.num_prompts
            r = torch.cat([hidden[:, :1], hidden[:, 1 + k :]], dim=1)
            p = hidden[:, 1 : 1 + k]
        return self._finish(*self._run(r, p, start, self.n_blocks, cls_only=True))

    def expand(self, hidden: torch.Tensor, block: int) -> torch.Tensor:
        """A full sequence from a compact state (prompt rows zero: ``block`` replaces them)."""
        if self.prompts is None or not self.is_compact(block):
            return hidden
        zeros = hidden.new_zeros(hidden.shape[0], self.num_prompts, hidden.shape[2])
        return torch.cat([hidden[:, :1], zeros, hidden[:, 1:]], dim=1)

    # -- internals -------------------------------------------------------------------------

    def _embed_rows(self, images: torch.Tensor) -> torch.Tensor:
        return oc.vision_embed(self.visual, images).float()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompts.prompt_norm(x) if self.prompts is not None else x

    def _with_prompts(self, x: torch.Tensor, block: int) -> torch.Tensor:
        assert self.prompts is not None
        p = self.prompts.prompts(block, x.shape[0]).to(x.dtype)
        return torch.cat([x[:, :1], p, x[:, 1 + self.num_prompts :]], dim=1)

    def _run(
        self, r: torch.Tensor, p: torch.Tensor | None, start: int, end: int, cls_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks ``start..end-1`` on (CLS + patch rows ``r``, prompt rows ``p``).

        Prompt rows are computed only when a later block reads them; with ``cls_only``
        the last block of the tower computes the CLS row only.
        """
        blocks = oc.vision_blocks(self.visual)
        for i in range(start, end):
            if self._replaces(i):
                assert self.prompts is not None
                p = self.prompts.prompts(i, r.shape[0]).to(r.dtype)
            nxt = i + 1
            keep_p = p is not None and nxt < self.n_blocks and not self._replaces(nxt)
            rows = 1 if (cls_only and i == self.n_blocks - 1) else r.shape[1]
            x = r if p is None else torch.cat([r, p], dim=1)
            out = oc.block_rows(blocks[i], x, x.shape[1] if keep_p else rows)
            if keep_p:
                r, p = out[:, : r.shape[1]], out[:, r.shape[1] :]
            else:
                r = out
        return r, p

    def _finish(self, r: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        # the head pools the CLS row; prompt_norm and ln_post act per token
        return self.head(r[:, :1])


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of ``module``, in registration order."""
    return [*module.parameters(), *module.buffers()]


def _same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two lists of tensors are equal element by element (shape, dtype, device,
    values)."""
    return len(a) == len(b) and all(
        x.shape == y.shape
        and x.dtype == y.dtype
        and x.device == y.device
        and (x is y or torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


class TextTower(nn.Module):
    """CLIP's text tower on token embeddings (method.md 3).

    ``forward(embeddings, tokens)`` = positional embedding -> transformer (causal mask)
    -> ``ln_final`` -> pool at EOT -> projection; with unmodified embeddings it equals
    ``clip.encode_text`` (tested). ``truncate=True`` runs only the positions up to the
    last pooled token (exact for a causal tower; falls back to the full tower otherwise).
    It runs in fp32 under any autocast: its work (a few prompts) is too small for bf16 to
    pay for casting its weights.
    """

    clip: Any

    def __init__(self, clip: nn.Module, truncate: bool = False) -> None:
        super().__init__()
        problem = oc.text_problem(clip)
        if problem is not None:
            raise ValueError(f"unsupported text tower: {problem}")
        self.__dict__["clip"] = clip
        self.truncate = truncate

    @property
    def width(self) -> int:
        return oc.text_width(self.clip)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(tokens)  # type: ignore[no-any-return]

    def forward(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, truncate: bool | None = None
    ) -> torch.Tensor:
        """Unnormalised text features ``[n, D]`` of prompt embeddings ``[n, T, W]``."""
        cut = self.truncate if truncate is None else truncate
        length = oc.pooled_positions(self.clip, tokens) if cut else None
        # always fp32 (grmpiqa.precision): a handful of prompts is too little work for
        # bf16 to pay for casting the tower's weights, which autocast redoes every call
        with torch.autocast(embeddings.device.type, enabled=False):
            return oc.text_forward(self.clip, embeddings.float(), tokens, length)

    def encode_tokens(self, tokens: torch.Tensor, truncate: bool | None = None) -> torch.Tensor:
        return self(self.embed(tokens), tokens, truncate)

    def blocks(self) -> nn.ModuleList:
        """The text transformer's blocks (for parameter groups)."""
        return oc.text_blocks(self.clip)
