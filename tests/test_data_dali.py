"""DALI decoding against its torchvision twin on the shared images, and the sharding of rows."""
import pytest
import torch

from coft_fast.data import from_folder
from coft_fast.data.dali import dali_available, iterate_dali, iterate_torchvision, shard
from coft_fast.data.loading import epoch_order, steps_per_epoch

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed (pip install -e .[dali])")


def test_shards_cover_the_rows_once_in_order():
    rows = list(range(10))
    parts = [shard(rows, rank, 3) for rank in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard(rows[:2], 2, 3) == []
    with pytest.raises(ValueError, match="shard_id"):
        shard(rows, 3, 3)


def test_epoch_order_keeps_whole_batches_with_drop_last():
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(10, 20)
    order = rows[epoch_order(len(rows), 4, generator, drop_last=True)]
    assert len(order) == 8 and len(set(order.tolist())) == 8 and set(order.tolist()) <= set(range(10, 20))
    assert steps_per_epoch(10, 4, True) == 2 and steps_per_epoch(10, 4, False) == 3 and steps_per_epoch(3, 4, True) == 1
    assert len(epoch_order(3, 4, generator, drop_last=True)) == 3  # fewer rows than a batch: kept


@pytest.fixture(scope="module")
def shared_images(cifar_root):
    source = from_folder(cifar_root / "test")
    return source, list(range(0, len(source), 131))[:37]  # odd count: a partial last batch


def _collect(batches):
    batches = list(batches)
    return torch.cat([b.images for b in batches]), torch.cat([b.indices for b in batches])


@needs_dali
@pytest.mark.parametrize("size", [32, 24, 45])
def test_dali_evaluation_pipeline_matches_torchvision(shared_images, size):
    """Decode + resize + centre crop + normalise: identical at the native size; resized, the two
    bicubic filters differ by well under one grey level on average."""
    source, rows = shared_images
    dali_images, dali_rows = _collect(iterate_dali(source, rows, size, MEAN, STD, 16, num_threads=1))
    tv_images, tv_rows = _collect(iterate_torchvision(source, rows, size, MEAN, STD, 16))
    assert dali_rows.tolist() == tv_rows.tolist() == rows
    assert dali_images.shape == tv_images.shape == (len(rows), 3, size, size)
    grey_levels = (dali_images - tv_images).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    if size == 32:  # CIFAR's own size: no resampling, the decoders agree
        assert grey_levels.max() < 0.01
    else:
        assert grey_levels.mean() < 1.0 and grey_levels.max() < 16


@needs_dali
def test_dali_training_pipeline_is_seeded_and_sharded(shared_images):
    source, rows = shared_images
    first, order = _collect(iterate_dali(source, rows, 32, MEAN, STD, 8, train=True, seed=3, num_threads=1))
    again, _ = _collect(iterate_dali(source, rows, 32, MEAN, STD, 8, train=True, seed=3, num_threads=1))
    other, _ = _collect(iterate_dali(source, rows, 32, MEAN, STD, 8, train=True, seed=4, num_threads=1))
    assert first.shape == (len(rows), 3, 32, 32) and order.tolist() == rows
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    evaluation, _ = _collect(iterate_dali(source, rows, 32, MEAN, STD, 8, num_threads=1))
    assert not torch.equal(first, evaluation)  # crops and flips changed the images
    halves = [_collect(iterate_dali(source, rows, 32, MEAN, STD, 8, shard_id=r, num_shards=2, num_threads=1))[1]
              for r in range(2)]
    assert torch.cat(halves).tolist() == rows
