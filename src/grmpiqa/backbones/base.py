"""The backbone adapter protocol: what GRMP-IQA needs from a CLIP (method.md 1-4, 7).

A :class:`BackboneAdapter` pairs an :class:`ImageTrunk` (one per *family* of image
tower, registered in :mod:`grmpiqa.backbones.registry`) with a :class:`TextEncoder`
(one per kind of text tower) over one open_clip model, whose weights it never owns.

The image trunk is a sequence of *units* (transformer blocks, or the residual blocks
of a convolutional trunk's stages, in order) between an embedding and a head:

    images -> embed -> unit 0 -> ... -> unit n-1 -> pool -> image embedding [N, D]

For a trunk with tokens (``ImageTrunk.visual_prompts_problem is None``) the hidden
state is a sequence ``[N, T, W]`` whose first ``num_prefix_tokens`` rows are the
model's own CLS/register tokens and the rest its patch tokens; VPT prompts (method.md 4)
are inserted by the tower right after the prefix rows and removed again before
:meth:`ImageTrunk.pool`, which always sees exactly the model's own tokens. So with no
prompts every path equals the family's own ``encode_image`` (tested per family).

The text encoder runs the tower on token *embeddings*, so learned context vectors can
replace the embeddings of placeholder words (method.md 3).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "BackboneAdapter",
    "ImageTrunk",
    "PromptSlot",
    "TextEncoder",
    "Preprocessing",
]


@dataclass(frozen=True)
class PromptSlot:
    """Where visual prompt rows sit in a sequence handed to a unit: rows
    ``start .. start + count - 1``. Trunks whose attention depends on a row's position
    (rotary embeddings) need it; the others ignore it."""

    start: int
    count: int


@dataclass(frozen=True)
class Preprocessing:
    """The backbone's own input preprocessing (open_clip's preprocess config).

    Attributes:
        size: model input side in pixels (square inputs).
        mean, std: per-channel normalisation statistics.
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


class ImageTrunk(ABC):
    """One family of image towers, seen as embed -> units -> pool.

    Subclasses are registered with :func:`grmpiqa.backbones.registry.register_family`
    and built on the model's ``visual`` module (not owned: no parameters are copied).
    """

    #: registry key of the family (set by the registration decorator)
    family: ClassVar[str] = ""
    #: one-line description for ``grmpiqa backbones`` and docs/backbones.md
    summary: ClassVar[str] = ""
    #: whether :meth:`run_unit_rows` computes only the asked rows (the towers' fast path)
    row_selective: ClassVar[bool] = False

    def __init__(self, visual: nn.Module) -> None:
        self.visual: Any = visual

    # -- what the config tells (no model built) ------------------------------------------

    @classmethod
    @abstractmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        """Whether this family handles an open_clip model config."""

    @classmethod
    def refusal(cls, model_cfg: dict[str, Any]) -> str | None:
        """Why a config this family claims cannot run (None: it can)."""
        return None

    @classmethod
    def accepts(cls, visual: nn.Module) -> bool:
        """Whether a built image tower is of this family (by its classes)."""
        return False

    @classmethod
    def label(cls, model_cfg: dict[str, Any]) -> str:
        """A human name of the architecture (``"SigLIP ViT"``, ``"ConvNeXt"``)."""
        return cls.family

    @classmethod
    def config_visual_prompts(cls, model_cfg: dict[str, Any]) -> str | None:
        """Why visual prompts cannot apply to this config (None: they can)."""
        return None

    # -- geometry -----------------------------------------------------------------------

    @property
    def visual_prompts_problem(self) -> str | None:
        """Why VPT prompts cannot be inserted into this trunk (None: they can)."""
        return None

    @property
    def width(self) -> int:
        """Token width W (the width of a visual prompt)."""
        raise NotImplementedError(f"{self.family}: no token sequence")

    @property
    def patch_size(self) -> int:
        """Side of a patch in pixels (for the VPT init bound, method.md 4)."""
        return 16

    @property
    def num_prefix_tokens(self) -> int:
        """Own rows before the patch rows (CLS, registers); prompts go right after them."""
        return 0

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` of the input (quality maps)."""
        raise NotImplementedError(f"{self.family}: no patch grid")

    @property
    def pooled_rows(self) -> int | None:
        """How many leading rows the pooling reads (1: the CLS token; None: all)."""
        return None

    @property
    def row_problem(self) -> str | None:
        """Why :meth:`run_unit_rows` is not a row-selective computation (None: it is)."""
        return "the blocks compute every row"

    # -- the forward pass ---------------------------------------------------------------

    @property
    @abstractmethod
    def n_units(self) -> int:
        """Number of units (blocks) between embed and pool."""

    @abstractmethod
    def unit_modules(self) -> list[nn.Module]:
        """The units' modules in order (one per unit; parameter groups, freezing)."""

    @abstractmethod
    def final_norm_modules(self) -> list[nn.Module]:
        """The trunk's final normalisation layers (stage 2's ``ln_post`` group)."""

    @abstractmethod
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Input embedding: ``[N, 3, H, W]`` -> the state entering unit 0."""

    @abstractmethod
    def run_unit(
        self, index: int, x: torch.Tensor, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        """Unit ``index`` on a hidden state (with prompt rows at ``prompts``)."""

    def run_unit_rows(
        self, index: int, x: torch.Tensor, rows: int, prompts: PromptSlot | None = None
    ) -> torch.Tensor:
        """Unit ``index`` for the first ``rows`` rows of ``x`` (keys and values from
        every row): equal to ``run_unit(index, x)[:, :rows]`` up to rounding."""
        return self.run_unit(index, x, prompts)[:, :rows]

    @abstractmethod
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The head: final norms, pooling, projection of the model's own tokens (or
        feature map) -> unnormalised image embedding ``[N, D]``."""

    def token_readout(self, x: torch.Tensor) -> torch.Tensor:
        """The head applied to every token alone: ``[N, T, W]`` -> ``[N, T, D]``
        (quality maps; row ``num_prefix_tokens + j`` is patch ``j``)."""
        raise NotImplementedError(f"{self.family}: no per-token read-out")

    def head_parameters(self) -> list[nn.Parameter]:
        """Every parameter used after the last unit (final norms, pooler, projection)."""
        return [p for m in self.final_norm_modules() for p in m.parameters()]

    def embed_parameters(self) -> list[nn.Parameter]:
        """Every parameter used before unit 0 (the trunk less its units and head)."""
        skip = {id(p) for m in self.unit_modules() for p in m.parameters()}
        skip |= {id(p) for p in self.head_parameters()}
        return [p for p in self.visual.parameters() if id(p) not in skip]

    # -- conveniences --------------------------------------------------------------------

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for i in range(self.n_units):
            x = self.run_unit(i, x)
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embedding without prompts (= the family's encode_image)."""
        return self.pool(self.forward_features(images))

    def config(self) -> dict[str, Any]:
        """What a checkpoint records about this trunk (family and layout)."""
        cfg: dict[str, Any] = {"family": self.family, "units": self.n_units}
        if self.visual_prompts_problem is None:
            cfg.update(width=self.width, prefix_tokens=self.num_prefix_tokens)
        return cfg


class TextEncoder(ABC):
    """One kind of text tower, run on token embeddings (method.md 3)."""

    kind: ClassVar[str] = ""

    def __init__(self, clip: nn.Module) -> None:
        self.clip: Any = clip

    @classmethod
    @abstractmethod
    def claims(cls, model_cfg: dict[str, Any]) -> bool:
        """Whether this kind handles an open_clip model config."""

    @classmethod
    def refusal(cls, model_cfg: dict[str, Any]) -> str | None:
        return None

    @property
    @abstractmethod
    def width(self) -> int:
        """Width of a token embedding (of a learned context vector)."""

    @property
    @abstractmethod
    def token_embedding(self) -> nn.Module:
        """The module mapping token ids to embeddings."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)  # type: ignore[no-any-return]

    @abstractmethod
    def forward(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, truncate: bool = False
    ) -> torch.Tensor:
        """Unnormalised text features ``[n, D]`` of token embeddings ``[n, L, W]``;
        ``tokens`` are the ids the embeddings stand for (pooling, masks). ``truncate``
        may skip positions after the pooled one where that is exact."""

    def encode(self, tokens: torch.Tensor, truncate: bool = False) -> torch.Tensor:
        return self.forward(self.embed(tokens), tokens, truncate)

    @abstractmethod
    def unit_modules(self) -> list[nn.Module]:
        """The transformer blocks in order (stage 2's ``text_blocks`` group)."""

    @abstractmethod
    def final_norm_modules(self) -> list[nn.Module]:
        """The final norms (stage 2's ``ln_final`` group)."""

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "width": self.width, "units": len(self.unit_modules())}


@dataclass
class BackboneAdapter:
    """Everything GRMP-IQA needs from one open_clip model, behind one interface.

    Attributes:
        name: the backbone name (open_clip registry name or ``local-dir:PATH``).
        clip: the open_clip model (weights owned by the caller).
        image: the image trunk of its family.
        text: its text encoder.
        preprocessing: the backbone's own input size, statistics and interpolation.
        tokenizer: callable ``list[str] -> LongTensor [n, L]``.
    """

    name: str
    clip: Any
    image: ImageTrunk
    text: TextEncoder
    preprocessing: Preprocessing
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.image.family

    @property
    def visual_prompts_problem(self) -> str | None:
        return self.image.visual_prompts_problem

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint, never trained (method.md 1)."""
        return float(self.clip.logit_scale.detach().float().exp().reshape(-1)[0].item())

    @property
    def logit_bias(self) -> float | None:
        """The sigmoid-trained bias (SigLIP); it cancels in GRMP-IQA's softmaxes."""
        b = getattr(self.clip, "logit_bias", None)
        return None if b is None else float(b.detach().float().reshape(-1)[0].item())

    def parameter_modules(self, last_units: int) -> dict[str, list[nn.Module]]:
        """Modules of stage 2's backbone groups (method.md 7): the last ``last_units``
        units of each tower and the final norms."""
        img = self.image.unit_modules()
        txt = self.text.unit_modules()
        k = max(0, int(last_units))
        return {
            "text_blocks": txt[len(txt) - k :] if k else [],
            "image_blocks": img[len(img) - k :] if k else [],
            "ln_final": self.text.final_norm_modules(),
            "ln_post": self.image.final_norm_modules(),
        }

    def config(self) -> dict[str, Any]:
        """What a checkpoint records: family, text kind and layout of both towers."""
        p = self.preprocessing
        return {
            "family": self.family,
            "image": self.image.config(),
            "text": self.text.config(),
            "input_size": p.size,
        }
