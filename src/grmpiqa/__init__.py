"""grmpiqa: few-shot blind image quality assessment by adapting CLIP (GRMP-IQA).

Example:
    >>> import grmpiqa
    >>> model = grmpiqa.create_model()  # ViT-B-16-quickgelu, OpenAI weights  # doctest: +SKIP
    >>> model.score(["photo.jpg"])  # doctest: +SKIP
    tensor([0.7312])
"""

import sys as _sys

from grmpiqa._version import __version__
from grmpiqa.backbone import Backbone, list_backbones, load_backbone

# grmpiqa <= 0.2 kept open_clip's ViT layout in grmpiqa._openclip; it now lives in the
# backbone adapters (grmpiqa.backbones.openclip_vit), still reachable under the old name
from grmpiqa.backbones import openclip_vit as _openclip  # noqa: E402
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

_sys.modules.setdefault("grmpiqa._openclip", _openclip)

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
