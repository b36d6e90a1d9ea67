"""The resident images' batched augmentation: PIL-style bicubic random resized crops with flips."""
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


def test_crops_resample_as_pil_does():
    """Integer boxes, upscaled and shrunk, flipped or not: PIL's bicubic resized crop to within its uint8 rounding."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    from coft_fast.data.resident import resample_matrix

    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    picture = (picture.astype(float) * 0.3 + np.linspace(0, 170, 40)[None, :, None]).astype(np.uint8)  # texture + ramp
    tensor = torch.from_numpy(picture).permute(2, 0, 1).float()
    for top, left, height, width, size, flip in [(3, 5, 20, 27, 32, False), (0, 0, 40, 40, 16, True),
                                                  (7, 2, 31, 13, 24, False), (10, 10, 9, 9, 9, True)]:
        expected = TF.resized_crop(Image.fromarray(picture), top, left, height, width, [size, size],
                                   interpolation=TF.InterpolationMode.BICUBIC)
        if flip:
            expected = TF.hflip(expected)
        expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float()
        down = resample_matrix(torch.tensor([float(top)]), torch.tensor([float(height)]), 40, size)[0]
        across = resample_matrix(torch.tensor([float(left)]), torch.tensor([float(width)]), 40, size)[0]
        if flip:
            across = across.flip(0)
        ours = (down @ tensor @ across.T).clamp(0, 255)
        difference = (ours - expected).abs()
        assert difference.max() <= 1.5, (top, left, height, width, size, difference.max())
        assert difference.mean() <= 0.4, (top, left, height, width, size, difference.mean())


def test_small_images_are_kept_at_their_own_size(tmp_path):
    """32-pixel images for a 32-pixel model are stored as they are (no blurring upscale); large ones
    at the base size; never below the model's input size."""
    from PIL import Image

    from coft_fast.data.resident import base_size, stored_side

    small, large, tiny = [], [], []
    for index in range(5):
        for folder, side in ((small, 32), (large, 300), (tiny, 20)):
            path = tmp_path / f"{side}_{index}.png"
            Image.new("RGB", (side + index, side), (index, 0, 0)).save(path)
            folder.append(str(path))
    assert stored_side(small, 32) == 32
    assert stored_side(large, 32) == base_size(32) == 37
    assert stored_side(large, 224) == 256
    assert stored_side(tiny, 32) == 32
    assert stored_side(small + [str(tmp_path / "missing.png")], 28) == 32  # unreadable files are skipped
