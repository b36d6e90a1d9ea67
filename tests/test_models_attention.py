"""The batch-major attention switch computes what open_clip's attention computes."""
import copy

import pytest
import torch

from coft_fast.models import load_clip
from coft_fast.models.attention import BatchMajorAttention, Float32Attention, use_batch_major_attention


@pytest.fixture(scope="module")
def clip(tiny_testbed):
    return load_clip(f"local-dir:{tiny_testbed}")


def _outputs(model, images, tokens):
    images = images.clone().requires_grad_(True)
    image = model.encode_image(images)
    text = model.encode_text(tokens)  # the causal mask goes through the switched attention too
    (image.square().sum() + text.square().sum()).backward()
    return image.detach(), text.detach(), images.grad


@pytest.mark.parametrize("float32", [False, True])
def test_switched_attention_matches_open_clips(clip, float32):
    torch.manual_seed(0)
    images = torch.randn(3, 3, clip.image_size, clip.image_size)
    tokens = clip.tokenizer(["a photo of a seven.", "zero", "a blurry photo of a two."])
    switched = copy.deepcopy(clip.model)
    count = use_batch_major_attention(switched, float32=float32)
    kind = Float32Attention if float32 else BatchMajorAttention
    assert count > 0 and sum(isinstance(m, kind) for m in switched.modules()) == count
    assert switched.state_dict().keys() == clip.model.state_dict().keys()
    for got, want in zip(_outputs(switched, images, tokens), _outputs(clip.model, images, tokens)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float32_attention_under_bf16_autocast_stays_close(clip):
    torch.manual_seed(0)
    images = torch.randn(4, 3, clip.image_size, clip.image_size)
    switched = copy.deepcopy(clip.model)
    use_batch_major_attention(switched, float32=True)
    with torch.no_grad():
        reference = clip.model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = switched.encode_image(images).float()
    cosine = torch.nn.functional.cosine_similarity(mixed, reference, dim=-1)
    assert (cosine > 0.99).all(), cosine
