import pytest
import torch

from coft_fast.models import load_clip
from coft_fast.models.prompts import DualPromptLearner, encode_text_prefix
from coft_fast.models.visual_prompts import VisualPrompts
from coft_fast.pseudo.templates import TemplateError


@pytest.fixture(scope="module")
def clip(tiny_testbed):
    return load_clip(f"local-dir:{tiny_testbed}")


def test_cut_sequence_equals_uncut(clip):
    names = ["one", "sea lion", "a rather long class name"]
    learner = DualPromptLearner(clip.model, clip.tokenizer, names, n_ctx=16, generator=torch.Generator().manual_seed(0))
    assert learner.cut < clip.context_length
    pos, neg = learner()
    padding = clip.model.token_embedding(torch.zeros(2 * len(names), clip.context_length - learner.cut, dtype=torch.long))
    full = torch.cat([learner.prompt_embeddings(), padding], dim=1)
    uncut = encode_text_prefix(clip.model, full, learner.eot_index.repeat(2))
    torch.testing.assert_close(torch.cat([pos, neg]), uncut, atol=1e-5, rtol=1e-5)
    assert pos.shape == neg.shape == (3, clip.model.text_projection.shape[1])


def test_separate_full_length_calls_give_the_joint_cut_features(clip):
    """The naive baseline (two calls over the whole context) computes the same prompts' features."""
    names = ["one", "sea lion", "a rather long class name"]
    joint = DualPromptLearner(clip.model, clip.tokenizer, names, n_ctx=8, generator=torch.Generator().manual_seed(0))
    separate = DualPromptLearner(clip.model, clip.tokenizer, names, n_ctx=8, generator=torch.Generator().manual_seed(0),
                                 joint=False)
    assert separate.cut == clip.context_length and torch.equal(joint.ctx_pos, separate.ctx_pos)
    for a, b in zip(joint(), separate()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_context_vectors_and_gradients(clip):
    learner = DualPromptLearner(clip.model, clip.tokenizer, ["one", "two"], n_ctx=4, init_std=0.02,
                                generator=torch.Generator().manual_seed(0))
    assert sorted(n for n, _ in learner.named_parameters()) == ["ctx_neg", "ctx_pos"]
    assert 0.005 < learner.ctx_pos.std() < 0.05
    pos, neg = learner()
    (pos.sum() + 2 * neg.sum()).backward()
    assert learner.ctx_pos.grad.abs().sum() > 0 and learner.ctx_neg.grad.abs().sum() > 0
    # the class token comes last: the placeholder count does not change the class-name suffix
    assert learner.token_suffix.shape[1] == learner.cut - 1 - 4


def test_prompt_that_does_not_fit_names_the_class(clip):
    long_name = " ".join(["enormous"] * 20)
    with pytest.raises(TemplateError, match="class 'enormous enormous"):
        DualPromptLearner(clip.model, clip.tokenizer, ["one", long_name], n_ctx=16)


def test_class_names_with_unusual_characters_make_prompts(clip):
    from coft_fast.pseudo import class_prompts
    from coft_fast.scoring import class_text_embeddings

    names = ["Crème brûlée", "AT&T logo (old)", "C++ book", "naïve \"quoted\" name", "日本の犬", "x/y 50%"]
    learner = DualPromptLearner(clip.model, clip.tokenizer, names, n_ctx=8, generator=torch.Generator().manual_seed(0))
    pos, neg = learner()
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all() and pos.shape[0] == len(names)
    text = class_text_embeddings(clip, class_prompts("ensemble", names), names, torch.device("cpu"))
    assert text.shape[0] == len(names) and torch.isfinite(text).all()


def test_zero_visual_prompts_is_the_plain_tower(clip):
    images = torch.randn(3, 3, clip.image_size, clip.image_size)
    prompts = VisualPrompts(clip.model.visual, num_tokens=0)
    with torch.no_grad():
        plain = clip.model.visual(images)
        with prompts.applied(clip.model.visual):
            prompted = clip.model.visual(images)
    assert torch.equal(plain, prompted)


def test_visual_prompts_change_output_and_pool_the_class_token(clip):
    visual = clip.model.visual
    images = torch.randn(2, 3, clip.image_size, clip.image_size)
    prompts = VisualPrompts(visual, num_tokens=5, generator=torch.Generator().manual_seed(0))
    patches = (clip.image_size // visual.conv1.kernel_size[0]) ** 2
    seen = {}
    with torch.no_grad():
        plain = visual(images)
        hooks = [
            visual.transformer.resblocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("block1", a[0].shape)),
            visual.ln_post.register_forward_pre_hook(lambda m, a: seen.__setitem__("ln_post", a[0].shape)),
        ]
        with prompts.applied(visual):
            prompted = visual(images)
        for hook in hooks:
            hook.remove()
        after = visual(images)
    assert not torch.allclose(plain, prompted)
    assert torch.equal(plain, after)  # hooks are gone once the block ends
    assert seen["block1"][1] == 1 + patches + 5  # prompts replaced, sequence length constant
    assert seen["ln_post"][1] == 1 + patches  # prompts dropped before pooling
    bound = (6.0 / (3 * visual.conv1.kernel_size[0] ** 2 + visual.conv1.out_channels)) ** 0.5
    assert prompts.tokens.abs().max() <= bound


def test_each_block_gets_its_own_prompts(clip):
    visual = clip.model.visual
    images = torch.randn(2, 3, clip.image_size, clip.image_size)
    prompts = VisualPrompts(visual, num_tokens=3, generator=torch.Generator().manual_seed(0))
    with prompts.applied(visual):
        visual(images).sum().backward()
    assert prompts.tokens.grad is not None
    assert all(prompts.tokens.grad[i].abs().sum() > 0 for i in range(len(visual.transformer.resblocks)))
