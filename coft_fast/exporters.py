"""Hand a run's fine-tuned model to other tools: an open_clip ``local-dir:`` folder, or ONNX."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from coft_fast.config import ConfigError
from coft_fast.inference import RunModel
from coft_fast.runtime.checkpoint import save_tensors
from coft_fast.runtime.io import PathLike, atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
FORMATS = ("open_clip", "onnx")

OPEN_CLIP_README = """# {title}

An open_clip model whose image tower was fine-tuned by coft_fast ({method}, run `{run}`), with a
linear classifier over {num_classes} classes (`classes.txt`, in the head's order).

```python
import open_clip, torch, torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")
model.eval()
head = load_file("{folder}/classifier.safetensors")  # weight (C, D), bias (C), logit_scale ()
classes = open("{folder}/classes.txt", encoding="utf-8").read().splitlines()
with torch.no_grad():
    features = F.normalize(model.encode_image(preprocess(Image.open("image.jpg").convert("RGB"))[None]), dim=-1)
    logits = head["logit_scale"] * features @ head["weight"].T + head["bias"]
print(classes[logits.argmax(1).item()])
```

The text tower is the pre-trained one of `{source}`, unchanged, so zero-shot prompts still work.
"""

ONNX_README = """# {title}

`model.onnx`: input `images`, float32 (B, 3, {size}, {size}), normalised exactly as the model's
evaluation preprocessing outputs them (resize the shorter side to {size} ({interpolation}), centre
crop, scale to [0, 1], subtract mean {mean}, divide by std {std}); output `logits` (B, {num_classes})
in the order of `classes.txt`. The batch size is dynamic.

```python
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession("{folder}/model.onnx")
logits = session.run(["logits"], {{"images": images.astype(np.float32)}})[0]
```
"""


def _classifier(model: RunModel, tag: Optional[str]):
    """(tag, a float32 CPU copy of the classifier ``tag``); None: s1, or the run's only classifier."""
    if tag is None:
        tag = "s1" if "s1" in model.classifiers else next(iter(model.classifiers))
    if tag not in model.classifiers:
        raise ConfigError(f"run {model.run_dir} holds no classifier {tag!r} (it has {', '.join(model.classifiers)})")
    return tag, copy.deepcopy(model.classifiers[tag]).cpu().float().eval()


def _write_classes_and_readme(out_dir: Path, model: RunModel, readme: str, **fields) -> None:
    atomic_write_text(out_dir / "classes.txt", "".join(f"{name}\n" for name in model.class_names))
    atomic_write_text(out_dir / "README.md", readme.format(
        title=f"{out_dir.name}: fine-tuned by coft_fast", num_classes=len(model.class_names), folder=out_dir, **fields))


def export_open_clip(model: RunModel, out: PathLike, tag: Optional[str] = None) -> Path:
    """``out`` becomes an open_clip ``local-dir:`` folder with ``classifier.safetensors``, ``classes.txt``, a README."""
    from coft_fast.models import load_clip

    tag, classifier = _classifier(model, tag)
    metadata = model.metadata or {}
    source, pretrained = metadata.get("model", ""), metadata.get("pretrained") or None
    described = source if not pretrained else f"{source} ({pretrained})"
    config = json.loads(metadata["open_clip_config"])
    try:
        clip = load_clip(source, pretrained, "cpu", bool(config["model_cfg"].get("quick_gelu", False)),
                         model.config.model.cache_dir)
    except Exception as exc:
        raise ConfigError(f"cannot read the run's model source {described} for the text tower: {exc}") from exc
    clip.model.visual.load_state_dict(classifier.visual.state_dict())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "open_clip_config.json", config)
    save_tensors(out_dir / "open_clip_model.safetensors", clip.model.state_dict())
    head = classifier.head
    save_tensors(out_dir / "classifier.safetensors", {"weight": head.weight.detach(), "bias": head.bias.detach(),
                                                      "logit_scale": head.scale.detach().reshape(())})
    _write_classes_and_readme(out_dir, model, OPEN_CLIP_README, method=model.config.method, run=model.run_dir,
                              source=described)
    log.info("exported %s (classifier %s) as an open_clip folder: %s", model.run_dir, tag, out_dir)
    return out_dir


def export_onnx(model: RunModel, out: PathLike, tag: Optional[str] = None, opset: int = 18) -> Path:
    """``out``/model.onnx: preprocessed images (B, 3, S, S) float32 -> logits (B, C), dynamic batch."""
    tag, classifier = _classifier(model, tag)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)

    program = torch.onnx.export(classifier, (example,), input_names=["images"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    atomic_write(out_dir / "model.onnx", program.save)
    preprocess = json.loads((model.metadata or {}).get("open_clip_config", "{}")).get("preprocess_cfg", {})
    _write_classes_and_readme(out_dir, model, ONNX_README, size=size, mean=preprocess.get("mean"),
                              interpolation=preprocess.get("interpolation", "bicubic"), std=preprocess.get("std"))
    log.info("exported %s (classifier %s) as ONNX: %s", model.run_dir, tag, out_dir / "model.onnx")
    return out_dir / "model.onnx"


def export_run(model: RunModel, out: PathLike, fmt: str, tag: Optional[str] = None) -> Path:
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return export_open_clip(model, out, tag) if fmt == "open_clip" else export_onnx(model, out, tag)
