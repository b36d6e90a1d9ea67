"""Training images decoded once into memory (uint8) and augmented per batch by matrices resampling as PIL's bicubic."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch
import torchvision.transforms as T
from PIL import Image
from coft_fast.runtime.progress import progress_bar

from coft_fast.data.loading import epoch_order, iterate_batches
from coft_fast.data.sources import ImageSource
from coft_fast.runtime.distributed import batch_part

BASE_SCALE = 256 / 224
CUBIC_A = -0.5  # PIL's bicubic kernel (torch's grid_sample and interpolate use -0.75)
SIZE_PROBES = 64  # image headers read to choose the stored side


class ResidentImages:
    """uint8 images (M, 3, B, B) of ``source`` rows ``indices``; undecodable files are left out."""

    def __init__(self, source: ImageSource, indices: Sequence[int], image_size: int, mean, std,
                 batch_size: int = 256, num_workers: int = 0, progress: bool = True,
                 device: torch.device = torch.device("cpu")):
        self.image_size = int(image_size)
        self.base_size = stored_side([source.paths[i] for i in indices], self.image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        base = T.Compose([T.Resize(self.base_size, interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(self.base_size), T.PILToTensor()])
        chunks, positions = [], []
        with progress_bar(total=len(indices), desc="decoding into memory", unit="img", disable=not progress,
                          leave=False) as bar:
            for batch in iterate_batches(source, base, batch_size, num_workers, indices):
                chunks.append(batch.images)
                positions.append(batch.indices)
                bar.update(len(batch.indices) + len(batch.failed))
        images = torch.cat(chunks) if chunks else torch.empty(0, 3, self.base_size, self.base_size, dtype=torch.uint8)
        self.images = images.to(device)  # on the GPU, augmentation runs there too
        self.positions = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.positions)

    def train_batch(self, rows: torch.Tensor, generator: torch.Generator, scale_min: float = 0.5,
                    keep: slice = slice(None), augment: str = "random_resized_crop") -> torch.Tensor:
        """Normalised, randomly flipped crops (n, 3, S, S): ``"random_resized_crop"`` or ``"deft"`` (Resize(256) ->
        RandomCrop(224) at a whole-pixel offset). All ``rows``' crops are drawn, ``rows[keep]``'s cut."""
        n, b, s = len(rows), self.base_size, self.image_size
        if augment == "deft":
            side = torch.full((n,), b * s / base_size(s), dtype=torch.float64).clamp(max=b)
            room = torch.floor(b - side) + 1  # whole-pixel offsets 0 .. floor(b - side)
            x0 = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * room).clamp(max=b - side)
            y0 = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * room).clamp(max=b - side)
            w = h = side
        elif augment == "random_resized_crop":
            area = b * b * (scale_min + (1 - scale_min) * torch.rand(n, generator=generator))
            ratio = torch.exp((torch.rand(n, generator=generator) * 2 - 1) * math.log(4 / 3))
            w = torch.sqrt(area * ratio).clamp(max=b)
            h = torch.sqrt(area / ratio).clamp(max=b)
            x0 = torch.rand(n, generator=generator) * (b - w)
            y0 = torch.rand(n, generator=generator) * (b - h)
        else:
            raise ValueError(f"augment must be deft or random_resized_crop, got {augment!r}")
        flip = torch.rand(n, generator=generator) < 0.5
        device = self.images.device
        boxes = torch.stack([x0.float(), y0.float(), w.float(), h.float(), flip.float()], dim=1)[keep].to(device)  # one copy per batch
        x0, y0, w, h, flip = boxes.unbind(1)
        across = resample_matrix(x0, w, b, s)
        across = torch.where(flip[:, None, None] > 0, across.flip(1), across)
        down = resample_matrix(y0, h, b, s)
        images = self.images[rows[keep].to(device)].float()
        crops = down[:, None] @ images @ across[:, None].transpose(-1, -2)
        return (crops.clamp_(0, 255) / 255.0 - self.mean) / self.std

    def epoch_batches(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator, scale_min: float,
                      views: int = 1, shuffle: bool = True, drop_last: bool = False,
                      augment: str = "random_resized_crop"):
        """One pass over ``rows``: (augmented images, or a tuple of ``views``, positions in ``rows``) per batch."""
        order = epoch_order(len(rows), batch_size, generator, shuffle, drop_last)
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            keep = batch_part(len(picked)).rows
            augmented = tuple(self.train_batch(rows[picked], generator, scale_min, keep, augment) for _ in range(views))
            yield (augmented[0] if views == 1 else augmented), picked


def base_size(image_size: int) -> int:
    """The largest side of a stored image: a little above the model's input, as "Resize 256, crop 224"."""
    return int(round(image_size * BASE_SCALE))


def stored_side(paths: Sequence[str], image_size: int) -> int:
    """``base_size``, lowered to the median short side of a sample of ``paths`` (never below ``image_size``)."""
    step = max(1, len(paths) // SIZE_PROBES)
    sides = []
    for path in paths[::step][:SIZE_PROBES]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except Exception:  # a broken file is skipped when decoding
            continue
    side = min(base_size(image_size), int(statistics.median(sides))) if sides else base_size(image_size)
    return max(side, image_size)


def cubic(x: torch.Tensor, a: float = CUBIC_A) -> torch.Tensor:
    """Keys' bicubic kernel."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(n, out_size, in_size) matrices resampling [start, start + length) to ``out_size`` as PIL's crop-then-resize."""
    start, length = start.double(), length.double()  # the matrices are built on start's device
    scale = length / out_size
    stretch = scale.clamp(min=1.0)
    centres = start[:, None] + (torch.arange(out_size, dtype=torch.float64, device=start.device) + 0.5) * scale[:, None]
    taps = torch.arange(in_size, dtype=torch.float64, device=start.device)
    inside = (taps[None] >= start.floor()[:, None]) & (taps[None] < (start + length).ceil()[:, None])
    weights = cubic((taps[None, None, :] + 0.5 - centres[:, :, None]) / stretch[:, None, None]) * inside[:, None]
    return (weights / weights.sum(-1, keepdim=True)).float()


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
