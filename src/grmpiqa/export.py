"""Export of the whole scorer to ONNX (``grmpiqa export CKPT --format onnx --out m.onnx``).

The exported graph is the scorer of :meth:`QualityModel.score` after preprocessing:
input ``image``, float32 ``[N, 3, crop, crop]`` (the image resized to ``resize`` x
``resize``, bicubic, aspect not kept, centre-cropped and normalised with the model's
mean/std, as recorded in the graph's metadata), output ``p``, float32 ``[N]``,
p(high quality) in (0, 1). The quality prompts' text features are computed once and
baked in as a constant, so neither the text tower nor the tokenizer is exported; the
batch axis is dynamic. ``onnxruntime`` reproduces torch's scores to float rounding
(tests check max |diff| <= 1e-4 in fp32). Needs ``pip install 'grmpiqa[onnx]'``.

The graph's metadata (``metadata_props``) carries the preprocessing, the backbone, the
weights identity, the checkpoint's MOS map record when it has one, and the grmpiqa
version, so a consumer can preprocess the same way and map p to MOS.

Example:
    >>> export_onnx(model, "model.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grmpiqa._version import __version__
from grmpiqa.errors import GrmpiqaError
from grmpiqa.model import QualityModel
from grmpiqa.utils import atomic_path

__all__ = [
    "ONNX_EXTRA_HINT",
    "FORMATS",
    "OnnxScorer",
    "check_onnx",
    "export_onnx",
    "onnx_metadata",
]

FORMATS: tuple[str, ...] = ("onnx",)
ONNX_EXTRA_HINT = "ONNX export needs onnx and onnxscript: pip install 'grmpiqa[onnx]'"
#: ONNX opset of the export (onnxruntime >= 1.17 runs it).
OPSET = 18


class OnnxScorer(nn.Module):
    """Preprocessed images ``[N, 3, H, W]`` -> p(high quality) ``[N]``, with the quality
    prompts' text features fixed (method.md 1: ``softmax(s [v.t_hq, v.t_lq])[0]``)."""

    text: torch.Tensor

    def __init__(self, model: QualityModel) -> None:
        super().__init__()
        self.model = model.eval()
        with torch.no_grad():
            text = model.quality_text_features().float()
        self.register_buffer("text", text.detach().clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(self.model.encode_image(image), self.text)


def onnx_metadata(model: QualityModel) -> dict[str, str]:
    """What a consumer of the graph needs besides the graph (all values JSON strings)."""
    pre = model.preprocess.to_dict()
    from grmpiqa.transforms import stats_for

    mean, std = stats_for(str(pre.get("stats", "imagenet")))
    meta: dict[str, Any] = {
        "grmpiqa_version": __version__,
        "input": "image: float32 [N, 3, crop, crop], resized, centre-cropped, normalised",
        "output": "p: float32 [N], p(high quality) in (0, 1), higher is better",
        "preprocess": {**pre, "mean": list(mean), "std": list(std)},
        "backbone": model.backbone_name,
        "weights": model.backbone_pretrained,
        "prompts": model.describe_prompts(),
        "checkpoint": Path(model.checkpoint_ref).name
        if model.checkpoint_ref and not model.checkpoint_ref.startswith("hf-hub:")
        else model.checkpoint_ref,
        "scale": model.score_scale.to_dict() if model.score_scale is not None else None,
    }
    return {k: json.dumps(v) for k, v in meta.items()}


def _require_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise GrmpiqaError(ONNX_EXTRA_HINT) from None
    return onnx


def export_onnx(
    model: QualityModel,
    out: str | os.PathLike[str],
    *,
    opset: int = OPSET,
) -> Path:
    """Write the scorer of ``model`` as an ONNX graph to ``out`` (atomically).

    Raises:
        GrmpiqaError: onnx/onnxscript missing (one line naming the extra), or the export
            failed (one line).
    """
    onnx = _require_onnx()
    out = Path(out)
    scorer = OnnxScorer(model.float().cpu()).eval()
    crop = model.preprocess.crop
    example = torch.rand(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                scorer,
                (example,),
                dynamo=True,
                input_names=["image"],
                output_names=["p"],
                dynamic_shapes={"image": {0: batch}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - the exporter raises many types
            text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise GrmpiqaError(
                f"{out}: ONNX export failed ({type(err).__name__}: {text})"
            ) from None
        if program is None:  # pragma: no cover - dynamo=True returns the program
            raise GrmpiqaError(f"{out}: ONNX export produced nothing")
        proto = program.model_proto
        for key, value in onnx_metadata(model).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = f"grmpiqa.{key}", value
        onnx.save_model(proto, str(tmp))
    return out


def check_onnx(model: QualityModel, path: str | os.PathLike[str], n: int = 3) -> float | None:
    """Max |p_onnxruntime - p_torch| on ``n`` seeded random inputs (None without
    onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    crop = model.preprocess.crop
    x = torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["p"], {"image": x.numpy()})[0]
    with torch.no_grad():
        want = OnnxScorer(model)(x).numpy()
    return float(abs(got - want).max())
