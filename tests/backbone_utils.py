"""Helpers for backbone tests: tiny Hugging Face tokenizers and text towers built locally.

No hub access here: a tokenizer is built with the ``tokenizers`` package from a small
word list and saved with ``transformers``' ``save_pretrained``, exactly the folder layout
a user gets from the hub; open_clip's ``HFTokenizer`` then loads it from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "a photo of high low quality good bad X Y x y cat animal cityscape human indoor "
    "landscape night plant still_life others . ,"
).split()


def make_hf_tokenizer(folder: Path, *, bos: bool = False) -> Path:
    """A word-level fast tokenizer saved in ``folder`` (SigLIP-like: ``</s>`` appended,
    pad id 0; with ``bos`` a ``<s>`` first, RoBERTa-like)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    single = "<s> $A </s>" if bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("</s>", 1), ("<s>", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def make_hf_text_config(folder: Path) -> Path:
    """A tiny RoBERTa config (and tokenizer) in ``folder``: an HF text tower's source."""
    from transformers import RobertaConfig

    make_hf_tokenizer(folder, bos=True)
    cfg = RobertaConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=1,
    )
    cfg.save_pretrained(str(folder))
    return folder


def register_hf_text_twin(root: Path) -> str:
    """Register ``tiny-hf-text``: an open_clip ViT with a tiny RoBERTa text tower."""
    import open_clip

    src = make_hf_text_config(root / "roberta")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 16,
        },
        "text_cfg": {
            "hf_model_name": str(src),
            "hf_tokenizer_name": str(src),
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 77,
        },
    }
    cfg_dir = root / "cfgs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "tiny-hf-text.json").write_text(json.dumps(cfg), encoding="utf-8")
    open_clip.add_model_config(str(cfg_dir))
    return "tiny-hf-text"
