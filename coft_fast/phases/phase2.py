"""Phase II: full fine-tuning of a fresh pre-trained visual encoder plus a linear head on a clean set."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from coft_fast.runtime.progress import progress_bar

from coft_fast.config import Phase2Config
from coft_fast.data.loading import steps_per_epoch
from coft_fast.data.resident import ResidentImages
from coft_fast.data.streaming import StreamedImages
from coft_fast.models.momentum import MomentumContrast
from coft_fast.phases.guard import FiniteGuard
from coft_fast.phases.schedule import epoch_generator, warmup_cosine
from coft_fast.runtime.checkpoint import restore_training, save_training
from coft_fast.runtime.device import autocast
from coft_fast.runtime.distributed import all_reduce_sum, batch_part, data_parallel, world_size

log = logging.getLogger(__name__)


class ScaledLinearHead(nn.Module):
    """logits = scale * f @ weight.T + bias for normalised features f, with ``scale`` fixed: started from the
    class text embeddings, the updates are on the scale of the unit-sized weights (not 1/100 of it)."""

    def __init__(self, weight: torch.Tensor, scale: float):
        super().__init__()
        self.weight = nn.Parameter(weight.clone().float())
        self.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device))
        self.register_buffer("scale", torch.tensor(float(scale), device=weight.device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * (features @ self.weight.T) + self.bias


class FineTunedClassifier(nn.Module):
    """logits = head(normalize(visual(x))): CLIP's image features with a linear head."""

    def __init__(self, visual: nn.Module, head: ScaledLinearHead):
        super().__init__()
        self.visual = visual
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(images).float(), dim=-1))


def build_classifier(visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float, head_init: str,
                     seed: int) -> FineTunedClassifier:
    """A trainable copy of ``visual`` and a (C x d) head: the zero-shot classifier or a random one."""
    import copy

    if head_init == "zeroshot":
        weight = text_embeddings.float()
    else:
        generator = torch.Generator().manual_seed(seed)
        weight = F.normalize(torch.randn(text_embeddings.shape, generator=generator), dim=-1).to(text_embeddings.device)
    visual = copy.deepcopy(visual)
    for parameter in visual.parameters():
        parameter.requires_grad_(True)
    return FineTunedClassifier(visual, ScaledLinearHead(weight, logit_scale))


@dataclass
class ContrastiveTerm:
    """CoFT+'s gamma * InfoNCE term over ``pool_rows`` (every resident pool image), keys from ``module``."""

    module: MomentumContrast
    pool_rows: torch.Tensor
    gamma: float
    temperature: float
    backend: str = "auto"


def _pool_views(images, pool_rows: torch.Tensor, count: int, steps: int, generator: torch.Generator,
                scale_min: float):
    """``steps`` batches of ``count`` pool images, each as two independent augmentations (query, key views)."""
    order = torch.cat([torch.randperm(len(pool_rows), generator=generator)
                       for _ in range(math.ceil(steps * count / len(pool_rows)))])
    chosen = pool_rows[order[: steps * count]]
    for views, _ in images.epoch_batches(chosen, count, generator, scale_min, views=2, shuffle=False):
        yield views


class Phase2Training(nn.Module):
    """One phase II forward pass for DDP: (logits of the first ``labelled`` images, queries of the rest or None)."""

    def __init__(self, classifier: FineTunedClassifier, encoder: nn.Module,
                 contrast: Optional[MomentumContrast] = None):
        super().__init__()
        self.classifier = classifier
        self.contrast = contrast
        self._encoder = (encoder,)  # the same parameters as classifier.visual: not registered twice

    def forward(self, images: torch.Tensor, labelled: int):
        features = self._encoder[0](images).float()
        logits = self.classifier.head(F.normalize(features[:labelled], dim=-1))
        queries = self.contrast.queries(features[labelled:]) if self.contrast is not None else None
        return logits, queries


def logit_adjustment(labels: torch.Tensor, num_classes: int, tau: float) -> torch.Tensor:
    """(C,) ``tau * log(prior)`` of the add-one smoothed label frequencies, added to the logits inside the
    cross-entropy only (Menon et al.): a class the pseudo-labels under-represent is not learnt as rare."""
    counts = torch.bincount(labels, minlength=num_classes).float() + 1
    return tau * (counts / counts.sum()).log()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: Phase2Config) -> torch.Tensor:
    """Phase II's loss of a batch: cross-entropy (the paper's) or generalized cross-entropy (``cfg.loss``)."""
    if cfg.loss == "gce":
        p_label = torch.softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1).clamp_min(1e-7)
        return ((1.0 - p_label ** cfg.gce_q) / cfg.gce_q).mean()
    return F.cross_entropy(logits, labels)


def optimizer_options(device: torch.device) -> Dict:
    """One fused kernel per optimiser step on CUDA; the multi-tensor (foreach) path elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def phase2_optimizer(classifier: FineTunedClassifier, cfg: Phase2Config, device: torch.device,
                     contrastive: Optional[ContrastiveTerm], per_epoch: int, total: int):
    """(the trained module, SGD, warm-up then cosine); the head (and projection) at lr * head_lr_scale."""
    groups = [
        {"params": list(classifier.visual.parameters()), "lr": cfg.lr},
        {"params": list(classifier.head.parameters()), "lr": cfg.lr * cfg.head_lr_scale},
    ]
    trained: nn.Module = classifier
    if contrastive is not None:
        projection = list(contrastive.module.projection.parameters())
        if projection:
            groups.append({"params": projection, "lr": cfg.lr * cfg.head_lr_scale})
        trained = nn.ModuleDict({"classifier": classifier, "contrast": contrastive.module})
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                **optimizer_options(device))
    return trained, optimizer, warmup_cosine(optimizer, int(round(cfg.warmup_epochs * per_epoch)), total)


def log_phase2_epoch(history: List[Dict], running: torch.Tensor, seen: int, epoch: int, step: int,
                     contrastive: Optional[ContrastiveTerm], bar, writer, tag: str, scheduler) -> None:
    """The epoch's mean losses into ``history``, the progress bar and TensorBoard."""
    ce_mean, cont_mean = (running / max(seen, 1)).tolist()
    entry = {"epoch": epoch, "step": step, "loss": ce_mean}
    if contrastive is not None:
        entry.update({"contrastive": cont_mean, "total": ce_mean + contrastive.gamma * cont_mean})
    history.append(entry)
    bar.set_postfix(epoch=epoch + 1, loss=f"{ce_mean:.3f}")
    if writer is not None:
        writer.add_scalar(f"phase2/{tag}/loss", ce_mean, epoch)
        if contrastive is not None:
            writer.add_scalar(f"phase2/{tag}/contrastive", cont_mean, epoch)
        writer.add_scalar(f"phase2/{tag}/lr", scheduler.get_last_lr()[0], epoch)


def train_phase2(classifier: FineTunedClassifier, images: Union[ResidentImages, StreamedImages], rows: torch.Tensor,
                 labels: torch.Tensor, cfg: Phase2Config, seed: int, device: torch.device, precision: str = "auto",
                 checkpoint: Optional[Path] = None, checkpoint_seconds: float = 60.0, progress: bool = True,
                 writer=None, tag: str = "s1", contrastive: Optional[ContrastiveTerm] = None,
                 compile_model: bool = False) -> Dict:
    """``cfg.loss`` training (logit-adjusted when ``cfg.logit_adjust`` > 0) with SGD, warm-up and cosine decay,
    resumable at epoch boundaries. ``contrastive`` adds gamma * InfoNCE of pool views (one forward pass with
    the labelled batch); ``compile_model`` compiles the encoder and keeps whole batches only."""
    if len(rows) == 0:
        raise ValueError(f"phase II ({tag}): the training set is empty; nothing survived the filter")
    drop_last = compile_model  # whole batches only: the compiled encoder sees one shape
    per_epoch = steps_per_epoch(len(rows), cfg.batch_size, drop_last)
    total = cfg.epochs * per_epoch
    trained, optimizer, scheduler = phase2_optimizer(classifier, cfg, device, contrastive, per_epoch, total)
    encoder = torch.compile(classifier.visual) if compile_model else classifier.visual
    start_epoch, step, history = restore_training(checkpoint, trained, optimizer, scheduler)
    if step:
        log.info("phase II %s: resumed at epoch %d of %d", tag, start_epoch, cfg.epochs)
    labels = labels.to(device)
    adjustment = logit_adjustment(labels, classifier.head.weight.shape[0], cfg.logit_adjust)
    classifier.train()
    last_save = time.monotonic()
    guard = FiniteGuard(f"phase II {tag}")
    forward = data_parallel(Phase2Training(classifier, encoder, contrastive.module if contrastive else None), device)
    bar = progress_bar(total=total, initial=step, desc=f"phase II {tag}", unit="step", disable=not progress, leave=False)
    for epoch in range(start_epoch, cfg.epochs):
        generator = epoch_generator(seed, epoch)
        # (cross-entropy, contrastive) batch means times batch sizes, summed on the device, over ranks at the end
        running = torch.zeros(2, device=device)
        seen = 0
        views = None
        if contrastive is not None:
            views = _pool_views(images, contrastive.pool_rows, cfg.batch_size, per_epoch,
                                epoch_generator(seed + 1, epoch), cfg.crop_scale_min)
        for batch_images, picked in images.epoch_batches(rows, cfg.batch_size, generator, cfg.crop_scale_min,
                                                         drop_last=drop_last, augment=cfg.augment):
            part = batch_part(len(picked))  # this rank's images (all of them in one process)
            mine = picked[part.rows].to(device)
            batch_images = batch_images.to(device, non_blocking=True)
            with autocast(precision, device):
                if views is None:
                    logits, _ = forward(batch_images, len(batch_images))
                else:
                    query_view, key_view = (view.to(device, non_blocking=True) for view in next(views))
                    logits, queries = forward(torch.cat([batch_images, query_view]), len(batch_images))
                    contrastive.module.update_(classifier.visual)
                    keys = contrastive.module.keys(key_view)
            ce = classification_loss(logits + adjustment, labels[mine], cfg)
            loss, share = ce * part.weight, len(picked) / world_size()
            running[0] += ce.detach() * (part.weight * share)
            if views is not None:
                pool_weight = batch_part(cfg.batch_size).weight  # the views' batch is always whole
                cont = contrastive.module.loss(queries, keys, contrastive.temperature, contrastive.backend)
                loss = loss + contrastive.gamma * pool_weight * cont
                running[1] += cont.detach() * (pool_weight * share)
            guard.step(loss, optimizer, scheduler, step + 1, epoch, rows[picked.cpu()])
            if views is not None:
                contrastive.module.push_(keys)  # every rank's keys, in rank order
            step += 1
            seen += len(picked)
            bar.update(1)
        running = all_reduce_sum(running)
        guard.check()
        log_phase2_epoch(history, running, seen, epoch, step, contrastive, bar, writer, tag, scheduler)
        done = epoch == cfg.epochs - 1
        if checkpoint is not None and (done or time.monotonic() - last_save >= checkpoint_seconds):
            save_training(checkpoint, trained.state_dict(), optimizer, scheduler, epoch, step, history)
            last_save = time.monotonic()
    bar.close()
    classifier.eval()
    return {"steps": step, "history": history}
