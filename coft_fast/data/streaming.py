"""Choosing a decoder, evaluation batches, and training images decoded anew every epoch."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from coft_fast.data.dali import dali_available, iterate_dali, iterate_torchvision
from coft_fast.data.loading import Batch, epoch_order, iterate_batches
from coft_fast.data.sources import ImageSource
from coft_fast.runtime.distributed import batch_part, rank

DECODERS = ("auto", "pil", "dali")


def resolve_decoder(name: str, device: torch.device) -> str:
    """"auto": DALI when it is installed and the device is a GPU (nvJPEG), else PIL; "dali" needs DALI."""
    if name not in DECODERS:
        raise ValueError(f"config key 'data.decoder' must be one of {', '.join(DECODERS)}, got {name!r}")
    if name == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "pil"
    if name == "dali" and not dali_available():
        raise RuntimeError("data.decoder=dali, but nvidia-dali is not installed: pip install -e '.[dali]' "
                           "(or set data.decoder=pil)")
    return name


def eval_batches(source: ImageSource, indices: Optional[Sequence[int]], preprocess, batch_size: int,
                 num_workers: int = 0, decoder: str = "pil", stats: Optional[tuple] = None,
                 device: torch.device = torch.device("cpu")) -> Iterator[Batch]:
    """Evaluation batches of ``indices``: PIL with ``preprocess``, or DALI with ``stats`` = (size, mean, std)."""
    if decoder == "dali":
        if stats is None:
            raise ValueError("eval_batches: the DALI decoder needs stats=(image_size, mean, std)")
        rows = list(range(len(source))) if indices is None else list(indices)
        yield from iterate_dali(source, rows, *stats, batch_size, device=device, num_threads=max(1, num_workers))
    else:
        yield from iterate_batches(source, preprocess, batch_size, num_workers, indices,
                                   pin_memory=device.type == "cuda")


class StreamedImages:
    """Rows of ``source`` (``positions``) decoded and augmented every epoch by PIL workers or DALI."""

    def __init__(self, source: ImageSource, positions: Sequence[int], image_size: int, mean, std,
                 decoder: str = "pil", num_workers: int = 0, device: torch.device = torch.device("cpu")):
        self.source = source
        self.positions = torch.as_tensor(list(positions), dtype=torch.long)
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.decoder, self.num_workers, self.device = decoder, num_workers, device

    def __len__(self) -> int:
        return len(self.positions)

    def _decode(self, rows: torch.Tensor, batch_size: int, scale_min: float, seed: int, views: int = 1,
                augment: str = "random_resized_crop"):
        indices = self.positions[rows].tolist()
        args = (self.source, indices, self.image_size, self.mean, self.std, batch_size)
        if self.decoder == "dali":
            batches = iterate_dali(*args, train=True, scale_min=scale_min, device=self.device, seed=seed,
                                   num_threads=max(1, self.num_workers), augment=augment)
        else:
            torch.manual_seed(seed)  # the workers' augmentation streams derive from it
            batches = iterate_torchvision(*args, train=True, scale_min=scale_min, num_workers=self.num_workers,
                                          views=views, augment=augment)
        expected = iter(torch.split(torch.as_tensor(indices), batch_size))
        for batch in batches:
            if not torch.equal(batch.indices, next(expected)):
                raise RuntimeError(f"{self.source.origin}: an image that decoded before failed to decode now")
            yield batch.images

    def epoch_batches(self, rows: torch.Tensor, batch_size: int, generator: torch.Generator, scale_min: float,
                      views: int = 1, shuffle: bool = True, drop_last: bool = False,
                      augment: str = "random_resized_crop"):
        """As :meth:`ResidentImages.epoch_batches`; each rank decodes only its part of each batch."""
        order = epoch_order(len(rows), batch_size, generator, shuffle, drop_last)
        # each rank augments its part with its own stream (a single process's crops are not reproduced)
        seeds = [(seed + 7919 * rank()) % (2**31 - 1)
                 for seed in torch.randint(0, 2**31 - 1, (views,), generator=generator).tolist()]
        batches = list(torch.split(order, batch_size))
        parts = [batch[batch_part(len(batch)).rows] for batch in batches]
        # every part but the last has the size of the first: decoding in chunks of it gives the parts back
        local, part_size = (torch.cat(parts), len(parts[0])) if parts else (order, batch_size)
        if self.decoder == "dali":  # one pipeline a view (each decodes the files again)
            streams = zip(*[self._decode(rows[local], part_size, scale_min, seed, augment=augment) for seed in seeds])
        else:  # PIL decodes each image once and augments it ``views`` times
            streams = (images.unbind(1) if views > 1 else (images,)
                       for images in self._decode(rows[local], part_size, scale_min, seeds[0], views, augment))
        for picked, images in zip(batches, streams):
            yield (images[0] if views == 1 else tuple(images)), picked
