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
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP

from coft_fast.config import TESTBED_PRESETS, TestbedConfig
from coft_fast.data import ImageSource, decode_rgb
from coft_fast.pseudo.templates import clip_ensemble_templates
from coft_fast.runtime.checkpoint import load_state, save_state
from coft_fast.runtime.io import atomic_write, atomic_write_json, atomic_write_text
from coft_fast.runtime.progress import progress_bar

log = logging.getLogger(__name__)

VOCAB_SIZE = 49408  # open_clip's BPE tokenizer


def preset_fields(name: str) -> Dict:
    """The ``testbed.*`` fields a preset sets; a ValueError lists the presets for an unknown name."""
    if name not in TESTBED_PRESETS:
        raise ValueError(f"unknown test-bed preset {name!r}; the presets are: {', '.join(TESTBED_PRESETS)}")
    return dict(TESTBED_PRESETS[name])


def preset_config(name: str, **overrides) -> TestbedConfig:
    """A TestbedConfig of the preset ``name`` with ``overrides`` on top."""
    return TestbedConfig(**{**preset_fields(name), **overrides})


def tiny_config(**overrides) -> TestbedConfig:
    """A much smaller, faster test bed for unit tests (seconds on 2 cores)."""
    return preset_config("tiny", **overrides)


def digits_config(**overrides) -> TestbedConfig:
    """The demo's test bed, built on scikit-learn's digits (under a minute on 2 cores)."""
    return preset_config("digits", **overrides)


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


class ConvTeacher(torch.nn.Module):
    """Stage 1's distillation teacher: a small residual convnet (the DAWNBench ResNet-9 layout at
    ``width`` channels), for any image size (global max pool). Thrown away after the build."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        nn = torch.nn

        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(conv(3, width), conv(width, 2 * width), nn.MaxPool2d(2))
        self.res1 = nn.Sequential(conv(2 * width, 2 * width), conv(2 * width, 2 * width))
        self.mid = nn.Sequential(conv(2 * width, 4 * width), nn.MaxPool2d(2), conv(4 * width, 8 * width), nn.MaxPool2d(2))
        self.res2 = nn.Sequential(conv(8 * width, 8 * width), conv(8 * width, 8 * width))
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.res1(x)
        x = self.mid(x)
        x = x + self.res2(x)
        return self.head(torch.amax(x, dim=(2, 3)))


def _conv_autocast():
    """bf16 autocast for the teacher's convolutions where the CPU has native bf16 (oneDNN), else off."""
    enabled = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _resumable_epochs(name: str, state_dir: Optional[Path], fingerprint: str, parts: Dict, generator: torch.Generator,
                      epochs: int, run_epoch, bar=None, steps_per_epoch: int = 0) -> Dict:
    """Run ``run_epoch(epoch) -> summary`` for the epochs not done yet; after each one, ``parts``
    (objects with state_dict/load_state_dict), the generator and the summary go to
    ``state_dir/name.pt`` atomically, so a killed build resumes at its last finished epoch. A
    state written for another configuration (``fingerprint``) is ignored. Returns the last summary,
    with ``resumed_epochs``: how many epochs came from the saved state, and ``seconds``: the
    training time of all the epochs, those of earlier (killed) runs included (None for a state
    saved before this was recorded)."""
    path = state_dir / f"{name}.pt" if state_dir is not None else None
    state = load_state(path) if path is not None else None
    start, summary = 0, {}
    if state is not None and state.get("fingerprint") == fingerprint:
        for key, part in parts.items():
            part.load_state_dict(state["parts"][key])
        generator.set_state(state["generator"])
        start, summary = state["epoch"], state["summary"]
        if bar is not None:
            bar.update(start * steps_per_epoch)
        log.info("test bed: %s resumes after epoch %d of %d (%s)", name, start, epochs, path)
    elif state is not None:
        log.info("test bed: %s ignores %s (written for another configuration or source)", name, path)
    for epoch in range(start, epochs):
        started = time.perf_counter()
        seconds = summary.get("seconds", 0.0)
        summary = {**run_epoch(epoch), "seconds": seconds + time.perf_counter() - started}
        if path is not None:
            save_state(path, {"fingerprint": fingerprint, "epoch": epoch + 1, "summary": summary,
                              "generator": generator.get_state(),
                              "parts": {key: part.state_dict() for key, part in parts.items()}})
    if start and "seconds" not in summary:  # a state saved before the seconds were recorded
        summary = {**summary, "seconds": None}
    return {**summary, "resumed_epochs": start}


def _one_cycle(optimizer, max_lr: float, epochs: int, steps_per_epoch: int, pct_start: float):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * steps_per_epoch,
                                               pct_start=pct_start)


def train_teacher(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: TestbedConfig,
                  generator: torch.Generator, state_dir: Optional[Path] = None, fingerprint: str = "",
                  progress: bool = True):
    """The distillation teacher, trained with SGD and label smoothing on the same images and
    augmentation as stage 1; returns (teacher in eval mode, {train_accuracy, resumed_epochs})."""
    teacher = ConvTeacher(cfg.teacher_width, num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=cfg.teacher_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(images) / cfg.teacher_batch_size)
    schedule = _one_cycle(optimizer, cfg.teacher_lr, cfg.teacher_epochs, steps_per_epoch, pct_start=0.2)
    normalised = _normalise(images)
    pad = max(1, cfg.image_size // 8)
    bar = progress_bar(total=cfg.teacher_epochs * steps_per_epoch, desc="test bed: teacher", disable=not progress,
                       leave=False)

    def run_epoch(epoch: int) -> Dict:
        teacher.train()
        order = torch.randperm(len(images), generator=generator)
        correct = 0
        for start in range(0, len(order), cfg.teacher_batch_size):
            batch = order[start : start + cfg.teacher_batch_size]
            x = _augment(normalised[batch], generator, pad).contiguous(memory_format=torch.channels_last)
            with _conv_autocast():
                logits = teacher(x).float()
            loss = F.cross_entropy(logits, labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[batch]).sum())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        return {"train_accuracy": correct / len(images)}

    summary = _resumable_epochs("teacher", state_dir, fingerprint,
                                {"model": teacher, "optimizer": optimizer, "schedule": schedule}, generator,
                                cfg.teacher_epochs, run_epoch, bar, steps_per_epoch)
    bar.close()
    teacher.eval()
    return teacher, summary


def train_image_tower(model: CLIP, images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: TestbedConfig,
                      generator: torch.Generator, progress: bool = True, teacher: Optional[torch.nn.Module] = None,
                      state_dir: Optional[Path] = None, fingerprint: str = "") -> Dict:
    """Stage 1: the image tower as a cosine classifier (distilled from ``teacher`` when given);
    returns the classifier weights and train accuracy."""
    visual = model.visual
    visual.train()
    head = torch.nn.ParameterDict({"weight": torch.nn.Parameter(torch.randn(num_classes, cfg.embed_dim, generator=generator) * 0.02)})
    params = list(visual.parameters()) + [head["weight"]]
    optimizer = torch.optim.AdamW(params, lr=cfg.image_lr, weight_decay=cfg.image_weight_decay)
    steps_per_epoch = math.ceil(len(images) / cfg.image_batch_size)
    schedule = _one_cycle(optimizer, cfg.image_lr, cfg.image_epochs, steps_per_epoch, pct_start=0.15)
    normalised = _normalise(images)
    pad = max(1, cfg.image_size // 8)
    bar = progress_bar(total=cfg.image_epochs * steps_per_epoch, desc="test bed: image tower", disable=not progress, leave=False)
    distill = teacher is not None and cfg.distill_weight > 0

    def run_epoch(epoch: int) -> Dict:
        visual.train()
        order = torch.randperm(len(images), generator=generator)
        correct = seen = 0
        for start in range(0, len(order), cfg.image_batch_size):
            batch = order[start : start + cfg.image_batch_size]
            x = _augment(normalised[batch], generator, pad)
            y = labels[batch]
            features = F.normalize(visual(x), dim=-1)
            logits = cfg.classifier_scale * features @ F.normalize(head["weight"], dim=-1).T
            loss = F.cross_entropy(logits, y)
            if distill:
                with torch.no_grad(), _conv_autocast():
                    taught = teacher(x.contiguous(memory_format=torch.channels_last)).argmax(1)
                loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * F.cross_entropy(logits, taught)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        return {"train_accuracy": correct / max(seen, 1)}

    summary = _resumable_epochs("image_tower", state_dir, fingerprint,
                                {"visual": visual, "head": head, "optimizer": optimizer, "schedule": schedule},
                                generator, cfg.image_epochs, run_epoch, bar, steps_per_epoch)
    bar.close()
    visual.eval()
    return {"classifier": F.normalize(head["weight"].detach(), dim=-1),
            "train_accuracy_last_epoch": summary.get("train_accuracy", float("nan")),
            "resumed_epochs": summary["resumed_epochs"], "seconds": summary.get("seconds", 0.0)}


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


# Fields of stage 2 only: a rebuild that changes just these reuses the finished image tower.
TEXT_TOWER_FIELDS = ("text_width", "text_heads", "text_layers", "context_length", "text_steps", "text_batch_size",
                     "text_lr", "longtail_ratio", "lookalike_share")


def build_fingerprint(source: ImageSource, cfg: TestbedConfig, seed: int) -> str:
    """What a resumed image tower must share with the saved one: the image-side config, the seed
    and the images (the text tower's fields are left out: stage 2 is rebuilt every time)."""
    image_side = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in TEXT_TOWER_FIELDS}
    digest = hashlib.sha256(json.dumps({"config": image_side, "seed": seed,
                                        "classes": list(source.class_names)}, sort_keys=True).encode())
    for path, label in zip(source.paths, source.labels):
        digest.update(f"{path}\t{label}\n".encode())
    return digest.hexdigest()


# Written last by a build, so a folder whose build was killed never loads as a model.
MODEL_CONFIG_FILE = "open_clip_config.json"
BUILD_STATE_DIR = "build_state"


def build_testbed(source: ImageSource, out_dir, cfg: Optional[TestbedConfig] = None, seed: int = 0,
                  progress: bool = True, preset: Optional[str] = None) -> Dict:
    """Train the two-stage test bed on a labelled source and write it as an open_clip local-dir folder.

    Returns the build report (also written to ``out_dir/testbed_report.json``). Load the model with
    ``coft_fast.load_clip("local-dir:" + out_dir)``. The epochs of the teacher and of stage 1 are
    checkpointed under ``out_dir/build_state/``: the same call after a kill resumes there (and ends
    with the same weights), and a rebuild that changes only the text tower's fields (``TEXT_TOWER_FIELDS``)
    reuses the finished image tower. The model's config file is written last, so a half-built folder
    never loads.
    """
    import open_clip
    from safetensors.torch import save_file

    cfg = cfg or TestbedConfig()
    if not source.has_labels or any(label < 0 for label in source.labels):
        raise ValueError(f"{source.origin}: every image needs a label (class sub-folders) to build a test bed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_CONFIG_FILE).unlink(missing_ok=True)  # the folder loads again only once rebuilt
    state_dir = out_dir / BUILD_STATE_DIR
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = CLIP(**model_config(cfg))
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)

    images, labels = decode_labelled_images(source, cfg.image_size, progress)
    num_classes = source.num_classes
    fingerprint = build_fingerprint(source, cfg, seed)
    teacher, teacher_summary, teacher_seconds = None, {}, 0.0
    if cfg.teacher_width > 0:
        t0 = time.perf_counter()
        teacher, teacher_summary = train_teacher(images, labels, num_classes, cfg,
                                                  torch.Generator().manual_seed(seed + 2_000_000), state_dir,
                                                  fingerprint, progress)
        teacher_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    stage1 = train_image_tower(model, images, labels, num_classes, cfg, generator, progress, teacher=teacher,
                               state_dir=state_dir, fingerprint=fingerprint)
    stage1_seconds = time.perf_counter() - t0
    del teacher

    t0 = time.perf_counter()
    # stage 2 draws from its own stream, so its biases do not depend on how long stage 1 ran
    generator = torch.Generator().manual_seed(seed + 1_000_000)
    lookalike = lookalike_classes(stage1["classifier"])
    features = image_features(model, images)
    captioned, caption_classes, caption_counts = biased_caption_classes(labels, num_classes, lookalike, cfg, generator)
    stage2 = train_text_tower(model, tokenizer, features[captioned], caption_classes, source.class_names, cfg,
                              generator, progress)
    stage2_seconds = time.perf_counter() - t0

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
    report = {
        "source": source.origin,
        "num_images": int(len(images)),
        "num_skipped": len(source.skipped),
        "seed": seed,
        "preset": preset,
        "config": dataclasses.asdict(cfg),
        "lookalike": {source.class_names[c]: source.class_names[l] for c, l in enumerate(lookalike)},
        "captions_per_class": dict(zip(source.class_names, caption_counts)),
        "teacher_train_accuracy": teacher_summary.get("train_accuracy"),
        "teacher_seconds": teacher_seconds,
        # epochs taken from build_state/ (a resumed or text-only rebuild); the seconds count only the rest
        "resumed_epochs": {"teacher": teacher_summary.get("resumed_epochs", 0),
                           "image_tower": stage1["resumed_epochs"]},
        "stage1_train_accuracy": stage1["train_accuracy_last_epoch"],
        "stage1_seconds": stage1_seconds,
        "stage2_final_loss": stage2["final_loss"],
        "logit_scale": stage2["logit_scale"],
        "stage2_seconds": stage2_seconds,
        "build_seconds": time.perf_counter() - started,
    }
    # training time of every epoch, earlier (killed or text-only) builds' included: the whole build's
    # cost, where build_seconds counts only this invocation (None: a state saved before it was recorded)
    trained = [stage1.get("seconds"), teacher_summary.get("seconds", 0.0)]
    untrained = report["build_seconds"] - stage1_seconds - teacher_seconds  # decoding, stage 2, writing
    report["training_seconds_all_builds"] = {"teacher": trained[1], "image_tower": trained[0]}
    report["build_seconds_all_builds"] = None if None in trained else untrained + sum(trained)
    atomic_write(out_dir / "open_clip_model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_text(out_dir / "classes.txt", "\n".join(source.class_names) + "\n")
    atomic_write_json(out_dir / "testbed_report.json", report)
    atomic_write_json(out_dir / MODEL_CONFIG_FILE, config)
    return report
