"""Image decoding with NVIDIA DALI (GPU JPEG decoding where CUDA is, DALI's CPU operators elsewhere),
and its torchvision twin with the same semantics for machines without DALI.

Both read rows of an :class:`ImageSource` in a given order, shard them across ranks, and produce
normalised float batches (B, 3, S, S):

- evaluation: resize the shorter side to S (bicubic, antialiased), centre crop S x S, normalise;
- training, ``augment="random_resized_crop"``: random resized crop to S (area in [scale_min, 1] of
  the image, aspect 3/4..4/3), a horizontal flip with probability 0.5, normalise;
- training, ``augment="deft"`` (DeFT's transform): resize the shorter side to base_size(S)
  (256 for S = 224), a random S x S crop, a horizontal flip with probability 0.5, normalise.

The evaluation pipeline is deterministic; tests compare DALI's to torchvision's on real images.
DALI decodes whatever its decoders support and stops on a file it cannot read, so it is meant for
files that an earlier pass already decoded (phase II and the inference passes after zero-shot
scoring, which skips broken files and records them).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torchvision.transforms as T

from coft_fast.data.loading import Batch, iterate_batches
from coft_fast.data.sources import ImageSource
from coft_fast.runtime.distributed import shard

ASPECT_RANGE = (3 / 4, 4 / 3)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install whose import fails
        return False
    return True


def train_base_size(image_size: int) -> int:
    """DeFT's resize before its random crop: 256 for 224, the same ratio for other sizes."""
    return int(round(image_size * 256 / 224))


def torchvision_transform(image_size: int, mean, std, train: bool = False, scale_min: float = 0.5,
                          augment: str = "random_resized_crop"):
    """The torchvision/PIL pipeline with DALI's semantics (see the module docstring)."""
    if train and augment == "deft":
        steps = [T.Resize(train_base_size(image_size), interpolation=T.InterpolationMode.BICUBIC),
                 T.RandomCrop(image_size), T.RandomHorizontalFlip()]
    elif train:
        if augment != "random_resized_crop":
            raise ValueError(f"augment must be deft or random_resized_crop, got {augment!r}")
        steps = [T.RandomResizedCrop(image_size, scale=(scale_min, 1.0), ratio=ASPECT_RANGE,
                                     interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


class Views:
    """``count`` independent applications of ``transform`` to one decoded image, stacked (count, ...)."""

    def __init__(self, transform, count: int):
        self.transform, self.count = transform, count

    def __call__(self, image):
        return torch.stack([self.transform(image) for _ in range(self.count)])


def iterate_torchvision(source: ImageSource, indices: Sequence[int], image_size: int, mean, std, batch_size: int,
                        train: bool = False, scale_min: float = 0.5, num_workers: int = 0, shard_id: int = 0,
                        num_shards: int = 1, pin_memory: bool = False, views: int = 1,
                        augment: str = "random_resized_crop") -> Iterator[Batch]:
    """Batches of ``indices`` (this rank's shard, in the given order) decoded by PIL in DataLoader workers;
    with ``views`` > 1 each image is decoded once and augmented ``views`` times: images (B, views, 3, S, S)."""
    transform = torchvision_transform(image_size, mean, std, train, scale_min, augment)
    if views > 1:
        transform = Views(transform, views)
    yield from iterate_batches(source, transform, batch_size, num_workers, shard(indices, shard_id, num_shards),
                               pin_memory=pin_memory)


def _dali_pipeline(paths: Sequence[str], image_size: int, mean, std, batch_size: int, train: bool, scale_min: float,
                   seed: int, num_threads: int, device_id: Optional[int], augment: str = "random_resized_crop"):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        encoded, order = fn.readers.file(files=list(paths), labels=list(range(len(paths))), random_shuffle=False,
                                         name="reader", pad_last_batch=False)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        crop_x = crop_y = 0.5
        if train and augment == "deft":
            images = fn.resize(images, resize_shorter=train_base_size(image_size), interp_type=types.INTERP_CUBIC,
                               antialias=True)
            crop_x, crop_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
            mirror = fn.random.coin_flip(probability=0.5)
        elif train:
            images = fn.random_resized_crop(images, size=(image_size, image_size), random_area=(scale_min, 1.0),
                                            random_aspect_ratio=ASPECT_RANGE, interp_type=types.INTERP_CUBIC,
                                            antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.resize(images, resize_shorter=image_size, interp_type=types.INTERP_CUBIC, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, crop=(image_size, image_size), crop_pos_x=crop_x, crop_pos_y=crop_y, mirror=mirror,
            mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], dtype=types.FLOAT, output_layout="CHW")
        return images, order

    return pipeline()


def iterate_dali(source: ImageSource, indices: Sequence[int], image_size: int, mean, std, batch_size: int,
                 train: bool = False, scale_min: float = 0.5, device: torch.device = torch.device("cpu"),
                 seed: int = 0, num_threads: int = 2, shard_id: int = 0, num_shards: int = 1,
                 augment: str = "random_resized_crop") -> Iterator[Batch]:
    """Batches of ``indices`` (this rank's shard, in the given order) decoded by DALI: on the GPU
    (``device="mixed"``, nvJPEG) when ``device`` is CUDA, with DALI's CPU operators otherwise."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    rows = shard(indices, shard_id, num_shards)
    if not rows:
        return
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
    paths = [source.paths[i] for i in rows]
    pipeline = _dali_pipeline(paths, image_size, mean, std, min(batch_size, len(rows)), train, scale_min, seed,
                              num_threads, device_id, augment)
    pipeline.build()
    lookup = torch.tensor(rows, dtype=torch.long)
    iterator = DALIGenericIterator(pipeline, ["images", "order"], reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
    try:
        for outputs in iterator:
            out = outputs[0]
            order = out["order"].reshape(-1).long().cpu()
            yield Batch(out["images"], lookup[order], [])
    finally:
        del iterator, pipeline
