"""The resident images' batched augmentation: bicubic random resized crops with flips."""
import math

import torch

from coft_fast.data.resident import ResidentImages


def ramp_images(count=64, base=20, size=16):
    """Resident images whose pixel value is 10 x the column index (0..190), raw values out (no normalising)."""
    images = ResidentImages.__new__(ResidentImages)
    images.image_size, images.base_size = size, base
    images.mean, images.std = torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 1 / 255)
    ramp = (10 * torch.arange(base)).to(torch.uint8)
    images.images = ramp.view(1, 1, 1, base).expand(count, 3, base, base).contiguous()
    images.positions = torch.arange(count)
    return images


def test_crops_sample_the_box_bicubically_and_flip_half_of_them():
    images = ramp_images()
    crops = images.train_batch(torch.arange(64), torch.Generator().manual_seed(0), scale_min=0.5)
    assert crops.shape == (64, 3, 16, 16)
    torch.testing.assert_close(crops, crops[:, :, :1].expand_as(crops), atol=1e-3, rtol=1e-5)  # constant down columns
    steps = crops[:, 0, 0, 1:] - crops[:, 0, 0, :-1]  # (64, 15)
    inner = steps[:, 2:-2]  # away from the border a ramp stays a ramp (to within bicubic overshoot)
    slope = inner.mean(dim=1)
    torch.testing.assert_close(inner, slope[:, None].expand_as(inner), atol=1.0, rtol=0.0)
    assert ((steps > 0).all(dim=1) | (steps < 0).all(dim=1)).all()  # monotonic: flipped or not, never mixed
    width = slope.abs() * 16 / 10  # the box width in base pixels
    smallest = 20 * math.sqrt(0.5 * 3 / 4)  # area 0.5 at aspect 3/4
    assert (width >= 0.95 * smallest).all() and (width <= 1.05 * 20).all()  # 5 %: bicubic overshoot
    flipped = (slope < 0).float().mean()
    assert 0.3 < flipped < 0.7
    assert crops.min() >= 0 and crops.max() <= 190


def test_the_same_generator_gives_the_same_batch():
    images = ramp_images(8)
    first = images.train_batch(torch.arange(8), torch.Generator().manual_seed(3))
    again = images.train_batch(torch.arange(8), torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, again)
