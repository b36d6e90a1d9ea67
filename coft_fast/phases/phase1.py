"""Phase I: tune the dual text prompts and the visual prompts of one model on S* (frozen CLIP)."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from coft_fast.runtime.progress import progress_bar

from coft_fast import ops
from coft_fast.config import Phase1Config
from coft_fast.data import ImageSource
from coft_fast.data.resident import ResidentImages, preprocess_stats
from coft_fast.data.streaming import StreamedImages
from coft_fast.models import ClipModel
from coft_fast.models.prompts import DualPromptLearner
from coft_fast.models.visual_prompts import VisualPrompts
from coft_fast.ops._checks import check_labels
from coft_fast.phases.guard import FiniteGuard
from coft_fast.phases.schedule import epoch_generator, warmup_cosine
from coft_fast.runtime.checkpoint import restore_training, save_training
from coft_fast.runtime.device import autocast
from coft_fast.runtime.distributed import all_reduce_sum, batch_part, data_parallel, world_size
from coft_fast.scoring import model_outputs

log = logging.getLogger(__name__)


@dataclass
class PromptModel:
    """One CoFT phase-I model: frozen CLIP plus its dual text prompts and visual prompts."""

    clip: ClipModel
    prompts: DualPromptLearner
    visual_prompts: VisualPrompts

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self.prompts.parameters()) + list(self.visual_prompts.parameters())

    def text_features(self):
        pos, neg = self.prompts()
        return F.normalize(pos.float(), dim=-1), F.normalize(neg.float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.clip.model.visual
        with self.visual_prompts.applied(visual):
            return F.normalize(visual(images).float(), dim=-1)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"ctx_pos": self.prompts.ctx_pos, "ctx_neg": self.prompts.ctx_neg, "vpt": self.visual_prompts.tokens}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.prompts.ctx_pos.copy_(state["ctx_pos"])
            self.prompts.ctx_neg.copy_(state["ctx_neg"])
            self.visual_prompts.tokens.copy_(state["vpt"])


class PromptTraining(nn.Module):
    """The trained parts of a :class:`PromptModel` as one module for DDP: (image, positive, negative features)."""

    def __init__(self, model: PromptModel):
        super().__init__()
        self.prompts = model.prompts
        self.visual_prompts = model.visual_prompts
        self._model = (model,)

    def forward(self, images: torch.Tensor):
        model = self._model[0]
        return (model.image_features(images),) + model.text_features()


def make_prompt_model(clip: ClipModel, class_names: Sequence[str], cfg: Phase1Config, seed: int,
                      device: torch.device) -> PromptModel:
    """A freshly initialised model (context N(0, std), VPT uniform), deterministic for ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    prompts = DualPromptLearner(clip.model, clip.tokenizer, class_names, cfg.n_ctx, cfg.ctx_init_std, generator,
                                joint=cfg.text_encoding == "joint")
    visual_prompts = VisualPrompts(clip.model.visual, cfg.vpt_tokens, generator)
    return PromptModel(clip, prompts.to(device), visual_prompts.to(device))


def complement_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A label drawn uniformly from the other C - 1 classes, per sample."""
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def log_phase1_step(history: List[Dict], loss, l1, l2, weight: float, step: int, bar, writer, tag: str,
                    scheduler) -> None:
    """The whole batch's mean losses (summed over ranks) into ``history``, the progress bar and TensorBoard."""
    summed = all_reduce_sum(torch.stack([loss, l1, l2]).detach() * (weight / world_size()))
    values = tuple(summed.tolist())
    history.append({"step": step, "loss": values[0], "l1": values[1], "l2": values[2]})
    bar.set_postfix(loss=f"{values[0]:.3f}")
    if writer is not None:
        for name, value in zip(("loss", "l1", "l2"), values):
            writer.add_scalar(f"phase1/{tag}/{name}", value, step)
        writer.add_scalar(f"phase1/{tag}/lr", scheduler.get_last_lr()[0], step)


def train_phase1(model: PromptModel, images: Union[ResidentImages, StreamedImages], rows: torch.Tensor,
                 labels: torch.Tensor, cfg: Phase1Config, seed: int, device: torch.device, precision: str = "auto",
                 checkpoint: Optional[Path] = None, checkpoint_seconds: float = 60.0, progress: bool = True,
                 writer=None, tag: str = "model", backend: str = "auto") -> Dict:
    """Train ``model`` with L1 + lam * L2 on images ``rows`` labelled ``labels``, for at least ``cfg.steps``
    steps and ``cfg.min_epochs`` epochs. Each epoch's randomness comes from (seed, epoch) alone and the state
    is saved at epoch ends (at most every ``checkpoint_seconds``), so a killed run resumes exactly."""
    num_classes = model.prompts.num_classes
    if num_classes < 2:
        raise ValueError("phase I needs at least 2 classes (L2 draws a complement label from the other classes)")
    if len(rows) == 0:
        raise ValueError(f"phase I of {tag}: S* is empty, nothing to train on")
    logit_scale = float(model.clip.model.logit_scale.detach().exp())
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = max(cfg.steps, cfg.min_epochs * per_epoch)
    epochs = math.ceil(total / per_epoch)
    optimizer = torch.optim.SGD([{"params": list(model.prompts.parameters()), "lr": cfg.lr},
                                 {"params": list(model.visual_prompts.parameters()), "lr": cfg.lr * cfg.vpt_lr_scale}],
                                lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.warmup_steps, total)
    start_epoch, step, history = restore_training(checkpoint, model, optimizer, scheduler)
    if step:
        log.info("phase I %s: resumed at epoch %d (step %d of %d)", tag, start_epoch, step, total)
    # the labels' range is read once here, not on every step (a host synchronisation each)
    check_labels("labels", labels, len(rows), num_classes)
    labels = labels.to(device)
    last_save = time.monotonic()
    guard = FiniteGuard(f"phase I {tag}")
    # without a gradient in some steps: the negative context when lam == 0, the visual prompts when there are
    # none; DDP must be told, or it stops the run
    forward = data_parallel(PromptTraining(model), device, find_unused_parameters=cfg.lam == 0 or cfg.vpt_tokens == 0)
    bar = progress_bar(total=total, initial=step, desc=f"phase I {tag}", unit="step", disable=not progress, leave=False)
    for epoch in range(start_epoch, epochs):
        generator = epoch_generator(seed, epoch)
        complements = complement_labels(labels.cpu(), num_classes, generator).to(device)
        for batch_images, picked in images.epoch_batches(rows, cfg.batch_size, generator, cfg.crop_scale_min,
                                                         augment=cfg.augment):
            if step >= total:
                break
            part = batch_part(len(picked))  # this rank's images (all of them in one process)
            mine = picked[part.rows].to(device)
            with autocast(precision, device):
                image_feats, pos, neg = forward(batch_images.to(device, non_blocking=True))
            loss, l1, l2 = ops.dual_prompt_loss(
                image_feats, pos, neg, labels[mine], complements[mine], logit_scale, cfg.lam,
                cfg.detach_image_in_neg, cfg.detach_pos_in_l2, backend=backend, check_label_range=False,
            )
            guard.step(loss * part.weight, optimizer, scheduler, step + 1, epoch, rows[picked.cpu()])
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == total:
                guard.check()
                log_phase1_step(history, loss, l1, l2, part.weight, step, bar, writer, tag, scheduler)
        done = step >= total
        guard.check()
        if checkpoint is not None and (done or time.monotonic() - last_save >= checkpoint_seconds):
            save_training(checkpoint, model.state_dict(), optimizer, scheduler, epoch, step, history)  # rank 0 writes
            last_save = time.monotonic()
        if done:
            break
    bar.close()
    return {"steps": step, "epochs": epochs, "history": history}


class _PromptFeatures(nn.Module):
    """Every phase-I model's image features of one batch, side by side: (B, models, d)."""

    def __init__(self, models: Sequence[PromptModel]):
        super().__init__()
        self.models = tuple(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([model.image_features(images) for model in self.models], 1)


def encode_with_models(models: Sequence[PromptModel], source: ImageSource, indices: Optional[Sequence[int]],
                       device: torch.device, precision: str = "auto", batch_size: int = 256, num_workers: int = 0,
                       progress: bool = True, description: str = "labelling", decoder: str = "pil",
                       reuse: bool = True):
    """([normalised image features (M, d) per model], positions (M,)) of ``source``, every image decoded once
    for all models (``reuse=False``: once per model; ``decoder="dali"`` only for images decoded before)."""
    if not reuse and len(models) > 1:
        outputs = [encode_with_models([model], source, indices, device, precision, batch_size, num_workers, progress,
                                      description, decoder) for model in models]
        return [features[0] for features, _ in outputs], outputs[0][1]
    clip = models[0].clip
    stats = preprocess_stats(clip.model) if decoder == "dali" else None
    features, positions = model_outputs(_PromptFeatures(models), source, clip.preprocess_eval, device, precision,
                                        batch_size, num_workers, indices, progress, description, decoder, stats)
    if not len(positions):
        return [features] * len(models), positions
    return [each.contiguous() for each in features.unbind(1)], positions
