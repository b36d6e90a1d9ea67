"""Training augmentation: DeFT's Resize -> RandomCrop -> flip (the default) and random resized crops."""
import torch
import torchvision.transforms as T

from coft_fast.data.dali import torchvision_transform
from coft_fast.data.resident import ResidentImages, base_size


def _resident(images: torch.Tensor, image_size: int) -> ResidentImages:
    store = ResidentImages.__new__(ResidentImages)  # stored images given directly, no decoding
    store.images, store.image_size, store.base_size = images, image_size, images.shape[-1]
    store.mean = torch.zeros(1, 3, 1, 1)
    store.std = torch.full((1, 3, 1, 1), 1 / 255.0)  # normalised values equal the pixel values
    store.positions = torch.arange(len(images))
    return store


def _window(image, x, y, s, flip):
    window = image[:, y:y + s, x:x + s]
    return window.flip(-1) if flip else window


def test_deft_crops_are_exact_windows_of_the_stored_images_with_flips():
    s = 16
    b = base_size(s)  # 18: Resize(256) -> RandomCrop(224) at 16 px
    images = torch.randint(0, 256, (64, 3, b, b), dtype=torch.uint8)
    store = _resident(images, s)
    crops = store.train_batch(torch.arange(64), torch.Generator().manual_seed(0), augment="deft")
    assert crops.shape == (64, 3, s, s)
    offsets, flips = set(), 0
    for image, crop in zip(images.float(), crops):
        found = [(x, y, f) for x in range(b - s + 1) for y in range(b - s + 1) for f in (False, True)
                 if torch.allclose(_window(image, x, y, s, f), crop, atol=1e-3)]
        assert found, "a DeFT crop must be a whole-pixel window of the stored image (flipped or not)"
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) > 4 and 10 < flips < 54  # random positions, about half flipped


def test_deft_crop_keeps_the_224_of_256_share_when_images_are_stored_smaller():
    s = 32
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)  # 32-px images: stored at 32, not 37
    crops = _resident(images, s).train_batch(torch.arange(8), torch.Generator().manual_seed(1), augment="deft")
    assert crops.shape == (8, 3, 32, 32)
    # a window of 32 * 32 / 37 (about 27.7) pixels upsampled: not a copy of the whole image
    assert not any(torch.allclose(crop, image.float(), atol=1) or torch.allclose(crop, image.float().flip(-1), atol=1)
                   for crop, image in zip(crops, images))


def test_random_resized_crop_draws_as_before():
    """The testbed recipe's augmentation consumes the generator as it did before issue 19."""
    images = torch.randint(0, 256, (4, 3, 18, 18), dtype=torch.uint8)
    store = _resident(images, 16)
    a = store.train_batch(torch.arange(4), torch.Generator().manual_seed(3), 0.5)
    b = store.train_batch(torch.arange(4), torch.Generator().manual_seed(3), 0.5, augment="random_resized_crop")
    assert torch.equal(a, b)


def test_the_torchvision_pipeline_of_deft_is_resize_random_crop_flip():
    transform = torchvision_transform(224, (0, 0, 0), (1, 1, 1), train=True, augment="deft")
    kinds = [type(step) for step in transform.transforms]
    assert kinds[:3] == [T.Resize, T.RandomCrop, T.RandomHorizontalFlip]
    assert transform.transforms[0].size == 256 == base_size(224) and transform.transforms[1].size == (224, 224)
    assert type(torchvision_transform(224, (0,) * 3, (1,) * 3, train=True).transforms[0]) is T.RandomResizedCrop
