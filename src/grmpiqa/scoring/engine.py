"""The batch scorer shared by the API, ``grmpiqa score`` (local and Ray engines), Ray,
the service and evaluation: the one inference loop.

Contract: every image is decoded and preprocessed on its own (the image pipeline,
:mod:`grmpiqa.pipeline`), the models run in eval mode, so a score does not depend on the
batch it is in; the quality text features are computed once per run; reading and
decoding run in DataLoader workers (local engine) or in the Ray actor's threads; on CUDA
JPEGs are decoded by nvJPEG and the next batch is prepared while the model runs.

The model is called through :func:`text_features` (once per run) and
:meth:`BatchScorer.score_tensor`, which reads the model's own output
(:meth:`~grmpiqa.model.QualityModel.probabilities`); for several checkpoints that share
their frozen prefix (``--checkpoint A --checkpoint B``) the frozen blocks run once and
only the fine-tuned blocks run per checkpoint. In bf16 the image towers run on copies
whose matrix weights are stored in bf16 (:meth:`~grmpiqa.towers.PromptedVisionTower.frozen_copy`:
the same scores bit for bit, without autocast re-casting frozen weights every batch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from grmpiqa.config import DEFAULT_MAX_BATCH_BYTES as _DEFAULT_MAX_BATCH_BYTES
from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import DEFAULT_MAX_PIXELS, decoded_bytes, probe_image, split_by_budget
from grmpiqa.pipeline import (
    DEVICE_DECODE_BUDGET,
    ImageLoader,
    ItemPlan,
    collate,
    resolve_decode,
    to_device,
)
from grmpiqa.precision import autocast, check_precision, resolve_precision
from grmpiqa.prompts import l2_normalize
from grmpiqa.scoring.inputs import ImageSource, probe_source

if TYPE_CHECKING:
    from grmpiqa.model import QualityModel
    from grmpiqa.towers import PromptedVisionTower

#: What one item to score may be: a path, a PIL image, an ImageSource, or encoded bytes
#: with the name errors should use.
Item = Any


#: Decoded bytes one batch may hold at once (``grmpiqa score --max-decoded-mb``).
DEFAULT_MAX_BATCH_BYTES = _DEFAULT_MAX_BATCH_BYTES


def decode_groups(
    items: Sequence[Item], max_batch_bytes: int | None, max_pixels: int, min_side: int | None
) -> list[list[int]]:
    """The per-batch decoded-pixel budget: which items of a batch may be decoded at once.

    The budget counts decoded bytes (:func:`grmpiqa.images.decoded_bytes`: width x height
    x channels x bytes per sample, from each header, before any pixel is decoded). Items
    decoded one at a time (the DataLoader path) hold one image at a time, so there the
    budget bounds each image (:func:`prepare` refuses a larger one); several decoding at
    once (threads, a batched decoder) hold at most one group of this split together.
    """
    if max_batch_bytes is None:
        return [list(range(len(items)))]
    costs = [_decode_cost(it, max_pixels, min_side) for it in items]
    return split_by_budget(costs, max_batch_bytes)


def _decode_cost(item: Item, max_pixels: int, min_side: int | None) -> int:
    """Decoded bytes of one item from its header; 0 when unreadable (decoding says why)."""
    try:
        if isinstance(item, Image.Image):
            return decoded_bytes(item)
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], bytes | bytearray):
            return probe_image(
                bytes(item[0]), str(item[1]), max_pixels, min_side=min_side
            ).decoded_bytes
        if isinstance(item, str | os.PathLike):
            item = ImageSource(os.fspath(item))
        if isinstance(item, ImageSource):
            return probe_source(item, max_pixels, min_side).decoded_bytes
    except ImageError:
        pass
    return 0


@dataclass
class ScoredBatch:
    """Scores of the readable items of one batch and the errors of the others.

    ``scores`` is ``[len(indices)]`` for one model (:func:`iter_scores`) and
    ``[len(indices), n_models]`` from :class:`BatchScorer`.
    """

    indices: list[int]
    scores: torch.Tensor
    errors: list[tuple[int, str]]


def check_workers(num_workers: int) -> int:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise GrmpiqaError(
            f"number of DataLoader workers must be 0 (decode in-process) or more, got {num_workers}"
        )
    return num_workers


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise GrmpiqaError(f"batch size must be at least 1, got {batch_size}")
    return batch_size


# -- the model calls -------------------------------------------------------------------------


@torch.inference_mode()
def text_features(model: QualityModel, precision: str) -> torch.Tensor:
    """The two quality prompt features, computed once per scoring run (eval mode)."""
    with autocast(model.device, precision):
        return model.quality_text_features().float()


@torch.inference_mode()
def _score_tensor(
    model: QualityModel,
    x: torch.Tensor,
    precision: str,
    text: torch.Tensor,
    tower: PromptedVisionTower | None = None,
) -> torch.Tensor:
    """p(high quality) of model input ``[N, 3, H, W]`` (method.md 1), on the CPU.
    ``tower``: the image tower to run (default the model's; a frozen bf16 copy)."""
    tower = model.image_tower if tower is None else tower
    x = x.to(model.device, non_blocking=True)
    with autocast(model.device, precision):
        p = model.probabilities(l2_normalize(tower(x)), text)
    return p.cpu()


@torch.inference_mode()
def _score_shared_prefix(
    models: Sequence[QualityModel],
    towers: Sequence[PromptedVisionTower],
    x: torch.Tensor,
    precision: str,
    texts: Sequence[torch.Tensor],
    split: int,
) -> torch.Tensor:
    """Scores ``[N, len(models)]`` of checkpoints whose image towers agree before block
    ``split`` (:func:`shared_prefix_blocks`): the embedding and blocks ``0..split-1`` run
    once (``tower.hidden``), blocks ``split..`` and the head per checkpoint
    (``tower.forward_from``); both are the tower's exact fast path.

    Equal to :func:`_score_tensor` per model up to float rounding (tested to 1e-5).
    """
    first = models[0]
    x = x.to(first.device, non_blocking=True)
    out = []
    with autocast(first.device, precision):
        hidden = towers[0].hidden(x, split)
        for m, tower, text in zip(models, towers, texts, strict=True):
            feats = l2_normalize(tower.forward_from(hidden, split))
            out.append(m.probabilities(feats, text))
    return torch.stack(out, dim=1).cpu()


def shared_prefix_blocks(models: Sequence[QualityModel]) -> int | None:
    """How many leading image blocks several models share exactly, or None.

    The image towers decide (:meth:`~grmpiqa.towers.PromptedVisionTower.shared_blocks`);
    the models must also sit on one device. Stage-2 checkpoints fine-tuned from one
    stage-1 checkpoint (method.md 7) share every block before their fine-tuned ones.
    """
    if len(models) < 2:
        return None
    first = models[0]
    if any(m.device != first.device for m in models[1:]):
        return None
    split = min(first.image_tower.shared_blocks(m.image_tower) for m in models[1:])
    return split or None


# -- the batch scorer --------------------------------------------------------------------------


class BatchScorer:
    """Scores batches of images with one or several models (one score column each).

    Puts the models in eval mode. Text features are computed here, once. With several
    models that share their leading image blocks (:func:`shared_prefix_blocks`) those run
    once per batch; otherwise each model runs in full. All models must use the same
    preprocessing and sit on one device.

    Args:
        models: one :class:`QualityModel` or several (``--checkpoint`` repeated).
        names: score column suffixes, one per model (default ``score`` for one model,
            ``score_0``, ``score_1``, ... for several).
        precision: ``fp32``, ``bf16`` or ``auto`` (see :mod:`grmpiqa.precision`).
        max_pixels: larger images are refused before decoding.
        max_batch_bytes: the decoded-pixel budget of a batch in bytes, bit depth counted
            (:func:`decode_groups`): an image over it is refused from its header, threads
            and the device decoder (nvJPEG) hold at most this much decoded at once; None:
            no budget.
        reduced_decode: let large JPEGs decode at a reduced DCT scale (1/2, 1/4, 1/8)
            down to the resize target (``PreprocessConfig.decode_min_side``) in the
            Pillow decoder; scores move by less than 0.001 on 12-megapixel photos
            (``benchmarks/score_throughput.py``). False decodes every image in full.
        decode: ``auto``, ``pil`` or ``torch`` (:mod:`grmpiqa.pipeline`).
        frozen_bf16: in bf16, run towers whose matrix weights are stored in bf16 (the
            same scores, faster); False keeps autocast on the fp32 weights.
    """

    def __init__(
        self,
        models: QualityModel | Sequence[QualityModel],
        *,
        names: Sequence[str] | None = None,
        precision: str = "fp32",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        share_prefix: bool = True,
        reduced_decode: bool = True,
        decode: str = "auto",
        frozen_bf16: bool = True,
        max_batch_bytes: int | None = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        self.models = [models] if not isinstance(models, Sequence) else list(models)
        if not self.models:
            raise GrmpiqaError("no model to score with")
        check_precision(precision)
        self.max_bytes = max_batch_bytes
        pre = self.models[0].preprocess
        for m in self.models[1:]:
            if m.preprocess != pre:
                raise GrmpiqaError(
                    "checkpoints scored together must use the same preprocessing; got "
                    f"{pre} and {m.preprocess} (score them in separate runs)"
                )
            if m.device != self.models[0].device:
                raise GrmpiqaError(
                    f"models scored together must sit on one device, got {self.device} and "
                    f"{m.device}"
                )
        if names is None:
            names = (
                ["score"]
                if len(self.models) == 1
                else [f"score_{i}" for i in range(len(self.models))]
            )
        if len(names) != len(self.models) or len(set(names)) != len(names):
            raise GrmpiqaError(f"need one distinct score column name per model, got {list(names)}")
        self.columns = list(names)
        for m in self.models:
            m.eval()
        #: the precision asked for, and what it resolves to on the models' device
        self.precision = precision
        self.resolved_precision = resolve_precision(precision, self.device)
        self.preprocess = pre
        self.max_pixels = max_pixels
        self.reduced_decode = reduced_decode
        self.min_side = pre.decode_min_side if reduced_decode else None
        self.decode = resolve_decode(decode, self.device)
        self.texts = [text_features(m, precision) for m in self.models]
        self.split = shared_prefix_blocks(self.models) if share_prefix else None
        self.towers: list[PromptedVisionTower] = [
            m.image_tower.frozen_copy(torch.bfloat16)
            if frozen_bf16 and self.resolved_precision == "bf16"
            else m.image_tower
            for m in self.models
        ]

    @property
    def device(self) -> torch.device:
        return self.models[0].device

    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Scores ``[N, n_models]`` (on the CPU) of model input ``[N, 3, H, W]``
        (preprocessed and normalised, on any device)."""
        if x.shape[0] == 0:
            return torch.empty(0, len(self.models))
        p = self.resolved_precision
        if len(self.models) == 1:
            return _score_tensor(self.models[0], x, p, self.texts[0], self.towers[0])[:, None]
        if self.split is not None:
            return _score_shared_prefix(self.models, self.towers, x, p, self.texts, self.split)
        return torch.stack(
            [
                _score_tensor(m, x, p, t, tw)
                for m, t, tw in zip(self.models, self.texts, self.towers, strict=True)
            ],
            dim=1,
        )

    def item_plan(self, device_decode: bool | None = None) -> ItemPlan:
        """What the pipeline does with each item for this scorer."""
        if device_decode is None:
            device_decode = self.device.type == "cuda" and self.decode == "torch"
        return ItemPlan(
            self.preprocess,
            self.max_pixels,
            self.min_side,
            self.decode,
            device_decode and self.decode == "torch",
            self.max_bytes,
        )

    def score_items(self, items: Sequence[Item], decode_threads: int = 1) -> ScoredBatch:
        """Read and decode one batch of items in this process (in ``decode_threads``
        threads, at most one :func:`decode_groups` group at a time; on CUDA JPEGs are
        decoded by nvJPEG), then score it."""
        plan = self.item_plan()
        prepared: list[Any] = [(None, None)] * len(items)
        if decode_threads > 1 and len(items) > 1:
            groups = decode_groups(items, self.max_bytes, self.max_pixels, self.min_side)
            with ThreadPoolExecutor(decode_threads) as pool:
                for group in groups:
                    done = pool.map(plan.prepare, [items[i] for i in group])
                    for i, res in zip(group, done, strict=True):
                        prepared[i] = res
        else:
            prepared = [plan.prepare(it) for it in items]
        host = collate(list(enumerate(prepared)))
        batch = to_device(
            host, self.device, self.preprocess, self.max_pixels, budget=self._device_budget
        )
        return ScoredBatch(batch.indices, self.score_tensor(batch.pixels), batch.errors)

    @property
    def _device_budget(self) -> int:
        return self.max_bytes if self.max_bytes is not None else DEVICE_DECODE_BUDGET

    def loader(
        self,
        items: Sequence[Item],
        batches: Sequence[Sequence[int]] | int = 32,
        *,
        num_workers: int = 0,
        progress: bool = False,
        **kwargs: Any,
    ) -> ImageLoader:
        """The :class:`~grmpiqa.pipeline.ImageLoader` of ``items`` for these models."""
        if isinstance(batches, int):
            check_batch_size(batches)
        return ImageLoader(
            items,
            self.preprocess,
            self.device,
            batches,
            num_workers=check_workers(num_workers),
            decode=self.decode,
            max_pixels=self.max_pixels,
            reduced_decode=self.reduced_decode,
            max_decoded_bytes=self.max_bytes,
            progress=progress,
            **kwargs,
        )

    def iter_batches(
        self,
        items: Sequence[Item],
        batches: Sequence[Sequence[int]] | int = 32,
        *,
        num_workers: int = 0,
        progress: bool = False,
        **kwargs: Any,
    ) -> Iterator[ScoredBatch]:
        """Score ``items`` batch by batch, reading and decoding in ``num_workers``
        DataLoader workers (:class:`~grmpiqa.pipeline.ImageLoader`; ``kwargs`` go to it).

        ``batches`` is a batch size or explicit lists of item indices (the CLI keeps a
        batch inside one output part). Indices in the results refer to ``items``.
        """
        loader = self.loader(items, batches, num_workers=num_workers, progress=progress, **kwargs)
        for b in loader:
            yield ScoredBatch(b.indices, self.score_tensor(b.pixels), b.errors)


# -- API helpers (scoring.api.score, benchmarks) ---------------------------------------------


def iter_scores(
    model: QualityModel,
    items: Sequence[str | os.PathLike[str] | Image.Image],
    batch_size: int = 32,
    *,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: str = "auto",
) -> Iterator[ScoredBatch]:
    """Score images batch by batch (1-D scores); failures come back as ``(index, message)``."""
    check_batch_size(batch_size)
    check_workers(num_workers)
    was_training = model.training
    try:
        scorer = BatchScorer(model, precision=precision, max_pixels=max_pixels, decode=decode)
        for b in scorer.iter_batches(items, batch_size, num_workers=num_workers, progress=progress):
            yield ScoredBatch(b.indices, b.scores[:, 0], b.errors)
    finally:
        model.train(was_training)


def _as_batch(
    inputs: Any,
) -> torch.Tensor | list[Any]:
    """One path / PIL image / ``[3, H, W]`` tensor becomes a batch of one."""
    if isinstance(inputs, torch.Tensor):
        if not inputs.is_floating_point():
            raise GrmpiqaError(
                f"expected a float tensor with values in [0, 1], got dtype {inputs.dtype} "
                "(for 8-bit pixels use tensor.float() / 255)"
            )
        if inputs.ndim == 3:
            inputs = inputs.unsqueeze(0)
        if inputs.ndim != 4 or inputs.shape[1] != 3:
            raise GrmpiqaError(
                f"expected an image tensor [3, H, W] or a batch [N, 3, H, W], got shape "
                f"{tuple(inputs.shape)}"
            )
        if inputs.numel():
            lo, hi = float(inputs.min()), float(inputs.max())
            if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
                raise GrmpiqaError(
                    f"image tensor values must lie in [0, 1], got min {lo:g}, max {hi:g}"
                )
        return inputs
    if isinstance(inputs, str | os.PathLike | Image.Image | bytes):
        return [inputs]
    if isinstance(inputs, Sequence):
        return list(inputs)
    raise GrmpiqaError(
        f"cannot score an object of type {type(inputs).__name__}: pass paths, PIL images or a "
        "float tensor"
    )


def score_inputs(
    model: QualityModel,
    inputs: Any,
    batch_size: int = 32,
    *,
    precision: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    decode: str = "auto",
) -> torch.Tensor:
    """Scores of one or several paths / PIL images, or of a float tensor ``[N, 3, H, W]``
    (or ``[3, H, W]``) in [0, 1]; bad input raises :class:`GrmpiqaError`."""
    check_batch_size(batch_size)
    check_workers(num_workers)
    resolve_decode(decode, model.device)
    batch = _as_batch(inputs)
    if isinstance(batch, torch.Tensor):
        x = model.preprocess.preprocess_tensor(batch.to(model.device))
        was_training = model.training
        try:
            scorer = BatchScorer(model, precision=precision)
            parts = [
                scorer.score_tensor(x[i : i + batch_size])[:, 0]
                for i in range(0, len(x), batch_size)
            ]
        finally:
            model.train(was_training)
        return torch.cat(parts) if parts else torch.empty(0)
    out = torch.full((len(batch),), float("nan"))
    for b in iter_scores(
        model,
        batch,
        batch_size,
        precision=precision,
        num_workers=num_workers,
        progress=progress,
        decode=decode,
    ):
        if b.errors:
            raise ImageError(b.errors[0][1])
        out[b.indices] = b.scores
    return out


# -- scoring a plan of parts (grmpiqa score, local engine) ---------------------------------------

#: One result: (part index, item index in the part, scores or None, error or None).
Result = tuple[int, int, list[float] | None, str | None]


def plan_batches(
    pending: Sequence[tuple[Any, Sequence[int]]], batch_size: int
) -> tuple[list[ImageSource], list[tuple[int, int]], list[list[int]]]:
    """Flatten ``(part, item indices)`` into items, their (part, item) places, and batches
    of at most ``batch_size`` that never cross a part (the same batches in every engine)."""
    check_batch_size(batch_size)
    items: list[ImageSource] = []
    where: list[tuple[int, int]] = []
    batches: list[list[int]] = []
    for part, todo in pending:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            batches.append(list(range(len(items), len(items) + len(chunk))))
            for i in chunk:
                items.append(part.items[i])
                where.append((part.index, i))
    return items, where, batches


def score_pending(
    scorer: BatchScorer,
    pending: Sequence[tuple[Any, Sequence[int]]],
    batch_size: int,
    *,
    num_workers: int = 0,
    progress: bool = False,
) -> Iterator[list[Result]]:
    """Score the pending items of a plan in this process; one list of results per batch."""
    items, where, batches = plan_batches(pending, batch_size)
    for b in scorer.iter_batches(items, batches, num_workers=num_workers, progress=progress):
        out: list[Result] = []
        rows = b.scores.tolist()
        for k, i in enumerate(b.indices):
            out.append((*where[i], rows[k], None))
        for i, msg in b.errors:
            out.append((*where[i], None, msg))
        yield out
