"""Decoding with NVIDIA DALI (nvJPEG on a GPU) and its torchvision twin, both yielding normalised (B, 3, S, S):
evaluation resizes (bicubic) and centre-crops; training does ``"random_resized_crop"`` or ``"deft"`` (shorter
side to base_size(S), a random crop), with a random flip. DALI stops on an unreadable file."""
from __future__ import annotations

import functools
import importlib
from typing import Iterator, Sequence

import torch
import torchvision.transforms as T

from coft_fast.data.loading import Batch, iterate_batches
from coft_fast.data.resident import base_size
from coft_fast.data.sources import ImageSource
from coft_fast.runtime.distributed import shard

ASPECT_RANGE = (3 / 4, 4 / 3)


def dali_available() -> bool:
    try:
        importlib.import_module("nvidia.dali.plugin.pytorch")  # imports nvidia.dali too
    except Exception:  # ImportError, or a broken install whose import fails
        return False
    return True


def torchvision_transform(image_size: int, mean, std, train: bool = False, scale_min: float = 0.5,
                          augment: str = "random_resized_crop"):
    """The torchvision/PIL pipeline with DALI's semantics (see the module docstring)."""
    if train and augment == "deft":
        steps = [T.Resize(base_size(image_size), interpolation=T.InterpolationMode.BICUBIC),
                 T.RandomCrop(image_size), T.RandomHorizontalFlip()]
    elif train:
        if augment != "random_resized_crop":
            raise ValueError(f"augment must be deft or random_resized_crop, got {augment!r}")
        steps = [T.RandomResizedCrop(image_size, scale=(scale_min, 1.0), ratio=ASPECT_RANGE,
                                     interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def _views(transform, count: int, image) -> torch.Tensor:
    """``count`` independent applications of ``transform`` to one decoded image, stacked (count, ...)."""
    return torch.stack([transform(image) for _ in range(count)])


def iterate_torchvision(source: ImageSource, indices: Sequence[int], image_size: int, mean, std, batch_size: int,
                        train: bool = False, scale_min: float = 0.5, num_workers: int = 0, views: int = 1,
                        augment: str = "random_resized_crop") -> Iterator[Batch]:
    """Batches of ``indices`` decoded by PIL workers; ``views`` > 1: (B, views, 3, S, S), each image decoded once."""
    transform = torchvision_transform(image_size, mean, std, train, scale_min, augment)
    if views > 1:
        transform = functools.partial(_views, transform, views)  # picklable for DataLoader workers
    yield from iterate_batches(source, transform, batch_size, num_workers, indices)


def iterate_dali(source: ImageSource, indices: Sequence[int], image_size: int, mean, std, batch_size: int,
                 train: bool = False, scale_min: float = 0.5, device: torch.device = torch.device("cpu"),
                 seed: int = 0, num_threads: int = 2, shard_id: int = 0, num_shards: int = 1,
                 augment: str = "random_resized_crop") -> Iterator[Batch]:
    """Batches of this shard of ``indices`` decoded by DALI (on a CUDA ``device``'s GPU, else on the CPU)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    rows = shard(indices, shard_id, num_shards)
    if not rows:
        return
    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    paths = [source.paths[i] for i in rows]

    @pipeline_def(batch_size=min(batch_size, len(rows)), num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        encoded, order = fn.readers.file(files=paths, labels=list(range(len(paths))), random_shuffle=False,
                                         name="reader", pad_last_batch=False)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        crop_x = crop_y = 0.5
        if train and augment == "deft":
            images = fn.resize(images, resize_shorter=base_size(image_size), interp_type=types.INTERP_CUBIC,
                               antialias=True)
            crop_x, crop_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
        elif train:
            images = fn.random_resized_crop(images, size=(image_size, image_size), random_area=(scale_min, 1.0),
                                            random_aspect_ratio=ASPECT_RANGE, interp_type=types.INTERP_CUBIC,
                                            antialias=True)
        else:
            images = fn.resize(images, resize_shorter=image_size, interp_type=types.INTERP_CUBIC, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5) if train else 0  # after the crop's random operators
        images = fn.crop_mirror_normalize(
            images, crop=(image_size, image_size), crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=mirror,
            mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], dtype=types.FLOAT, output_layout="CHW")
        return images, order

    pipeline = pipeline()
    pipeline.build()
    lookup = torch.tensor(rows, dtype=torch.long)
    iterator = DALIGenericIterator(pipeline, ["images", "order"], reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
    try:
        for (out,) in iterator:  # one pipeline
            yield Batch(out["images"], lookup[out["order"].reshape(-1).long().cpu()], [])
    finally:
        del iterator, pipeline
