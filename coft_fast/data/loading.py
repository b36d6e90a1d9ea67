"""Batched, multi-worker decoding of an :class:`ImageSource`; undecodable files go to ``source.skipped``."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from coft_fast.data.sources import ImageSource

log = logging.getLogger(__name__)
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale scaled into 0..255 (PIL's convert would clip them)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.size == 0 or np.nanmax(values) <= 1.0 else 255.0
    elif image.mode.startswith("I;16"):
        top = 65535.0
    else:  # "I": 16-bit PNGs often open in this mode; the bit depth is not recorded
        peak = float(values.max()) if values.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    scaled = np.clip(np.nan_to_num(values) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def decode_rgb(path: str) -> Image.Image:
    """An image as 8-bit RGB: 16-bit scaled (not clipped), transparent pixels composited onto white."""
    with Image.open(path) as image:
        image.load()
        if image.mode in HIGH_BIT_DEPTH_MODES:
            image = _to_8bit(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


class ImageDataset(Dataset):
    """``source.paths[i]`` decoded and transformed; a failure yields ``(None, i, reason)``."""

    def __init__(self, source: ImageSource, transform: Callable, indices: Optional[Sequence[int]] = None):
        self.source = source
        self.transform = transform
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        try:
            return self.transform(decode_rgb(self.source.paths[index])), index, ""
        except Exception as exc:  # any unreadable file is skipped, never fatal
            return None, index, f"{type(exc).__name__}: {exc}"


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) of the decoded images
    indices: torch.Tensor  # (B,) int64 positions in the source
    failed: List[tuple]  # (index, reason) of the files skipped in this batch


def collate_skipping_failures(items) -> Batch:
    good = [(image, index) for image, index, _ in items if image is not None]
    images = torch.stack([image for image, _ in good]) if good else torch.empty(0)
    indices = torch.tensor([index for _, index in good], dtype=torch.long)
    return Batch(images, indices, [(index, reason) for image, index, reason in items if image is None])


def epoch_order(count: int, batch_size: int, generator: torch.Generator, shuffle: bool = True,
                drop_last: bool = False) -> torch.Tensor:
    """Positions 0..count-1 for one pass (shuffled); ``drop_last``: whole batches only, if there is one."""
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    return order[: steps_per_epoch(count, batch_size, drop_last) * batch_size] if drop_last else order


def steps_per_epoch(count: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over ``count`` samples (see :func:`epoch_order`)."""
    return count // batch_size if drop_last and count >= batch_size else math.ceil(count / batch_size)


def iterate_batches(source: ImageSource, transform: Callable, batch_size: int, num_workers: int = 0,
                    indices: Optional[Sequence[int]] = None, pin_memory: bool = False) -> Iterator[Batch]:
    """Decoded batches of ``indices`` (default: all) in order; broken files go to ``source.skipped``."""
    loader = DataLoader(ImageDataset(source, transform, indices), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_skipping_failures, pin_memory=pin_memory)
    for batch in loader:
        for index, reason in batch.failed:
            source.skipped.append({"path": source.paths[index], "reason": reason})
            log.warning("skipped unreadable image %s (%s)", source.paths[index], reason)
        if batch.indices.numel():
            yield batch
