"""grmpiqa: few-shot blind image quality assessment by adapting CLIP (GRMP-IQA).

Example:
    >>> import grmpiqa
    >>> model = grmpiqa.create_model()  # ViT-B-16-quickgelu, OpenAI weights  # doctest: +SKIP
    >>> model.score(["photo.jpg"])  # doctest: +SKIP
    tensor([0.7312])
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from grmpiqa._version import __version__

if TYPE_CHECKING:
    from grmpiqa.backbone import Backbone, list_backbones, load_backbone
    from grmpiqa.checkpoint import read_metadata, save_checkpoint
    from grmpiqa.data import Dataset, load_dataset, make_split, make_splits
    from grmpiqa.errors import (
        BackboneError,
        CheckpointError,
        DatasetError,
        GrmpiqaError,
        ImageError,
    )
    from grmpiqa.evaluation import ProtocolConfig, ProtocolResult, run_protocol
    from grmpiqa.factory import create_model
    from grmpiqa.finetune import FinetuneConfig, FinetuneResult, finetune
    from grmpiqa.gradient import quality_aware_gradient
    from grmpiqa.losses import distillation_loss, quality_loss
    from grmpiqa.metatrain import PretrainConfig, pretrain
    from grmpiqa.metrics import evaluate_predictions, krcc, plcc, plcc_logistic, rmse, srcc
    from grmpiqa.model import (
        CLIPIQA_PROMPTS,
        STAGE1_GROUPS,
        STAGE2_GROUPS,
        ModelConfig,
        QualityModel,
    )
    from grmpiqa.released import import_released
    from grmpiqa.transforms import PreprocessConfig

# Where each public name lives; imported on first use, so that importing grmpiqa (and
# starting the command line) does not load torch and open_clip (PEP 562).
_LAZY: dict[str, str] = {
    "Backbone": "grmpiqa.backbone",
    "list_backbones": "grmpiqa.backbone",
    "load_backbone": "grmpiqa.backbone",
    "read_metadata": "grmpiqa.checkpoint",
    "save_checkpoint": "grmpiqa.checkpoint",
    "Dataset": "grmpiqa.data",
    "load_dataset": "grmpiqa.data",
    "make_split": "grmpiqa.data",
    "make_splits": "grmpiqa.data",
    "BackboneError": "grmpiqa.errors",
    "CheckpointError": "grmpiqa.errors",
    "DatasetError": "grmpiqa.errors",
    "GrmpiqaError": "grmpiqa.errors",
    "ImageError": "grmpiqa.errors",
    "ProtocolConfig": "grmpiqa.evaluation",
    "ProtocolResult": "grmpiqa.evaluation",
    "run_protocol": "grmpiqa.evaluation",
    "create_model": "grmpiqa.factory",
    "FinetuneConfig": "grmpiqa.config",
    "FinetuneResult": "grmpiqa.finetune",
    "finetune": "grmpiqa.finetune",
    "quality_aware_gradient": "grmpiqa.gradient",
    "distillation_loss": "grmpiqa.losses",
    "quality_loss": "grmpiqa.losses",
    "PretrainConfig": "grmpiqa.config",
    "pretrain": "grmpiqa.metatrain",
    "evaluate_predictions": "grmpiqa.metrics",
    "krcc": "grmpiqa.metrics",
    "plcc": "grmpiqa.metrics",
    "plcc_logistic": "grmpiqa.metrics",
    "rmse": "grmpiqa.metrics",
    "srcc": "grmpiqa.metrics",
    "CLIPIQA_PROMPTS": "grmpiqa.config",
    "STAGE1_GROUPS": "grmpiqa.config",
    "STAGE2_GROUPS": "grmpiqa.config",
    "ModelConfig": "grmpiqa.model",
    "QualityModel": "grmpiqa.model",
    "import_released": "grmpiqa.released",
    "PreprocessConfig": "grmpiqa.transforms",
}

__all__ = [
    "CLIPIQA_PROMPTS",
    "STAGE1_GROUPS",
    "STAGE2_GROUPS",
    "Backbone",
    "BackboneError",
    "CheckpointError",
    "Dataset",
    "DatasetError",
    "FinetuneConfig",
    "FinetuneResult",
    "GrmpiqaError",
    "ImageError",
    "ModelConfig",
    "PreprocessConfig",
    "PretrainConfig",
    "ProtocolConfig",
    "ProtocolResult",
    "QualityModel",
    "__version__",
    "create_model",
    "distillation_loss",
    "evaluate_predictions",
    "finetune",
    "import_released",
    "krcc",
    "list_backbones",
    "load_backbone",
    "load_dataset",
    "make_split",
    "make_splits",
    "plcc",
    "plcc_logistic",
    "pretrain",
    "quality_aware_gradient",
    "quality_loss",
    "read_metadata",
    "rmse",
    "run_protocol",
    "save_checkpoint",
    "srcc",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'grmpiqa' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package: the function ``grmpiqa.finetune`` keeps its name when the submodule
    ``grmpiqa.finetune`` is imported (the import system sets the submodule as an
    attribute of its package; eager imports used to overwrite it with the function)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
