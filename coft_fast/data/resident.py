"""Decoded images kept in memory, with batched training augmentation (random resized crop + flip).

Small training sets (S* in phase I, the clean set in phase II when it fits) are decoded once, at a
base size a little above the model's input size (as "Resize 256, crop 224" does), and stored as
uint8. Each training batch is then cut with one batched bicubic ``grid_sample`` call (random
resized crops, flips folded into the sampling grid) and normalised: no per-epoch decoding.
Bicubic matters: bilinear crops (``roi_align``) blurred the images enough to cost 2 to 3 points of
final accuracy against PIL's bicubic crops on the CIFAR-10 test bed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from tqdm.auto import tqdm

from coft_fast.data.loading import epoch_order, iterate_batches
from coft_fast.data.sources import ImageSource
from coft_fast.runtime.distributed import batch_part

BASE_SCALE = 256 / 224


class ResidentImages:
    """uint8 images (M, 3, B, B) of ``source`` rows ``indices``; undecodable files are left out."""

    def __init__(self, source: ImageSource, indices: Sequence[int], image_size: int, mean, std,
                 batch_size: int = 256, num_workers: int = 0, progress: bool = True,
                 device: torch.device = torch.device("cpu")):
        self.image_size = int(image_size)
        self.base_size = base_size(self.image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        base = T.Compose([
            T.Resize(self.base_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.base_size),
            T.PILToTensor(),
        ])
        chunks, positions = [], []
        bar = tqdm(total=len(indices), desc="decoding into memory", unit="img", disable=not progress, leave=False)
        for batch in iterate_batches(source, base, batch_size, num_workers, indices):
            chunks.append(batch.images)
            positions.append(batch.indices)
            bar.update(len(batch.indices) + len(batch.failed))
        bar.close()
        images = torch.cat(chunks) if chunks else torch.empty(0, 3, self.base_size, self.base_size, dtype=torch.uint8)
        self.images = images.to(device)  # on the GPU, augmentation runs there too
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        self.positions = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.positions)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images / 255.0 - self.mean) / self.std

    def train_batch(self, rows: torch.Tensor, generator: torch.Generator, scale_min: float = 0.5,
                    keep: slice = slice(None)) -> torch.Tensor:
        """Float (n, 3, S, S): random resized crops (area in [scale_min, 1], aspect 3/4..4/3) with flips.
        The crops of all ``rows`` are drawn; only those of ``rows[keep]`` are cut (a rank's part)."""
        n, b, s = len(rows), self.base_size, self.image_size
        area = b * b * (scale_min + (1 - scale_min) * torch.rand(n, generator=generator))
        log_ratio = (torch.rand(n, generator=generator) * 2 - 1) * math.log(4 / 3)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).clamp(max=b)
        h = torch.sqrt(area / ratio).clamp(max=b)
        x0 = torch.rand(n, generator=generator) * (b - w)
        y0 = torch.rand(n, generator=generator) * (b - h)
        flip = torch.rand(n, generator=generator) < 0.5
        # the affine map from output to input coordinates (in [-1, 1]); a flip negates the x scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.where(flip, -w / b, w / b)
        theta[:, 1, 1] = h / b
        theta[:, 0, 2] = (2 * x0 + w) / b - 1
        theta[:, 1, 2] = (2 * y0 + h) / b - 1
        device = self.images.device
        theta, rows = theta[keep], rows[keep]
        grid = F.affine_grid(theta.to(device), [len(rows), 3, s, s], align_corners=False)
        crops = F.grid_sample(self.images[rows.to(device)].float(), grid, mode="bicubic", padding_mode="border",
                              align_corners=False)
        return self._normalise(crops.clamp_(0, 255))

    def eval_batch(self, rows: torch.Tensor) -> torch.Tensor:
        """Float (n, 3, S, S): the centre crop of each base image."""
        offset = (self.base_size - self.image_size) // 2
        crop = self.images[rows.to(self.images.device), :, offset : offset + self.image_size,
                           offset : offset + self.image_size]
        return self._normalise(crop.float())

    def epoch_batches(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator, scale_min: float,
                      views: int = 1, shuffle: bool = True, drop_last: bool = False):
        """One pass over ``rows`` (shuffled by ``generator``): yields (augmented images, or a tuple of
        ``views`` independent augmentations, positions in ``rows``); ``drop_last`` keeps whole batches only.
        In a distributed run the images are this rank's part of the batch (``batch_part(len(positions))``),
        cut exactly as a single process would cut them."""
        order = epoch_order(len(rows), batch_size, generator, shuffle, drop_last)
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            keep = batch_part(len(picked)).rows
            augmented = tuple(self.train_batch(rows[picked], generator, scale_min, keep) for _ in range(views))
            yield (augmented[0] if views == 1 else augmented), picked


def base_size(image_size: int) -> int:
    """The side of a stored image: a little above the model's input, as "Resize 256, crop 224"."""
    return int(round(image_size * BASE_SCALE))


def decoded_bytes(count: int, image_size: int) -> int:
    """Memory that ``count`` resident images of a model with input size ``image_size`` take (uint8)."""
    return count * 3 * base_size(image_size) ** 2


def preprocess_stats(model) -> tuple:
    """(image_size, mean, std) from an open_clip model's preprocessing config."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size), tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)), tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
