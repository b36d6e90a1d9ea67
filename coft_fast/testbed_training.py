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
from coft_fast.models.prompts import encode_text_prefix
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
    """Stage 1's distillation teacher: DAWNBench's ResNet-9 at ``width`` channels; thrown away after the build."""

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


def native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (oneDNN): where it does, the teacher's convolutions run in bf16."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _conv_autocast():
    """bf16 autocast for the teacher's convolutions where the CPU has native bf16, else off."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16())


def _train_epochs(name: str, module: torch.nn.Module, parts: Dict, optimizer, loss_of, images: torch.Tensor,
                  labels: torch.Tensor, cfg: TestbedConfig, generator: torch.Generator, state_dir: Optional[Path],
                  fingerprint: str, progress: bool, *, lr: float, epochs: int, batch_size: int, pct_start: float) -> Dict:
    """``epochs`` seeded passes of ``loss_of(x, y) -> (loss, logits)`` over augmented images, one OneCycle
    schedule; each epoch saves ``parts``, optimizer, schedule and generator to ``state_dir/name.pt``, where a
    killed build resumes (unless ``fingerprint`` differs). Returns train_accuracy, resumed_epochs, seconds."""
    steps_per_epoch = math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=pct_start)
    parts = {**parts, "optimizer": optimizer, "schedule": schedule}
    normalised = _normalise(images)
    pad = max(1, cfg.image_size // 8)
    bar = progress_bar(total=epochs * steps_per_epoch, desc=f"test bed: {name.replace('_', ' ')}", disable=not progress,
                       leave=False)
    path = state_dir / f"{name}.pt" if state_dir is not None else None
    state = load_state(path) if path is not None else None
    start, summary = 0, {}
    if state is not None and state.get("fingerprint") == fingerprint:
        for key, part in parts.items():
            part.load_state_dict(state["parts"][key])
        generator.set_state(state["generator"])
        start, summary = state["epoch"], state["summary"]
        bar.update(start * steps_per_epoch)
        log.info("test bed: %s resumes after epoch %d of %d (%s)", name, start, epochs, path)
    elif state is not None:
        log.info("test bed: %s ignores %s (written for another configuration or source)", name, path)
    for epoch in range(start, epochs):
        started = time.perf_counter()
        module.train()
        order = torch.randperm(len(images), generator=generator)
        correct = 0
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            loss, logits = loss_of(_augment(normalised[batch], generator, pad), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[batch]).sum())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        seconds = summary.get("seconds", 0.0) + time.perf_counter() - started
        summary = {"train_accuracy": correct / len(images), "seconds": seconds}
        if path is not None:
            save_state(path, {"fingerprint": fingerprint, "epoch": epoch + 1, "summary": summary,
                              "generator": generator.get_state(),
                              "parts": {key: part.state_dict() for key, part in parts.items()}})
    bar.close()
    module.eval()
    if start and "seconds" not in summary:  # a state saved before the seconds were recorded
        summary = {**summary, "seconds": None}
    return {**summary, "resumed_epochs": start}


def train_teacher(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: TestbedConfig,
                  generator: torch.Generator, state_dir: Optional[Path] = None, fingerprint: str = "",
                  progress: bool = True):
    """The distillation teacher (SGD, label smoothing, stage 1's images); returns (teacher, summary)."""
    teacher = ConvTeacher(cfg.teacher_width, num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(teacher.parameters(), lr=cfg.teacher_lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def loss_of(x, y):
        with _conv_autocast():
            logits = teacher(x.contiguous(memory_format=torch.channels_last)).float()
        return F.cross_entropy(logits, y, label_smoothing=0.1), logits

    summary = _train_epochs("teacher", teacher, {"model": teacher}, optimizer, loss_of, images, labels, cfg, generator,
                            state_dir, fingerprint, progress, lr=cfg.teacher_lr, epochs=cfg.teacher_epochs,
                            batch_size=cfg.teacher_batch_size, pct_start=0.2)
    return teacher, summary


def train_image_tower(model: CLIP, images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: TestbedConfig,
                      generator: torch.Generator, progress: bool = True, teacher: Optional[torch.nn.Module] = None,
                      state_dir: Optional[Path] = None, fingerprint: str = "") -> Dict:
    """Stage 1: the image tower as a cosine classifier (distilled from ``teacher`` when given)."""
    visual = model.visual
    head = torch.nn.ParameterDict({"weight": torch.nn.Parameter(torch.randn(num_classes, cfg.embed_dim, generator=generator) * 0.02)})
    optimizer = torch.optim.AdamW([*visual.parameters(), head["weight"]], lr=cfg.image_lr,
                                  weight_decay=cfg.image_weight_decay)
    distill = teacher is not None and cfg.distill_weight > 0

    def loss_of(x, y):
        logits = cfg.classifier_scale * F.normalize(visual(x), dim=-1) @ F.normalize(head["weight"], dim=-1).T
        loss = F.cross_entropy(logits, y)
        if distill:
            with torch.no_grad(), _conv_autocast():
                taught = teacher(x.contiguous(memory_format=torch.channels_last)).argmax(1)
            loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * F.cross_entropy(logits, taught)
        return loss, logits

    summary = _train_epochs("image_tower", visual, {"visual": visual, "head": head}, optimizer, loss_of, images, labels,
                            cfg, generator, state_dir, fingerprint, progress, lr=cfg.image_lr, epochs=cfg.image_epochs,
                            batch_size=cfg.image_batch_size, pct_start=0.15)
    return {"classifier": F.normalize(head["weight"].detach(), dim=-1),
            "train_accuracy_last_epoch": summary.get("train_accuracy", float("nan")),
            "resumed_epochs": summary["resumed_epochs"], "seconds": summary.get("seconds", 0.0)}


@torch.no_grad()
def image_features(model: CLIP, images_uint8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Normalised image features of decoded uint8 images, in eval mode."""
    model.visual.eval()
    out = [F.normalize(model.visual(_normalise(images_uint8[i : i + batch_size])), dim=-1) for i in range(0, len(images_uint8), batch_size)]
    return torch.cat(out)


# Words for image-grounded captions (stage 2 with testbed.caption_attributes > 0): word 2j names the positive
# side of a class's j-th principal direction, word 2j + 1 the negative side (one BPE token each, no class name).
ATTRIBUTE_WORDS = ("small large dark bright red blue green old new wet dry soft hard round flat tall short wide "
                   "narrow thin thick plain busy calm close distant empty full clean dirty warm cold").split()


def attribute_ranks(features: torch.Tensor, labels: torch.Tensor, num_classes: int, directions: int) -> torch.Tensor:
    """(N, directions) attribute word ids per image, strongest first: the sign of the image's offset from its
    class mean along each of the class's top ``directions`` principal directions, ranked by its size."""
    if not 0 < directions <= len(ATTRIBUTE_WORDS) // 2:
        raise ValueError(f"testbed.attribute_directions must be in 1..{len(ATTRIBUTE_WORDS) // 2}, got {directions}")
    projections = torch.zeros(len(features), directions)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) == 0:
            continue
        offsets = features[members] - features[members].mean(0)
        basis = torch.linalg.svd(offsets, full_matrices=False).Vh[:directions]  # (k <= directions, d)
        projections[members, : len(basis)] = offsets @ basis.T
    order = projections.abs().argsort(dim=1, descending=True)
    return 2 * order + (projections.gather(1, order) < 0).long()


def train_text_tower(model: CLIP, tokenizer, features: torch.Tensor, caption_classes: torch.Tensor,
                     class_names: Sequence[str], cfg: TestbedConfig, generator: torch.Generator,
                     progress: bool = True, true_classes: Optional[torch.Tensor] = None) -> Dict:
    """Stage 2: a fresh text tower against frozen image features. Without caption attributes: one random
    caption per class and step, cross-entropy over the classes. With them (``true_classes`` given): CLIP's
    in-batch contrastive loss, each image captioned by a template, its class name and up to
    ``caption_attributes`` words describing where the image sits in its (true) class."""
    templates = clip_ensemble_templates()
    tokens = torch.stack([tokenizer([t.replace("{}", name) for name in class_names]) for t in templates])  # (T, C, L)
    grounded = cfg.caption_attributes > 0
    ranks = attribute_ranks(features, true_classes, len(class_names), cfg.attribute_directions) if grounded else None
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    optimizer = torch.optim.AdamW(text_params, lr=cfg.text_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.text_lr, total_steps=cfg.text_steps, pct_start=0.1)
    num_classes = len(class_names)
    model.train()
    bar = progress_bar(range(cfg.text_steps), desc="test bed: text tower", disable=not progress, leave=False)
    loss = torch.tensor(0.0)
    for _ in bar:
        batch = torch.randint(0, len(features), (cfg.text_batch_size,), generator=generator)
        if grounded:
            loss = _grounded_caption_loss(model, tokenizer, templates, class_names, features[batch],
                                          caption_classes[batch], ranks[batch], cfg.caption_attributes, generator)
        else:
            pick = torch.randint(0, len(templates), (num_classes,), generator=generator)  # a template per class
            text = F.normalize(model.encode_text(tokens[pick, torch.arange(num_classes)]), dim=-1)
            loss = F.cross_entropy(model.logit_scale.exp() * features[batch] @ text.T, caption_classes[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return {"final_loss": float(loss.detach()), "logit_scale": float(model.logit_scale.detach().exp())}


def _grounded_caption_loss(model: CLIP, tokenizer, templates: Sequence[str], class_names: Sequence[str],
                           features: torch.Tensor, named: torch.Tensor, ranks: torch.Tensor, most: int,
                           generator: torch.Generator) -> torch.Tensor:
    """CLIP's symmetric in-batch loss over one caption per image: a random template around its strongest
    0..``most`` attribute words (a random count) and the named class."""
    n = len(features)
    pick = torch.randint(0, len(templates), (n,), generator=generator).tolist()
    count = torch.randint(0, most + 1, (n,), generator=generator).tolist()
    captions = [templates[pick[i]].replace("{}", " ".join([ATTRIBUTE_WORDS[w] for w in ranks[i, : count[i]].tolist()]
                                                           + [class_names[int(named[i])]])) for i in range(n)]
    tokens = tokenizer(captions)
    eot = tokens.argmax(dim=-1)  # cut after the last end-of-text token: exact, the tower is causal
    text = F.normalize(encode_text_prefix(model, model.token_embedding(tokens[:, : int(eot.max()) + 1]), eot), dim=-1)
    logits = model.logit_scale.exp() * features @ text.T
    target = torch.arange(n)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
