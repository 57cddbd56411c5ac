"""CLIP backbone resolution, in one place (method.md 2).

A backbone is an open_clip model name plus where its weights come from:

* an open_clip pretrained tag (``"openai"``), looked up in the local caches first and
  downloaded only when the network answers;
* a checkpoint file: an OpenAI-layout state dict or TorchScript archive (``ViT-B-16.pt``),
  or an open_clip ``.pt``/``.bin``/``.safetensors``;
* ``backbone="local-dir:PATH"``: an open_clip folder (``open_clip_config.json`` + weights);
* ``pretrained=None``: random weights from a recorded seed, announced on stderr every time.

Example:
    >>> bb = load_backbone("test-tiny", pretrained=None, seed=0)
    >>> bb.is_random
    True
"""

from __future__ import annotations

import hashlib
import os
import socket
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from grmpiqa.backbones import BackboneAdapter, build_adapter, resolve_name
from grmpiqa.config import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from grmpiqa.errors import BackboneError
from grmpiqa.log import GrmpiqaWarning, RandomWeightsWarning
from grmpiqa.utils import load_json

LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def _register_builtin_configs() -> None:
    """Register grmpiqa's own architectures (``test-tiny``) with open_clip."""
    if "test-tiny" not in open_clip.list_models():
        open_clip.add_model_config(str(_CONFIG_DIR))


_register_builtin_configs()


def list_backbones() -> list[str]:
    """Names of open_clip's registry (plus grmpiqa's tiny twins) that run the whole
    method here: resolved to a backbone adapter, with what they need installed
    (``grmpiqa backbones`` shows them with family and cost; docs/backbones.md)."""
    from grmpiqa.backbones.catalog import list_working

    return list_working()


@dataclass
class Backbone:
    """A loaded CLIP model and where it came from.

    Attributes:
        clip: the open_clip ``CLIP`` module (fp32, eval mode).
        name: the backbone name as given (``"ViT-B-16-quickgelu"``, ``"local-dir:/m"``).
        model_cfg: the architecture config; equal configs mean interchangeable weights.
        pretrained: identity of the weights, JSON-serialisable, e.g.
            ``{"kind": "tag", "tag": "openai"}`` or ``{"kind": "random", "seed": 0}``.
        adapter: the backbone adapter of its family (:mod:`grmpiqa.backbones`), through
            which everything else reaches the model.
    """

    clip: Any
    name: str
    model_cfg: dict[str, Any]
    pretrained: dict[str, Any] = field(default_factory=dict)
    adapter: BackboneAdapter | None = None

    @property
    def is_random(self) -> bool:
        return self.pretrained.get("kind") == "random"

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the checkpoint (about 100 for OpenAI CLIP), never trained."""
        return float(self.clip.logit_scale.detach().exp().reshape(-1)[0].item())

    def tokenizer(self) -> Any:
        if self.adapter is not None:
            return self.adapter.tokenizer
        try:
            return open_clip.get_tokenizer(self.name)
        except Exception as err:  # noqa: BLE001 - open_clip/HF tokenizers raise many types
            raise BackboneError(
                f"{self.name}: cannot build its tokenizer ({_first_line(err)})"
            ) from None

    def describe(self) -> str:
        p = self.pretrained
        kind = p.get("kind")
        if kind == "random":
            return f"{self.name} (RANDOM weights, seed {p.get('seed')})"
        if kind == "tag":
            return f"{self.name} (pretrained '{p.get('tag')}')"
        if kind == "file":
            return f"{self.name} (weights from {p.get('path')})"
        if kind == "hf-hub":
            return f"{self.name} (Hub weights at {str(p.get('revision'))[:12]})"
        return self.name


def default_pretrained(name: str) -> str | None:
    """The weights used when none are named: ``openai`` where open_clip knows that tag for
    ``name``, else its only tag, else ``None`` (random weights, announced) for
    architectures without pretrained tags such as ``test-tiny``."""
    if name.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)):
        return None
    tags = [str(t) for t in open_clip.list_pretrained_tags_by_model(name)]
    if DEFAULT_PRETRAINED in tags or not tags and name == DEFAULT_BACKBONE:
        return DEFAULT_PRETRAINED
    if len(tags) == 1:
        return tags[0]
    if not tags:
        return None
    raise BackboneError(
        f"{name} has several pretrained tags ({', '.join(tags)}); choose one with "
        "--pretrained TAG, pass a weights file, or --pretrained random",
        api=f"{name} has several pretrained tags ({', '.join(tags)}); choose one with "
        "pretrained='TAG', pass a weights file, or pretrained=None (random)",
    )


def announce_random(name: str, seed: int) -> None:
    """Announce, every time, that a backbone has random weights
    (a :class:`~grmpiqa.log.RandomWeightsWarning`; the CLI shows it on stderr)."""
    warnings.warn(
        f"backbone {name} has RANDOM weights (seed {seed}), not pretrained CLIP; its scores "
        "carry no learned quality knowledge.",
        RandomWeightsWarning,
        stacklevel=3,
    )


def model_config(name: str) -> dict[str, Any]:
    """The architecture config of ``name`` (a registry name, ``local-dir:PATH`` or
    ``hf-hub:OWNER/REPO``, whose files come from the Hugging Face cache or the Hub)."""
    if name.startswith(HF_HUB_PREFIX):
        from grmpiqa.hub import open_clip_folder

        name = f"{LOCAL_DIR_PREFIX}{open_clip_folder(name)[0]}"
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        cfg_path = folder / "open_clip_config.json"
        if not folder.is_dir():
            raise BackboneError(f"{folder}: local-dir backbone folder not found")
        if not cfg_path.is_file():
            raise BackboneError(
                f"{cfg_path}: missing (a local-dir backbone needs open_clip_config.json)"
            )
        try:
            cfg = load_json(cfg_path.read_text(encoding="utf-8"))["model_cfg"]
        except (ValueError, KeyError, TypeError) as err:
            raise BackboneError(f"{cfg_path}: not a valid open_clip config ({err})") from None
        return dict(cfg)
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise BackboneError(
            f"unknown backbone {name!r}; use an open_clip model name (see "
            "open_clip.list_models()), 'test-tiny', or 'local-dir:PATH'"
        )
    return dict(cfg)


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: str | os.PathLike[str] | None = DEFAULT_PRETRAINED,
    *,
    seed: int = 0,
    cache_dir: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Build an open_clip CLIP, load its weights and wrap it in its family's adapter.

    A name no adapter can run (:func:`grmpiqa.backbones.resolve_name`) is refused before
    anything is built, in one line saying why.

    Args:
        name: open_clip model name, ``"test-tiny"``, or ``"local-dir:PATH"``.
        pretrained: an open_clip tag, a checkpoint file, or ``None`` for random weights
            (ignored for ``local-dir:``, whose folder holds the weights).
        seed: seed of the random initialisation (recorded; used when ``pretrained=None``).
        cache_dir: open_clip/Hugging Face cache folder for tags.
        tokenizer: a folder holding a saved Hugging Face tokenizer, for backbones whose
            tokenizer is not in the local cache (SigLIP, SigLIP2; needs ``grmpiqa[hf]``).

    Raises:
        BackboneError: unknown name, unreadable file, or a tag whose weights are neither
            cached nor downloadable (offline).
    """
    if name.startswith(HF_HUB_PREFIX):  # an open_clip repository, through the Hub cache
        from grmpiqa.hub import open_clip_folder

        hub_folder, ref, revision = open_clip_folder(name, cache=cache_dir)
        bb = load_backbone(
            f"{LOCAL_DIR_PREFIX}{hub_folder}", None, seed=seed, cache_dir=cache_dir,
            tokenizer=tokenizer,
        )  # fmt: skip
        bb.name = name
        bb.pretrained = {"kind": "hf-hub", "repo": ref.repo_id, "revision": revision}
        return bb
    cfg = model_config(name)
    res = resolve_name(name)
    if res.refusal is not None:
        raise BackboneError(res.refusal)
    fin = _Finisher(name, cfg, tokenizer, cache_dir)
    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser().resolve()
        clip = _create(f"{LOCAL_DIR_PREFIX}{folder}", None, seed)
        identity: dict[str, Any] = {"kind": "local-dir", "path": str(folder)}
        return fin(Backbone(clip, name, cfg, identity))

    if pretrained is None:
        clip = _create(name, None, seed)
        bb = fin(Backbone(clip, name, cfg, {"kind": "random", "seed": int(seed)}))
        announce_random(name, seed)
        return bb

    pretrained = str(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        if tag_cfg.get("quick_gelu", False) != cfg.get("quick_gelu", False):
            warnings.warn(
                f"tag '{pretrained}' was trained with "
                f"quick_gelu={tag_cfg.get('quick_gelu', False)} but {name} uses "
                f"quick_gelu={cfg.get('quick_gelu', False)}; use "
                f"'{name}-quickgelu' for OpenAI weights (method.md 2).",
                GrmpiqaWarning,
                stacklevel=2,
            )
        path = _cached_tag_file(tag_cfg, cache_dir)
        if path is None:
            _require_network(name, pretrained)
            try:
                clip = open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
            except Exception as err:  # noqa: BLE001 - open_clip raises bare RuntimeErrors
                raise _offline_error(name, pretrained, err) from None
            return fin(Backbone(clip, name, cfg, {"kind": "tag", "tag": pretrained}), pretrained)
        clip = _create(name, None, seed)
        _load_weights_file(clip, path)
        return fin(Backbone(clip, name, cfg, {"kind": "tag", "tag": pretrained}), pretrained)

    file = Path(pretrained).expanduser()
    if not file.exists():
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BackboneError(
            f"{pretrained}: neither a checkpoint file nor a pretrained tag of {name} "
            f"(known tags: {', '.join(tags) if tags else 'none'})"
        )
    if file.is_dir():
        raise BackboneError(
            f"{file}: is a folder; pass an open_clip folder as backbone='local-dir:{file}'"
        )
    clip = _create(name, None, seed)
    _load_weights_file(clip, file)
    identity = {"kind": "file", "path": str(file.resolve()), "sha256_1mb": _quick_hash(file)}
    return fin(Backbone(clip, name, cfg, identity))


def _create(name: str, pretrained: str | None, seed: int) -> Any:
    """open_clip.create_model with a private, seeded RNG (reproducible random init)."""
    import logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # open_clip logs "initialized randomly" on the root logger
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            kwargs: dict[str, Any] = {}
            if _hf_text(name):  # never download a Hugging Face text tower's weights here
                kwargs["pretrained_hf"] = False
            return open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as err:  # noqa: BLE001 - open_clip/timm/hub raise many types; one line
        raise BackboneError(f"{name}: cannot build backbone ({_first_line(err)})") from None
    finally:
        logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _hf_text(name: str) -> bool:
    try:
        cfg = model_config(name)
    except BackboneError:
        return False
    return bool(cfg.get("text_cfg", {}).get("hf_model_name"))


@dataclass
class _Finisher:
    """Eval mode, frozen weights, and the family's adapter on a built backbone."""

    name: str
    cfg: dict[str, Any]
    tokenizer: str | os.PathLike[str] | None
    cache_dir: str | None

    def __call__(self, bb: Backbone, tag: str | None = None) -> Backbone:
        bb.clip.eval()
        for p in bb.clip.parameters():
            p.requires_grad_(False)
        bb.adapter = build_adapter(
            bb.clip, self.cfg, self.name, tag=tag, tokenizer=self.tokenizer,
            cache_dir=self.cache_dir,
        )  # fmt: skip
        return bb


def _quick_hash(path: Path) -> str:
    """sha256 of the file size and its first MiB: a cheap identity for metadata."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a CLIP state dict from safetensors, a torch pickle, or a TorchScript archive.

    Unwraps a ``state_dict`` entry and strips a DataParallel ``module.`` prefix.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in _JIT_EXTRA_KEYS:
                sd.pop(key, None)
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - many formats, one message
        raise BackboneError(f"{path}: cannot read checkpoint ({_load_error(err)})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise BackboneError(f"{path}: not a state dict")
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    }


def _load_error(err: BaseException) -> str:
    """One line saying why a weights file could not be read (torch's are long)."""
    text = str(err).strip()
    if "Weights only load failed" in text:
        if "Unsupported global" in text or "GLOBAL" in text:
            return (
                "it holds Python objects besides tensors, which are never unpickled "
                "(they could run code)"
            )
        return "not a PyTorch state dict (not a valid pickle or zip archive)"
    if isinstance(err, KeyError) or not text:
        return "not a PyTorch state dict"
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _load_weights_file(clip: nn.Module, path: str | os.PathLike[str]) -> None:
    sd = read_state_dict(path)
    own = clip.state_dict()
    if "logit_scale" in sd and sd["logit_scale"].ndim != own["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(own["logit_scale"].shape)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise BackboneError(
            f"{path}: not a checkpoint of this architecture "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise BackboneError(
            f"{path}: tensor shapes differ from this architecture (e.g. {bad[0]}: "
            f"{tuple(sd[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})"
        )
    clip.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> Path | None:
    """A weights file for a pretrained tag already on disk, or None."""
    if tag_cfg.get("file"):
        return Path(tag_cfg["file"])
    hub = str(tag_cfg.get("hf_hub", "")).rstrip("/")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache

            names = [str(tag_cfg["hf_hub_filename"])] if tag_cfg.get("hf_hub_filename") else []
            names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for fname in names:
                hit = try_to_load_from_cache(hub, fname, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
        except ImportError:
            pass
    url = str(tag_cfg.get("url", ""))
    if url:
        root = Path(cache_dir) if cache_dir else Path("~/.cache/clip").expanduser()
        candidate = root / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _require_network(name: str, tag: str) -> None:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
        "GRMPIQA_OFFLINE", ""
    ) not in ("", "0")
    if not offline:
        try:
            socket.setdefaulttimeout(5)
            socket.getaddrinfo("huggingface.co", 443)
            return
        except OSError:
            pass
        finally:
            socket.setdefaulttimeout(None)
    raise _offline_error(name, tag, None)


def _offline_error(name: str, tag: str, err: Exception | None) -> BackboneError:
    """One line: the tag's weights cannot be had, and how to pass them (CLI and API)."""
    if err is None:
        why = "offline and not in the local cache"
    else:
        why = f"download failed: {_first_line(err)}"
    head = f"cannot get pretrained weights '{tag}' for {name} ({why}); pass a local file "
    return BackboneError(
        f"{head}with --pretrained /path/to/ViT-B-16.pt (OpenAI or open_clip checkpoint) or "
        "--backbone local-dir:/path/to/open_clip_folder",
        api=f"{head}as pretrained='/path/to/ViT-B-16.pt' (OpenAI or open_clip checkpoint) "
        "or backbone='local-dir:/path/to/open_clip_folder'",
    )
