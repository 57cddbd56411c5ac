"""The quality model: CLIP towers + learned prompts -> p(high quality) (method.md 1-5).

Build one with :func:`grmpiqa.create_model` (:mod:`grmpiqa.factory`), which resolves the
backbone, the config and a checkpoint.

The model owns its output: :meth:`QualityModel.probabilities` turns image features into
p(high quality), the one place the formula is written. Scoring images (decoding, batches,
devices) is the job of the layer above: :func:`grmpiqa.scoring.api.score`, and
``model.score(...)`` on the models :func:`grmpiqa.create_model` returns.

Example:
    >>> import torch, grmpiqa
    >>> model = grmpiqa.create_model("test-tiny", pretrained=None)
    >>> x = model.preprocess.preprocess_tensor(torch.rand(2, 3, 256, 256))
    >>> with torch.no_grad():
    ...     p = model.probabilities(model.encode_image(x))
    >>> p.shape, bool(((p > 0) & (p < 1)).all())
    (torch.Size([2]), True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from grmpiqa.backbone import Backbone
from grmpiqa.backbones import BackboneAdapter, placeholder_start
from grmpiqa.config import CLIPIQA_PROMPTS as CLIPIQA_PROMPTS
from grmpiqa.config import STAGE1_GROUPS as STAGE1_GROUPS
from grmpiqa.config import STAGE2_GROUPS as STAGE2_GROUPS
from grmpiqa.errors import BackboneError
from grmpiqa.prompts import TextPromptLearner, VisualPrompts, l2_normalize, scaled_cosines
from grmpiqa.towers import PromptedVisionTower, TextTower
from grmpiqa.transforms import PreprocessConfig

if TYPE_CHECKING:
    from grmpiqa.scale import ScoreScale


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the adapted parts (stored in every checkpoint).

    Attributes:
        class_names: quality classes; index 0 is the "good" one (method.md 3).
        n_ctx: learned text context vectors shared by both classes.
        ctx_init_std: std of their normal init.
        hand_prompts: fixed prompts instead of learned context (``("Good photo.",
            "Bad photo.")`` with ``visual_prompts=False`` is zero-shot CLIP-IQA).
        visual_prompts: use VPT-deep in the image tower (method.md 4).
        vpt_tokens: visual prompt tokens per layer.
        vpt_deep_layers: blocks after the first with fresh prompts; None = all.
        vpt_dropout: dropout on projected visual prompts.
        finetune_blocks: last blocks of each tower trained in stage 2.
    """

    class_names: tuple[str, ...] = ("high quality", "low quality")
    n_ctx: int = 4
    ctx_init_std: float = 0.02
    hand_prompts: tuple[str, ...] | None = None
    visual_prompts: bool = True
    vpt_tokens: int = 100
    vpt_deep_layers: int | None = None
    vpt_dropout: float = 0.1
    finetune_blocks: int = 4

    def __post_init__(self) -> None:
        _check_limits(self)
        if len(self.class_names) != 2:
            raise ValueError("class_names must name exactly two classes (good, bad)")
        if self.hand_prompts is not None and len(self.hand_prompts) != 2:
            raise ValueError("hand_prompts must be two prompts (good, bad)")
        if self.n_ctx < 1 or self.vpt_tokens < 0 or self.finetune_blocks < 0:
            raise ValueError("n_ctx must be >= 1, vpt_tokens and finetune_blocks >= 0")
        if not 0.0 <= self.vpt_dropout < 1.0:
            raise ValueError(f"vpt_dropout must be in [0, 1), not {self.vpt_dropout}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        d["hand_prompts"] = list(self.hand_prompts) if self.hand_prompts else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "class_names" in kw:
            kw["class_names"] = tuple(kw["class_names"])
        if kw.get("hand_prompts") is not None:
            kw["hand_prompts"] = tuple(kw["hand_prompts"])
        return cls(**kw)


#: Limits on the sizes a :class:`ModelConfig` may ask for (it may come from a file),
#: checked before anything is allocated: name -> largest value.
MODEL_CONFIG_LIMITS = {
    "n_ctx": 64,
    "vpt_tokens": 1024,
    "vpt_deep_layers": 1024,
    "finetune_blocks": 1024,
}
_MAX_PROMPT_CHARS = 1000


def _check_limits(config: ModelConfig) -> None:
    for name, limit in MODEL_CONFIG_LIMITS.items():
        v = getattr(config, name)
        if v is None and name == "vpt_deep_layers":
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must be an integer, not {v!r}")
        if v > limit:
            raise ValueError(f"{name}={v} is over the limit of {limit}")
    for name in ("class_names", "hand_prompts"):
        texts = getattr(config, name)
        if texts is not None and not all(
            isinstance(t, str) and len(t) <= _MAX_PROMPT_CHARS for t in texts
        ):
            raise ValueError(f"{name} must be texts of at most {_MAX_PROMPT_CHARS} characters")


class QualityModel(nn.Module):
    """CLIP with learned prompts scoring ``q = softmax(s * [v.t_hq, v.t_lq])[0]``.

    ``s = exp(logit_scale)`` of the CLIP checkpoint, never trained (method.md 1). The
    image and text forward passes run through :attr:`image_tower` and :attr:`text_tower`
    (:mod:`grmpiqa.towers`). Training loops select what trains with
    :meth:`set_trainable` and the group names in ``STAGE1_GROUPS``/``STAGE2_GROUPS``.

    Every backbone is reached through its adapter (:attr:`adapter`,
    :mod:`grmpiqa.backbones`): no family's layout is known here. The backbone always runs
    in eval mode (BatchNorm statistics, stochastic depth and patch dropout stay off in
    training: stage 2 trains parameters, method.md 7); ``train()`` switches only the
    prompts' dropout.

    State-dict layout (checkpoints): ``clip.*`` (the open_clip model),
    ``prompt_learner.ctx`` (text context), ``visual.*`` (VPT prompt parameters).
    """

    logit_scale: torch.Tensor
    hand_tokens: torch.Tensor
    adapter: BackboneAdapter

    def __init__(
        self,
        backbone: Backbone,
        config: ModelConfig | None = None,
        preprocess: PreprocessConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        self.preprocess = preprocess or PreprocessConfig()
        self.backbone_name = backbone.name
        self.backbone_pretrained = dict(backbone.pretrained)
        self.backbone_model_cfg = dict(backbone.model_cfg)
        self.clip: Any = backbone.clip
        if backbone.adapter is None:
            raise BackboneError(f"{backbone.name}: a backbone without its adapter")
        adapter: BackboneAdapter = backbone.adapter
        self.__dict__["adapter"] = adapter
        self.tokenizer = backbone.tokenizer()
        cfg = self.config
        self.prompt_learner: TextPromptLearner | None = None
        if cfg.hand_prompts is None:
            self.prompt_learner = TextPromptLearner(
                adapter.text.token_embedding,
                self.tokenizer,
                cfg.class_names,
                cfg.n_ctx,
                cfg.ctx_init_std,
                ctx_start=placeholder_start(self.tokenizer, cfg.n_ctx, cfg.class_names[0]),
            )
        else:
            self.register_buffer(
                "hand_tokens", self.tokenizer(list(cfg.hand_prompts)), persistent=False
            )
        trunk = adapter.image
        self.visual: VisualPrompts | None = None
        if cfg.visual_prompts:
            if trunk.visual_prompts_problem is not None:
                raise BackboneError(
                    f"{backbone.name}: no visual prompts ({trunk.visual_prompts_problem}); "
                    "use visual_prompts=False"
                )
            self.visual = VisualPrompts(
                trunk.width,
                trunk.n_units,
                trunk.patch_size,
                cfg.vpt_tokens,
                cfg.vpt_deep_layers,
                cfg.vpt_dropout,
            )
        self.image_tower = PromptedVisionTower(trunk, self.visual)
        self.text_tower = TextTower(adapter.text)
        self.register_buffer("logit_scale", torch.tensor(adapter.logit_scale), persistent=False)
        #: state-dict keys that differ from the base CLIP (saved in checkpoints)
        self.adapted_keys: set[str] = set(self.parameter_names(("text_context", "visual_prompts")))
        #: the label scale and p -> MOS map a fine-tuning run recorded (``scale="mos"``)
        self.score_scale: ScoreScale | None = None
        #: where the prompts come from: ``"zero-shot"`` (hand prompts, nothing trained),
        #: ``"checkpoint"``, ``"training"`` (trained in this process), or None: learned
        #: prompts at their random init (UNTRAINED; set by the factory and the loops)
        self.prompt_origin: str | None = "zero-shot" if self.config.hand_prompts else None
        #: the checkpoint as the user named it (a file, or ``hf-hub:...``), if any, and
        #: the local grmpiqa file it resolved to (a Hub cache or conversion cache entry)
        self.checkpoint_ref: str | None = None
        self.checkpoint_file: Path | None = None
        self.set_trainable(())

    # -- encoders ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def train(self, mode: bool = True) -> QualityModel:
        """Train mode for the prompts (dropout); the backbone stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed images ``[N, 3, H, W]``."""
        return l2_normalize(self.image_tower(images))

    def quality_text_features(self, truncate: bool = False) -> torch.Tensor:
        """L2-normalised ``[t_hq, t_lq]`` (learned context or hand prompts)."""
        if self.prompt_learner is not None:
            feats = self.text_tower(self.prompt_learner(), self.prompt_learner.tokens, truncate)
        else:
            feats = self.text_tower.encode_tokens(self.hand_tokens, truncate)
        return l2_normalize(feats)

    def encode_text(self, texts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """L2-normalised features of hard prompts through this model's text tower."""
        return self.encode_tokens(self.tokenizer(list(texts)).to(self.device), truncate)

    def encode_tokens(self, tokens: torch.Tensor, truncate: bool = False) -> torch.Tensor:
        """L2-normalised features of tokenised hard prompts."""
        return l2_normalize(self.text_tower.encode_tokens(tokens, truncate))

    def logits_from_features(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        """Quality logits ``s * [v.t_hq, v.t_lq]`` of L2-normalised features (method.md 1)."""
        return scaled_cosines(self.logit_scale, image_features, text_features)

    def probabilities(
        self, image_features: torch.Tensor, text_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(high quality) ``= softmax(s * [v.t_hq, v.t_lq])[0]`` (method.md 1), float32.

        ``image_features``: L2-normalised embeddings ``[..., D]`` (``[N, D]`` images, or
        ``[N, T, D]`` per-token read-outs); ``text_features``: ``[t_hq, t_lq]`` (default:
        :meth:`quality_text_features`). Returns ``[...]`` on the features' device. The one
        place the model's output is computed: scoring, evaluation, validation, quality
        maps and the service all read it here.
        """
        if text_features is None:
            text_features = self.quality_text_features()
        logits = self.logits_from_features(image_features, text_features)
        return torch.softmax(logits.float(), dim=-1)[..., 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Quality logits ``[N, 2]`` (column 0: high quality) of preprocessed images."""
        return self.logits_from_features(self.encode_image(images), self.quality_text_features())

    # -- parameter groups -------------------------------------------------------------

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """Named parameter groups (method.md 6, 7), keyed by state-dict name.

        ``text_blocks``/``image_blocks``: the last ``finetune_blocks`` units of each tower
        (transformer blocks, or a convolutional trunk's residual blocks); ``ln_final`` /
        ``ln_post``: each tower's final norms (:meth:`BackboneAdapter.parameter_modules`).
        """
        modules: dict[str, list[nn.Module]] = {
            "text_context": [self.prompt_learner] if self.prompt_learner is not None else [],
            "visual_prompts": [self.visual] if self.visual is not None else [],
            **self.adapter.parameter_modules(self.config.finetune_blocks),
        }
        owner = {id(p): n for n, p in self.named_parameters()}
        out: dict[str, dict[str, nn.Parameter]] = {}
        for group, mods in modules.items():
            out[group] = {owner[id(p)]: p for m in mods for p in m.parameters() if id(p) in owner}
        return out

    def parameter_names(self, groups: Iterable[str]) -> list[str]:
        all_groups = self.parameter_groups()
        names: list[str] = []
        for g in groups:
            if g not in all_groups:
                raise ValueError(f"unknown parameter group {g!r}; known: {sorted(all_groups)}")
            names.extend(all_groups[g])
        return names

    def set_trainable(self, groups: Iterable[str]) -> list[nn.Parameter]:
        """Make exactly ``groups`` trainable (everything else frozen); return their params.

        The groups' tensors are recorded as adapted, so checkpoints include them.
        """
        names = set(self.parameter_names(groups))
        params = []
        for n, p in self.named_parameters():
            p.requires_grad_(n in names)
            if n in names:
                params.append(p)
        self.adapted_keys |= names
        return params

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def adapted_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: prompts plus every adapted backbone tensor."""
        sd = self.state_dict()
        return {k: sd[k].detach().cpu().contiguous() for k in sorted(self.adapted_keys) if k in sd}

    @property
    def is_random(self) -> bool:
        """Whether the backbone has random weights (announced; scores mean nothing)."""
        return self.backbone_pretrained.get("kind") == "random"

    def describe(self) -> str:
        """The backbone, its weights, the visual prompts and what the quality prompts are."""
        return f"{self.describe_backbone()}, {self.describe_prompts()}"

    def describe_backbone(self) -> str:
        """The backbone, its weights and the visual prompts' architecture."""
        p = self.backbone_pretrained
        if p.get("kind") == "random":
            w = f"RANDOM weights, seed {p.get('seed')}"
        elif p.get("kind") == "tag":
            w = f"pretrained '{p.get('tag')}'"
        else:
            w = f"weights from {p.get('path')}"
        vp = (
            f"VPT {self.config.vpt_tokens} tokens"
            if self.visual is not None
            else "no visual prompts"
        )
        return f"{self.backbone_name} ({w}), {vp}"

    @property
    def untrained(self) -> bool:
        """Learned prompts still at their random init (scores mean nothing)."""
        return self.prompt_learner is not None and self.prompt_origin is None

    def describe_prompts(self) -> str:
        """What the quality prompts are: zero-shot hand prompts, UNTRAINED learned
        prompts, or learned prompts from a checkpoint (or from training in this process)."""
        hand = self.config.hand_prompts
        if hand is not None:
            texts = " / ".join(repr(t) for t in hand)
            zero_shot = tuple(hand) == CLIPIQA_PROMPTS
            kind = "zero-shot CLIP-IQA prompts" if zero_shot else "hand prompts"
            return f"{kind} {texts}"
        if self.prompt_origin is None:
            return "UNTRAINED learned prompts (random init)"
        if self.prompt_origin == "checkpoint" and self.checkpoint_ref:
            return f"learned prompts from {self.checkpoint_ref}"
        return f"learned prompts ({self.prompt_origin})"
