"""Loading CLIP models through open_clip. (name, pretrained): ("ViT-B-16", "openai"), a name and a tag,
downloaded on first use; ("ViT-B-16", "/path/to/checkpoint.pt"), a local checkpoint (open_clip, safetensors
or OpenAI's TorchScript); ("local-dir:/path", None), open_clip's folder format; ("ViT-B-16", None), random
weights. QuickGELU is switched on for OpenAI weights."""
from __future__ import annotations

import copy
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import open_clip
import torch

log = logging.getLogger(__name__)

LOCAL_DIR_PREFIX = "local-dir:"


class WeightsUnavailableError(RuntimeError):
    """Pre-trained weights could not be found or downloaded; the message says how to supply them."""


@dataclass
class ClipModel:
    """An open_clip model with what is needed to feed it."""
    model: torch.nn.Module
    tokenizer: Callable
    preprocess_train: Callable
    preprocess_eval: Callable
    name: str
    pretrained: Optional[str]
    model_cfg: Optional[Dict[str, Any]] = None

    @property
    def preprocess_cfg(self) -> Dict[str, Any]:
        return dict(getattr(self.model.visual, "preprocess_cfg", {}))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model, "context_length", getattr(self.tokenizer, "context_length", 77)))

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def is_torchscript_archive(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (as OpenAI's checkpoints are)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def needs_quick_gelu(name: str, pretrained: Optional[str]) -> bool:
    """True where the weights were trained with QuickGELU: OpenAI tags and OpenAI checkpoint files."""
    if name.startswith(LOCAL_DIR_PREFIX) or not pretrained:
        return False
    if name.endswith("-quickgelu"):
        return True
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    return os.path.isfile(pretrained) and is_torchscript_archive(pretrained)


def _local_dir(name: str) -> Optional[Path]:
    return Path(name[len(LOCAL_DIR_PREFIX):]) if name.startswith(LOCAL_DIR_PREFIX) else None


def load_clip(name: str, pretrained: Optional[str] = None, device: torch.device | str = "cpu",
              quick_gelu: Optional[bool] = None, cache_dir: Optional[str] = None) -> ClipModel:
    """An open_clip model in eval mode on ``device``; see the module docstring for the forms."""
    folder = _local_dir(name)
    if folder is not None:
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailableError(
                f"model {name!r}: {folder} is not an open_clip model folder (expected open_clip_config.json "
                f"and a weights file such as open_clip_model.safetensors inside it)")
        pretrained = None
    elif open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip model name {name!r}; see open_clip.list_models() for the choices")
    elif pretrained and not open_clip.get_pretrained_cfg(name, pretrained) and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise WeightsUnavailableError(
            f"pretrained {pretrained!r} for model {name!r} is neither a known open_clip tag "
            f"(known: {', '.join(tags) or 'none'}) nor an existing checkpoint file")
    force_quick_gelu = needs_quick_gelu(name, pretrained) if quick_gelu is None else quick_gelu
    try:
        model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, force_quick_gelu=force_quick_gelu, cache_dir=cache_dir)
    except RuntimeError as exc:
        if "download" in str(exc).lower():
            raise WeightsUnavailableError(
                f"could not download the pre-trained weights {pretrained!r} of {name!r} ({exc}). "
                f"Offline? Download them once on a machine with internet (they land in open_clip's cache, "
                f"or set model.cache_dir), then either copy that cache here, pass the checkpoint file as "
                f"--pretrained /path/to/weights, or save an open_clip folder and use --model local-dir:/path") from exc
        raise
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    model.eval()
    return ClipModel(model, tokenizer, preprocess_train, preprocess_eval, name, pretrained,
                     architecture_config(name, force_quick_gelu))


def architecture_config(name: str, quick_gelu: bool) -> Dict[str, Any]:
    """open_clip's model config of ``name`` as built: what rebuilds the model without its source."""
    folder = _local_dir(name)
    if folder is not None:
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]
    else:
        config = copy.deepcopy(open_clip.get_model_config(name))
    if quick_gelu:
        config["quick_gelu"] = True
    return config
