"""The test bed's training loops: the distillation teacher and stage 1 (image tower), both resumable
per epoch, and stage 2 (text tower); :mod:`coft_fast.testbed_builder` runs them in order."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP

from coft_fast.config import TestbedConfig
from coft_fast.pseudo.templates import clip_ensemble_templates
from coft_fast.runtime.checkpoint import load_state, save_state
from coft_fast.runtime.progress import progress_bar

log = logging.getLogger(__name__)


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
