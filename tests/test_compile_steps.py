"""torch.compile traces one phase-I and one phase-II training step whole (fullgraph=True, the aot_eager
backend: Dynamo + AOTAutograd on CPU) for each op backend, and matches eager: the ops are custom ops
(coft_fast::dual_prompt_loss, coft_fast::queue_info_nce) with fake kernels and registered backwards,
and nothing in the step reads a tensor on the host."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coft_fast import ops

BACKENDS = ["reference", "triton"]


def backend_or_skip(backend):
    if backend == "triton":
        from coft_fast.kernels import triton_installed, triton_runnable

        if not triton_installed() or not (torch.cuda.is_available() or triton_runnable(torch.device("cpu"))):
            pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def tiny_clip(tiny_testbed):
    from coft_fast.models import load_clip

    torch.manual_seed(0)
    return load_clip(f"local-dir:{tiny_testbed}", device="cpu")


def compare(eager_fn, params, *args):
    """Loss and gradients of ``eager_fn`` eagerly and compiled (fullgraph, aot_eager)."""
    results = []
    for fn in (eager_fn, torch.compile(eager_fn, fullgraph=True, backend="aot_eager")):
        for p in params:
            p.grad = None
        loss = fn(*args)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for eager, compiled in zip(eager_grads, compiled_grads):
        assert eager.abs().sum() > 0  # every parameter is reached, so the comparison means something
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_phase1_step_fullgraph(tiny_clip, backend):
    backend_or_skip(backend)
    torch._dynamo.reset()
    from coft_fast.config import Phase1Config
    from coft_fast.phases.phase1 import PromptTraining, make_prompt_model

    cfg = Phase1Config(n_ctx=4, vpt_tokens=2)
    names = [str(i) for i in range(10)]
    model = make_prompt_model(tiny_clip, names, cfg, seed=0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    size = tiny_clip.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(6, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (6,), generator=g)
    complements = (labels + torch.randint(1, 10, (6,), generator=g)) % 10
    scale = float(tiny_clip.model.logit_scale.detach().exp())

    visual = tiny_clip.model.visual

    def step(images, labels, complements):
        # PromptTraining's forward with the prompt hooks already in place: registering hooks (what
        # VisualPrompts.applied does on each call) is not traceable, running them is
        feats = F.normalize(visual(images).float(), dim=-1)
        pos, neg = model.text_features()
        loss, _, _ = ops.dual_prompt_loss(feats, pos, neg, labels, complements, scale, 1.0, backend=backend,
                                          check_label_range=False)
        return loss

    with model.visual_prompts.applied(visual):
        compare(step, model.parameters(), images, labels, complements)
    # the traced step is PromptTraining's forward: same loss eagerly
    feats, pos, neg = PromptTraining(model)(images)
    expect, _, _ = ops.dual_prompt_loss(feats, pos, neg, labels, complements, scale, 1.0, backend=backend)
    with model.visual_prompts.applied(visual):
        torch.testing.assert_close(step(images, labels, complements), expect)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_phase2_contrastive_step_fullgraph(tiny_clip, backend):
    backend_or_skip(backend)
    torch._dynamo.reset()
    from coft_fast.models.momentum import MomentumContrast
    from coft_fast.phases.phase2 import Phase2Training, build_classifier

    visual = tiny_clip.model.visual
    text = F.normalize(torch.randn(10, tiny_clip.model.text_projection.shape[1]), dim=-1)
    classifier = build_classifier(visual, text, 30.0, "zeroshot", seed=0)
    contrast = MomentumContrast(classifier.visual, text.shape[1], queue_size=300, momentum=0.99, seed=0)
    forward = Phase2Training(classifier, classifier.visual, contrast)
    g = torch.Generator().manual_seed(1)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    images = torch.randn(4, 3, size, size, generator=g)
    views = torch.randn(2, 5, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (4,), generator=g)
    keys = contrast.keys(views[1])
    params = [p for p in list(classifier.parameters()) if p.requires_grad]

    def step(images, query_view, keys, labels):
        logits, queries = forward(torch.cat([images, query_view]), len(images))
        ce = F.cross_entropy(logits, labels)
        return ce + 0.5 * contrast.loss(queries, keys, 0.07, backend)

    compare(step, params, images, views[0], keys, labels)
