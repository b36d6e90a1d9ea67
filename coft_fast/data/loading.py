"""Batched, multi-worker decoding of an :class:`ImageSource` that survives broken files.

A file that cannot be decoded is skipped: the batch simply lacks it, and the loader records its
path and the reason. ``indices`` restricts loading to part of the source (a later distributed run
passes each rank its shard).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from coft_fast.data.sources import ImageSource

log = logging.getLogger(__name__)


def decode_rgb(path: str) -> Image.Image:
    """Open an image and convert it to 8-bit RGB (grayscale, palette, RGBA and CMYK included)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageDataset(Dataset):
    """Decodes ``source.paths[i]`` with ``transform``; a failure yields ``(None, i, reason)``."""

    def __init__(self, source: ImageSource, transform: Callable, indices: Optional[Sequence[int]] = None):
        self.source = source
        self.transform = transform
        self.indices = list(range(len(source))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        path = self.source.paths[index]
        try:
            return self.transform(decode_rgb(path)), index, ""
        except Exception as exc:  # any unreadable file is skipped, never fatal
            return None, index, f"{type(exc).__name__}: {exc}"


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) of the decoded images
    indices: torch.Tensor  # (B,) int64 positions in the source
    failed: List[tuple]  # (index, reason) of the files skipped in this batch


def collate_skipping_failures(items) -> Batch:
    good = [(image, index) for image, index, _ in items if image is not None]
    failed = [(index, reason) for image, index, reason in items if image is None]
    if good:
        images = torch.stack([image for image, _ in good])
        indices = torch.tensor([index for _, index in good], dtype=torch.long)
    else:
        images, indices = torch.empty(0), torch.empty(0, dtype=torch.long)
    return Batch(images, indices, failed)


def iterate_batches(
    source: ImageSource,
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
    indices: Optional[Sequence[int]] = None,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Yield decoded batches in source order; broken files are appended to ``source.skipped``."""
    dataset = ImageDataset(source, transform, indices)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping_failures,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    for batch in loader:
        for index, reason in batch.failed:
            source.skipped.append({"path": source.paths[index], "reason": reason})
            log.warning("skipped unreadable image %s (%s)", source.paths[index], reason)
        if batch.indices.numel():
            yield batch
