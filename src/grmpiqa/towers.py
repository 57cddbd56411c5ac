"""The two towers every path runs through: the prompted image tower and the text tower.

Both talk to a backbone only through its adapter (:mod:`grmpiqa.backbones`): an
:class:`~grmpiqa.backbones.ImageTrunk` (embed -> units -> pool) and a
:class:`~grmpiqa.backbones.TextEncoder`. No family's layout is known here.

:class:`PromptedVisionTower` owns the whole image forward of GRMP-IQA (method.md 4): the
trunk's embedding, insertion of the input prompts after the trunk's own prefix tokens
(CLS, registers; first in the sequence for trunks without them, as SigLIP), the deep
prompts that replace the prompt rows before blocks ``1..deep_layers``, the blocks, and
the head (``prompt_norm`` on the sequence, the prompt rows dropped, then the trunk's own
pooling of its own tokens: CLS, average or attention pooling, and projection). With no
prompts (``prompts=None`` or 0 tokens) it is the backbone's plain ``encode_image``;
token-free trunks (ConvNeXt, ResNet, FastViT, Swin) always run without prompts. Scoring,
stage 1, the stage-2 feature cache and live blocks, the scene teacher and the baselines
all use it.

Split points, as open_clip's ``VisionTransformer``: :meth:`~PromptedVisionTower.embed`,
:meth:`~PromptedVisionTower.blocks` ``(x, start, end)``, :meth:`~PromptedVisionTower.head`;
:meth:`~PromptedVisionTower.forward_features` / :meth:`~PromptedVisionTower.forward_head`
as timm's. :meth:`~PromptedVisionTower.forward` and
:meth:`~PromptedVisionTower.forward_from` run the *exact fast path* where the trunk's
units compute selected rows (``ImageTrunk.row_problem is None``: open_clip's ViT blocks):
the output rows at prompt positions are discarded whenever the next block replaces them,
so those rows serve only as keys and values (no queries, attention output or MLP for
them), and the last block computes the rows the pooling reads only (the CLS row). The
result equals the reference path up to float rounding (tested); a
:class:`~grmpiqa.log.FallbackWarning` says when a trunk that should have the fast path
cannot use it.

Precision (:mod:`grmpiqa.precision`): under bf16 autocast the matrix products run in
bf16 while the residual stream between blocks stays fp32.

:class:`TextTower` runs the text tower on token embeddings (so learned context can be
injected), optionally truncated after the last pooled position (exact for a causal
tower pooled at EOT).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Protocol

import torch
from torch import nn

from grmpiqa.backbones import ImageTrunk, PromptSlot, TextEncoder, trunk_for_module
from grmpiqa.log import FallbackWarning
from grmpiqa.prompts import VisualPrompts

__all__ = ["PromptSource", "PromptedVisionTower", "TextTower"]


class PromptSource(Protocol):
    """What the tower needs of visual prompts: :class:`~grmpiqa.prompts.VisualPrompts`,
    or several tasks' copies stacked (:class:`~grmpiqa.task_batch.StackedPrompts`)."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def deep_layers(self) -> int: ...

    def replaces(self, block: int) -> bool: ...

    def prompts(self, block: int, batch: int) -> torch.Tensor: ...

    def prompt_norm(self, x: torch.Tensor) -> torch.Tensor: ...


class PromptedVisionTower(nn.Module):
    """VPT-deep over a backbone's image trunk (weights stay owned elsewhere).

    Args:
        trunk: the backbone adapter's image trunk, or a built image tower (its family's
            trunk is found by class); its modules are not registered as submodules: the
            :class:`~grmpiqa.model.QualityModel` owns the CLIP weights.
        prompts: the visual prompts, or None for plain CLIP.
        fast: allow the exact fast path (False: always the reference path).

    Layout: a hidden sequence of a token trunk is ``[N, K + P + L, W]`` (K own prefix
    rows, P prompt rows, L patches); the state entering a block whose prompts are
    replaced is stored *compact*, without the prompt rows (:meth:`hidden`,
    :meth:`forward_from`), since they are unused. A token-free trunk's state is its
    feature map.
    """

    trunk: ImageTrunk
    prompts: PromptSource | None

    def __init__(
        self,
        trunk: ImageTrunk | nn.Module,
        prompts: PromptSource | None = None,
        *,
        fast: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(trunk, ImageTrunk):  # a built image tower: its family's trunk
            trunk = trunk_for_module(trunk)
        # plain attributes (not submodules): the state dict stays the model's
        self.__dict__["trunk"] = trunk
        self.__dict__["visual"] = trunk.visual
        prompts = prompts if prompts is not None and prompts.num_tokens else None
        if prompts is not None and trunk.visual_prompts_problem is not None:
            raise ValueError(f"visual prompts do not apply: {trunk.visual_prompts_problem}")
        self.__dict__["prompts"] = prompts
        self.n_blocks = trunk.n_units
        self._k = trunk.num_prefix_tokens if trunk.visual_prompts_problem is None else 0
        if not fast:
            self.fast_problem: str | None = "disabled"
        elif trunk.visual_prompts_problem is not None:
            self.fast_problem = "a token-free trunk"
        else:
            self.fast_problem = trunk.row_problem
        if fast and self.fast_problem is not None and trunk.row_selective:
            warnings.warn(
                f"image tower: exact fast path unavailable ({self.fast_problem}); "
                "running every row of every block",
                FallbackWarning,
                stacklevel=2,
            )

    # -- geometry -------------------------------------------------------------------------

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid of the input (token trunks)."""
        return self.trunk.grid_size

    @property
    def num_prompts(self) -> int:
        return self.prompts.num_tokens if self.prompts is not None else 0

    @property
    def num_prefix_tokens(self) -> int:
        """Rows before the patch tokens: the trunk's own prefix and the prompts."""
        return self._k + self.num_prompts

    @property
    def fast(self) -> bool:
        return self.fast_problem is None

    def block_modules(self) -> list[nn.Module]:
        """The trunk's units (blocks), in order (for parameter groups and freezing)."""
        return self.trunk.unit_modules()

    def head_parameters(self) -> list[nn.Parameter]:
        """The trunk's head parameters (final norms, pooler, projection)."""
        return self.trunk.head_parameters()

    def frozen_copy(self, dtype: torch.dtype = torch.bfloat16) -> PromptedVisionTower:
        """A tower for inference under ``dtype`` autocast whose matrix weights are stored
        in ``dtype`` (:func:`matmul_parameters`): autocast no longer casts the frozen
        weights at every call, and the result is the same bit for bit (autocast would
        round them to the same values; tested for every family's tiny twin). Every other
        tensor (norms, embeddings, prompts) is shared with this tower, not copied. Only
        for frozen weights: later changes of this tower's matrix weights do not reach the
        copy.
        """
        memo: dict[int, Any] = {}
        source: nn.Module = self.trunk.visual
        mods: list[nn.Module] = [source]
        if isinstance(self.prompts, nn.Module):
            mods.append(self.prompts)
        cast = {id(getattr(m, n)) for mod in mods for m, n in matmul_parameters(mod)}
        for mod in mods:
            for t in [*mod.parameters(), *mod.buffers()]:
                if id(t) in cast:
                    memo[id(t)] = nn.Parameter(t.detach().to(dtype), requires_grad=False)
                else:
                    memo[id(t)] = t
        visual = copy.deepcopy(source, memo)
        prompts = copy.deepcopy(self.prompts, memo) if self.prompts is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)  # already said for this tower
            out = PromptedVisionTower(
                type(self.trunk)(visual), prompts, fast=self.fast_problem != "disabled"
            )
        return out.eval()

    def shared_blocks(self, other: PromptedVisionTower) -> int:
        """How many leading blocks ``other`` computes exactly as this tower does.

        ``s`` means: for any images, the state entering block ``s`` (:meth:`hidden`) is
        the same in both towers, so it can be computed once and finished per tower with
        :meth:`forward_from`. That holds when the architectures agree (the ViT's modules,
        prompt tokens, deep layers, fast path), every tensor the embedding reads (the trunk's
        tensors outside its units and head, the input prompts and their projection) is equal,
        and blocks ``0..s-1`` with the deep prompts entering them are equal. Stage-2
        checkpoints fine-tuned from one stage-1 checkpoint (method.md 7) share every
        block before their fine-tuned ones. 0 when even the embedding differs.
        """
        if other is self:
            return self.n_blocks
        a, b = self.prompts, other.prompts
        if not all(x is None or isinstance(x, VisualPrompts) for x in (a, b)):
            return 0  # stacked task copies (stage 1) are never shared
        assert (a is None or isinstance(a, VisualPrompts)) and (
            b is None or isinstance(b, VisualPrompts)
        )
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
        """The trunk's tensors read before the first unit (outside the units and head)."""
        inner = {id(t) for blk in self.block_modules() for t in _module_tensors(blk)}
        inner |= {id(p) for p in self.head_parameters()}
        return [t for t in _module_tensors(self.trunk.visual) if id(t) not in inner]

    def _replaces(self, block: int) -> bool:
        return self.prompts is not None and self.prompts.replaces(block)

    def is_compact(self, block: int) -> bool:
        """Whether the state entering ``block`` is stored without prompt rows."""
        return self.prompts is None or (self._replaces(block) and self.fast)

    # -- reference path (every row) ------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The trunk's embedding, then the input prompts after its prefix rows:
        ``[N, 3, H, W]`` -> ``[N, K + P + L, W]`` (fp32 residual stream)."""
        x = self._embed_rows(images)
        if self.prompts is None:
            return x
        k = self._k
        p = self.prompts.prompts(0, x.shape[0]).to(x.dtype)
        return torch.cat([x[:, :k], p, x[:, k:]], dim=1)

    def blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Blocks ``start..end-1`` on a full sequence, replacing the deep prompts before
        each; every row is computed (the reference path)."""
        end = self.n_blocks if end is None else end
        slot = None if self.prompts is None else PromptSlot(self._k, self.num_prompts)
        for i in range(start, end):
            if self._replaces(i):
                x = self._with_prompts(x, i)
            x = self.trunk.run_unit(i, x, slot)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``prompt_norm`` on the sequence, the prompt rows dropped, the trunk's pooling
        and projection: ``[N, D]``."""
        return self.trunk.pool(self._own(self._norm(x)))

    def token_head(self, x: torch.Tensor) -> torch.Tensor:
        """The head applied to every token alone (no pooling): ``[N, T, W]`` -> ``[N, T, D]``."""
        return self.trunk.token_readout(self._norm(x))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The final hidden sequence, every row computed: ``[N, K + P + L, W]``."""
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
        return self._finish(*self._run(r, p, 0, self.n_blocks, last_pooled=True))

    def hidden(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The state entering ``block`` (compact when :meth:`is_compact`), for caches."""
        if not self.fast:
            return self.blocks(self.embed(images), 0, block)
        r = self._embed_rows(images)
        p = None if self.prompts is None else self.prompts.prompts(0, r.shape[0]).to(r.dtype)
        r, p = self._run(r, p, 0, block, last_pooled=False)
        if self.is_compact(block) or p is None:
            return r
        k = self._k
        return torch.cat([r[:, :k], p, r[:, k:]], dim=1)

    def forward_from(self, hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Unnormalised embedding from the state entering block ``start`` (as
        :meth:`hidden` returns it)."""
        if not self.fast:
            return self.head(self.blocks(self.expand(hidden, start), start))
        hidden = hidden.float()
        if self.is_compact(start):
            r, p = hidden, None
        else:
            k, n = self._k, self.num_prompts
            r = torch.cat([hidden[:, :k], hidden[:, k + n :]], dim=1)
            p = hidden[:, k : k + n]
        return self._finish(*self._run(r, p, start, self.n_blocks, last_pooled=True))

    def expand(self, hidden: torch.Tensor, block: int) -> torch.Tensor:
        """A full sequence from a compact state (prompt rows zero: ``block`` replaces them)."""
        if self.prompts is None or not self.is_compact(block):
            return hidden
        k = self._k
        zeros = hidden.new_zeros(hidden.shape[0], self.num_prompts, hidden.shape[2])
        return torch.cat([hidden[:, :k], zeros, hidden[:, k:]], dim=1)

    # -- internals -------------------------------------------------------------------------

    def _embed_rows(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.embed(images).float()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompts.prompt_norm(x) if self.prompts is not None else x

    def _own(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's own rows of a full sequence (prompt rows dropped)."""
        if self.prompts is None:
            return x
        k, n = self._k, self.num_prompts
        return torch.cat([x[:, :k], x[:, k + n :]], dim=1)

    def _with_prompts(self, x: torch.Tensor, block: int) -> torch.Tensor:
        assert self.prompts is not None
        k, n = self._k, self.num_prompts
        p = self.prompts.prompts(block, x.shape[0]).to(x.dtype)
        return torch.cat([x[:, :k], p, x[:, k + n :]], dim=1)

    def _run(
        self, r: torch.Tensor, p: torch.Tensor | None, start: int, end: int, last_pooled: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Blocks ``start..end-1`` on (own rows ``r``, prompt rows ``p`` after them).

        Prompt rows are computed only when a later block reads them; with
        ``last_pooled`` the last block of the tower computes the rows the pooling reads.
        """
        pooled = self.trunk.pooled_rows
        for i in range(start, end):
            if self._replaces(i):
                assert self.prompts is not None
                p = self.prompts.prompts(i, r.shape[0]).to(r.dtype)
            nxt = i + 1
            keep_p = p is not None and nxt < self.n_blocks and not self._replaces(nxt)
            rows = r.shape[1]
            if last_pooled and i == self.n_blocks - 1 and pooled is not None:
                rows = pooled
            x = r if p is None else torch.cat([r, p], dim=1)
            slot = None if p is None else PromptSlot(r.shape[1], p.shape[1])
            out = self.trunk.run_unit_rows(i, x, x.shape[1] if keep_p else rows, slot)
            if keep_p:
                r, p = out[:, : r.shape[1]], out[:, r.shape[1] :]
            else:
                r = out
        return r, p

    def _finish(self, r: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        # the trunk pools its own rows; prompt_norm acts per token
        pooled = self.trunk.pooled_rows
        rows = r if pooled is None else r[:, :pooled]
        return self.trunk.pool(self._norm(rows))


def matmul_parameters(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(owner, attribute)`` of every parameter that only feeds a matrix product or a
    convolution (Linear and Conv weights and biases, attention in-projections, an image
    tower's ``proj`` matrix): the tensors bf16 autocast casts to bf16 at every call.
    Norms, embeddings, layer scales and prompt tensors are not among them."""
    out: list[tuple[nn.Module, str]] = []
    for mod in module.modules():
        if isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d):
            names = ["weight", "bias"]
        elif isinstance(mod, nn.MultiheadAttention):
            names = ["in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight"]
            names += ["v_proj_weight"]
        else:
            names = ["proj"] if mod is module else []
        for name in names:
            if isinstance(getattr(mod, name, None), nn.Parameter):
                out.append((mod, name))
    return out


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
    """The backbone's text tower on token embeddings (method.md 3).

    ``forward(embeddings, tokens)`` runs the adapter's text encoder (positional
    embedding -> transformer -> final norm -> pooling -> projection, as the family does
    it); with unmodified embeddings it equals ``clip.encode_text`` (tested per family).
    ``truncate=True`` runs only the positions up to the last pooled token where that is
    exact (a causal tower pooled at EOT). It runs in fp32 under any autocast: its work
    (a few prompts) is too small for bf16 to pay for casting its weights.
    """

    text: TextEncoder

    def __init__(self, text: TextEncoder, truncate: bool = False) -> None:
        super().__init__()
        if not isinstance(text, TextEncoder):
            raise TypeError(f"expected a backbone TextEncoder, got {type(text).__name__}")
        self.__dict__["text"] = text
        self.truncate = truncate

    @property
    def width(self) -> int:
        return self.text.width

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.embed(tokens)

    def forward(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, truncate: bool | None = None
    ) -> torch.Tensor:
        """Unnormalised text features ``[n, D]`` of prompt embeddings ``[n, T, W]``."""
        cut = self.truncate if truncate is None else truncate
        # always fp32 (grmpiqa.precision): a handful of prompts is too little work for
        # bf16 to pay for casting the tower's weights, which autocast redoes every call
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.text.forward(embeddings.float(), tokens, cut)

    def encode_tokens(self, tokens: torch.Tensor, truncate: bool | None = None) -> torch.Tensor:
        return self(self.embed(tokens), tokens, truncate)

    def blocks(self) -> list[nn.Module]:
        """The text transformer's blocks (for parameter groups)."""
        return self.text.unit_modules()
