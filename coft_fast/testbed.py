"""The test bed: a small CLIP-like model, pre-trained here in minutes, for offline tests and demos.

Real CLIP weights cannot be downloaded here, and a tiny CLIP trained end to end on clean captions
is just a supervised classifier (zero-shot accuracy equals what its features support). Real CLIP
has strong image features and a text side biased by web captions. The test bed reproduces that in
two stages (see ../shared/docs/testbed-calibration.md for the measurements behind them):

1. image tower: an open_clip ViT trained as a cosine classifier on labelled images (the stand-in
   for CLIP's web-scale pre-training); the classifier weights are thrown away afterwards;
2. text tower: a fresh one aligned to the FROZEN image tower on biased captions:
   - long-tailed class frequencies: the number of captioned images per class falls from the
     largest class count down by ``longtail_ratio``, classes ranked by a seeded permutation;
   - look-alike names: a share ``lookalike_share`` of captions names the class's look-alike (its
     nearest other class by the stage-1 classifier weights, derived from the data) instead;
   - caption sentences from CLIP's 80 templates, tokenised with open_clip's real tokenizer.

The result is written as an open_clip ``local-dir`` folder and loaded back only through
:func:`coft_fast.models.load_clip`. Everything is deterministic for a seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from coft_fast.runtime.progress import progress_bar

from coft_fast.config import TestbedConfig
from coft_fast.data import ImageSource, decode_rgb
from coft_fast.pseudo.templates import clip_ensemble_templates
from coft_fast.runtime.io import atomic_write, atomic_write_json, atomic_write_text

VOCAB_SIZE = 49408  # open_clip's BPE tokenizer


def tiny_config(**overrides) -> TestbedConfig:
    """A much smaller, faster test bed for unit tests (seconds on 2 cores)."""
    base = dict(
        image_size=16, patch_size=4, vision_width=32, vision_layers=2, vision_head_width=16, embed_dim=32,
        text_width=32, text_heads=2, text_layers=1, image_epochs=4, image_batch_size=64, text_steps=80,
        text_batch_size=128,
    )
    base.update(overrides)
    return TestbedConfig(**base)


def digits_config(**overrides) -> TestbedConfig:
    """The demo's test bed, built on scikit-learn's digits (under a minute on 2 cores)."""
    base = dict(
        image_size=16, patch_size=4, vision_width=64, vision_layers=2, vision_head_width=32, embed_dim=64,
        text_width=64, text_heads=2, text_layers=1, image_epochs=30, image_batch_size=64, text_steps=300,
        text_batch_size=128,
    )
    base.update(overrides)
    return TestbedConfig(**base)


def model_config(cfg: TestbedConfig) -> Dict:
    """The open_clip ``model_cfg`` of a test bed."""
    if cfg.context_length < 32:
        raise ValueError(f"testbed.context_length must be at least 32 (phase I prompts need it), got {cfg.context_length}")
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "width": cfg.vision_width,
            "layers": cfg.vision_layers,
            "head_width": cfg.vision_head_width,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": VOCAB_SIZE,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def decode_labelled_images(source: ImageSource, image_size: int, progress: bool = True):
    """Decode a labelled source into a uint8 (N, 3, S, S) tensor and int64 labels; broken files are skipped."""
    from PIL import Image

    images, labels = [], []
    for path, label in progress_bar(list(zip(source.paths, source.labels)), desc="reading images", disable=not progress, leave=False):
        try:
            image = decode_rgb(path)
        except Exception as exc:
            source.skipped.append({"path": path, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        labels.append(label)
    if not images:
        raise ValueError(f"{source.origin}: no decodable images to build a test bed from")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def _augment(images: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random horizontal flip and reflect-pad-then-crop, per sample."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    cropped = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


def train_image_tower(model: CLIP, images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: TestbedConfig,
                      generator: torch.Generator, progress: bool = True) -> Dict:
    """Stage 1: the image tower as a cosine classifier; returns the classifier weights and train accuracy."""
    visual = model.visual
    visual.train()
    classifier = torch.nn.Parameter(torch.randn(num_classes, cfg.embed_dim, generator=generator) * 0.02)
    params = list(visual.parameters()) + [classifier]
    optimizer = torch.optim.AdamW(params, lr=cfg.image_lr, weight_decay=cfg.image_weight_decay)
    steps_per_epoch = math.ceil(len(images) / cfg.image_batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.image_lr, total_steps=cfg.image_epochs * steps_per_epoch, pct_start=0.15
    )
    normalised = _normalise(images)
    pad = max(1, cfg.image_size // 8)
    correct = seen = 0
    bar = progress_bar(total=cfg.image_epochs * steps_per_epoch, desc="test bed: image tower", disable=not progress, leave=False)
    for epoch in range(cfg.image_epochs):
        order = torch.randperm(len(images), generator=generator)
        correct = seen = 0
        for start in range(0, len(order), cfg.image_batch_size):
            batch = order[start : start + cfg.image_batch_size]
            x = _augment(normalised[batch], generator, pad)
            y = labels[batch]
            features = F.normalize(visual(x), dim=-1)
            logits = cfg.classifier_scale * features @ F.normalize(classifier, dim=-1).T
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    visual.eval()
    return {"classifier": F.normalize(classifier.detach(), dim=-1), "train_accuracy_last_epoch": correct / max(seen, 1)}


@torch.no_grad()
def image_features(model: CLIP, images_uint8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Normalised image features of decoded uint8 images, in eval mode."""
    model.visual.eval()
    out = [F.normalize(model.visual(_normalise(images_uint8[i : i + batch_size])), dim=-1) for i in range(0, len(images_uint8), batch_size)]
    return torch.cat(out)


def lookalike_classes(classifier: torch.Tensor) -> List[int]:
    """Each class's nearest other class by cosine similarity of the stage-1 classifier weights."""
    similarity = classifier @ classifier.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=1).tolist()


def biased_caption_classes(labels: torch.Tensor, num_classes: int, lookalike: Sequence[int], cfg: TestbedConfig,
                           generator: torch.Generator):
    """Which images get a caption and which class each caption names (long tail + look-alike names).

    Returns (indices of captioned images, the class each caption names, per-class caption counts).
    """
    counts = torch.bincount(labels, minlength=num_classes)
    rank = torch.randperm(num_classes, generator=generator)  # rank[c]: position of class c in the tail
    largest = int(counts.max())
    keep_indices, named = [], []
    per_class = []
    for c in range(num_classes):
        position = int(rank[c])
        fraction = cfg.longtail_ratio ** (-position / max(num_classes - 1, 1))
        members = (labels == c).nonzero().flatten()
        take = min(len(members), max(1, round(largest * fraction))) if len(members) else 0
        chosen = members[torch.randperm(len(members), generator=generator)[:take]]
        swap = torch.rand(take, generator=generator) < cfg.lookalike_share
        names = torch.where(swap, torch.tensor(lookalike[c]), torch.tensor(c))
        keep_indices.append(chosen)
        named.append(names)
        per_class.append(int(take))
    return torch.cat(keep_indices), torch.cat(named), per_class


def train_text_tower(model: CLIP, tokenizer, features: torch.Tensor, caption_classes: torch.Tensor,
                     class_names: Sequence[str], cfg: TestbedConfig, generator: torch.Generator,
                     progress: bool = True) -> Dict:
    """Stage 2: a fresh text tower against frozen image features, one random caption per class and step."""
    templates = clip_ensemble_templates()
    tokens = torch.stack([tokenizer([t.replace("{}", name) for name in class_names]) for t in templates])  # (T, C, L)
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    optimizer = torch.optim.AdamW(text_params, lr=cfg.text_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.text_lr, total_steps=cfg.text_steps, pct_start=0.1)
    num_classes = len(class_names)
    max_logit_scale = math.log(100.0)
    model.train()
    bar = progress_bar(range(cfg.text_steps), desc="test bed: text tower", disable=not progress, leave=False)
    loss = torch.tensor(0.0)
    for _ in bar:
        batch = torch.randint(0, len(features), (cfg.text_batch_size,), generator=generator)
        pick = torch.randint(0, len(templates), (num_classes,), generator=generator)
        step_tokens = tokens[pick, torch.arange(num_classes)]
        text = F.normalize(model.encode_text(step_tokens), dim=-1)
        logits = model.logit_scale.exp() * features[batch] @ text.T
        loss = F.cross_entropy(logits, caption_classes[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_logit_scale)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return {"final_loss": float(loss.detach()), "logit_scale": float(model.logit_scale.detach().exp())}


def build_testbed(source: ImageSource, out_dir, cfg: Optional[TestbedConfig] = None, seed: int = 0,
                  progress: bool = True) -> Dict:
    """Train the two-stage test bed on a labelled source and write it as an open_clip local-dir folder.

    Returns the build report (also written to ``out_dir/testbed_report.json``). Load the model with
    ``coft_fast.load_clip("local-dir:" + out_dir)``.
    """
    import open_clip
    from safetensors.torch import save_file

    cfg = cfg or TestbedConfig()
    if not source.has_labels or any(label < 0 for label in source.labels):
        raise ValueError(f"{source.origin}: every image needs a label (class sub-folders) to build a test bed")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CLIP(**model_config(cfg))
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)

    images, labels = decode_labelled_images(source, cfg.image_size, progress)
    num_classes = source.num_classes
    t0 = time.perf_counter()
    stage1 = train_image_tower(model, images, labels, num_classes, cfg, generator, progress)
    stage1_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    # stage 2 draws from its own stream, so its biases do not depend on how long stage 1 ran
    generator = torch.Generator().manual_seed(seed + 1_000_000)
    lookalike = lookalike_classes(stage1["classifier"])
    features = image_features(model, images)
    captioned, caption_classes, caption_counts = biased_caption_classes(labels, num_classes, lookalike, cfg, generator)
    stage2 = train_text_tower(model, tokenizer, features[captioned], caption_classes, source.class_names, cfg,
                              generator, progress)
    stage2_seconds = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_config(cfg),
        "preprocess_cfg": {
            "size": cfg.image_size,
            "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / "open_clip_model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_json(out_dir / "open_clip_config.json", config)
    atomic_write_text(out_dir / "classes.txt", "\n".join(source.class_names) + "\n")
    report = {
        "source": source.origin,
        "num_images": int(len(images)),
        "num_skipped": len(source.skipped),
        "seed": seed,
        "config": dataclasses.asdict(cfg),
        "lookalike": {source.class_names[c]: source.class_names[l] for c, l in enumerate(lookalike)},
        "captions_per_class": dict(zip(source.class_names, caption_counts)),
        "stage1_train_accuracy": stage1["train_accuracy_last_epoch"],
        "stage1_seconds": stage1_seconds,
        "stage2_final_loss": stage2["final_loss"],
        "logit_scale": stage2["logit_scale"],
        "stage2_seconds": stage2_seconds,
        "build_seconds": time.perf_counter() - started,
    }
    atomic_write_json(out_dir / "testbed_report.json", report)
    return report
