"""grmpiqa <= 0.2 kept open_clip's ViT layout in ``grmpiqa._openclip``; it now lives in the
backbone adapters. This name stays an alias of :mod:`grmpiqa.backbones.openclip_vit` (the
same module object), imported on first use."""

import sys

from grmpiqa.backbones import openclip_vit

sys.modules[__name__] = openclip_vit
