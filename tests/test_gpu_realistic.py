"""GPU-only checks at the sizes CoFT+ really runs (skipped without CUDA; bench/gpu_check.sh runs them):
parity of the Triton ops against the fp64 reference at d = 512 / 768, C = 1000, K = 65536; offsets
past 2**31 elements (large strided views); a second GPU; and a phase-I and a phase-II step that make
no host synchronisation (torch.cuda.set_sync_debug_mode("error")) on a step that is neither a
logging nor a guard-check step (those read the GPU at most once per 10 steps, by design)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coft_fast import ops
from coft_fast.ops.dual_prompt import clean_probability_reference, dual_prompt_loss_reference
from coft_fast.ops.queue_loss import queue_info_nce_eager, queue_info_nce_reference
from test_ops_queue_loss import assert_close  # max-norm error against the fp64 reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

T = 0.07
SCALE = 100.0
# max-norm error relative to the largest fp64 magnitude; fp32 runs under the default policy (no TF32:
# tf32x3 dots, about fp32 accuracy)
GRAD_TOL = {torch.float32: 5e-5, torch.bfloat16: 2e-2}
LOSS_ATOL = {torch.float32: 5e-5, torch.bfloat16: 5e-3}


def queue_inputs(n, size, d, dtype, queue_dtype=None, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, device=device), dim=1)
    k = F.normalize(q + 0.6 * torch.randn(n, d, generator=g, device=device), dim=1)
    queue = F.normalize(torch.randn(size, d, generator=g, device=device), dim=1)
    queue[: size // 8] = F.normalize(q[torch.randint(0, n, (size // 8,), generator=g, device=device)]
                                     + 0.7 * queue[: size // 8], dim=1)
    return q.to(dtype), k.to(dtype), queue.to(queue_dtype or dtype)


def loss_and_grads(fn, q, k, queue):
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    loss = fn(q, k, queue)
    loss.backward()
    return loss, q.grad, k.grad


@pytest.mark.parametrize("d", [512, 768])
@pytest.mark.parametrize("dtype,queue_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
def test_queue_info_nce_at_coft_plus_sizes(d, dtype, queue_dtype):
    q, k, queue = queue_inputs(256, 65536, d, dtype, queue_dtype)
    got = loss_and_grads(lambda *a: ops.queue_info_nce(*a, T, backend="triton"), q, k, queue)
    want = loss_and_grads(lambda a, b, c: queue_info_nce_eager(a, b, c, T), q.double(), k.double(), queue.double())
    assert_close(got[0], want[0], 1e-6, "loss", LOSS_ATOL[dtype])
    assert_close(got[1], want[1], GRAD_TOL[dtype], "dq")
    assert_close(got[2], want[2], GRAD_TOL[dtype], "dk")


def dual_inputs(n, c, d, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    pos = F.normalize(torch.randn(c, d, generator=g, device=device), dim=1)
    neg = F.normalize(pos + 0.8 * torch.randn(c, d, generator=g, device=device), dim=1)
    labels = torch.randint(0, c, (n,), generator=g, device=device)
    x = F.normalize(pos[labels] + 1.5 * torch.randn(n, d, generator=g, device=device), dim=1)
    complements = (labels + torch.randint(1, c, (n,), generator=g, device=device)) % c
    return x.to(dtype), pos.to(dtype), neg.to(dtype), labels, complements


@pytest.mark.parametrize("d", [512, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_dual_prompt_loss_at_1000_classes(d, dtype, deterministic):
    x, pos, neg, y, yc = dual_inputs(256, 1000, d, dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        leaves = [t.detach().requires_grad_(True) for t in (x, pos, neg)]
        out = ops.dual_prompt_loss(*leaves, y, yc, SCALE, 0.7, backend="triton")
        (out[0] + 0.3 * out[1]).backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (x, pos, neg)]
    ref = dual_prompt_loss_reference(*ref_leaves, y, yc, SCALE, 0.7)
    (ref[0] + 0.3 * ref[1]).backward()
    for name, a, e in zip(("loss", "l1", "l2"), out, ref):
        assert_close(a, e, 2e-6, name, LOSS_ATOL[dtype])
    for name, a, e in zip(("image_feats", "pos_text", "neg_text"), leaves, ref_leaves):
        assert_close(a.grad, e.grad, GRAD_TOL[dtype], f"d {name}")


def test_offsets_past_two_to_the_31_elements():
    """Row offsets n * stride beyond 2**31 elements: a strided view of 70,000 rows 32,768 apart (bf16,
    4.6 GB), through clean_probability, the dual-prompt loss and the queue InfoNCE (queue rows far apart)."""
    n, d, stride, c = 70_000, 512, 32_768, 1000
    assert (n - 1) * stride >= 2 ** 31
    storage = torch.zeros(n, stride, device="cuda", dtype=torch.bfloat16)
    x_small, pos, neg, _, _ = dual_inputs(n, c, d, torch.bfloat16)
    x = storage[:, :d]
    x.copy_(x_small)
    del x_small
    labels = torch.randint(0, c, (n,), device="cuda")
    got = ops.clean_probability(x, pos, neg, labels, SCALE, backend="triton")
    want = clean_probability_reference(x, pos, neg, labels, SCALE)
    assert_close(got, want, 1e-3, "p_clean of rows past 2**31")
    tail = slice(n - 256, n)  # the last rows, whose offsets need int64
    comp = (labels[tail] + 1) % c
    out = ops.dual_prompt_loss(x[tail], pos, neg, labels[tail], comp, SCALE, backend="triton")
    ref = dual_prompt_loss_reference(x[tail].double(), pos.double(), neg.double(), labels[tail], comp, SCALE)
    assert_close(out[0], ref[0], 1e-5, "dual loss of the last rows", 5e-3)
    queue = storage[:, d:2 * d]  # K = 70,000 keys, row offsets past 2**31
    queue.copy_(F.normalize(torch.randn(n, d, device="cuda"), dim=1).to(torch.bfloat16))
    q, k, _ = queue_inputs(64, 16, d, torch.bfloat16)
    loss = ops.queue_info_nce(q, k, queue, T, backend="triton")
    expect = queue_info_nce_reference(q, k, queue, T)
    assert_close(loss, expect, 1e-5, "queue loss over a queue past 2**31", 5e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_tensors_device_not_the_current_one():
    torch.cuda.set_device(0)
    q, k, queue = queue_inputs(64, 4096, 512, torch.float32, device="cuda:1")
    got = loss_and_grads(lambda *a: ops.queue_info_nce(*a, T, backend="triton"), q, k, queue)
    want = loss_and_grads(lambda *a: queue_info_nce_reference(*a, T), q, k, queue)
    assert got[0].device == torch.device("cuda:1")
    for a, e, what in zip(got, want, ("loss", "dq", "dk")):
        assert_close(a, e, 1e-4, what, 1e-4)
    x, pos, neg, y, yc = dual_inputs(64, 100, 512, torch.float32, device="cuda:1")
    out = ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE, backend="triton")
    ref = dual_prompt_loss_reference(x, pos, neg, y, yc, SCALE)
    assert_close(out[0], ref[0], 1e-5, "dual loss on cuda:1", 1e-4)
    p = ops.clean_probability(x, pos, neg, y, SCALE, backend="triton")
    assert_close(p, clean_probability_reference(x, pos, neg, y, SCALE), 1e-4, "p_clean on cuda:1")


# --------------------------------------------------------------------------- host synchronisations

def _no_sync(step):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_phase1_and_phase2_steps_make_no_host_synchronisation(tiny_testbed):
    from coft_fast.config import Phase1Config
    from coft_fast.models import load_clip
    from coft_fast.models.momentum import MomentumContrast
    from coft_fast.phases.guard import FiniteGuard
    from coft_fast.phases.phase1 import PromptTraining, make_prompt_model
    from coft_fast.phases.phase2 import Phase2Training, build_classifier

    device = torch.device("cuda")
    clip = load_clip(f"local-dir:{tiny_testbed}", device=device)
    size = clip.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    names = [str(i) for i in range(10)]
    model = make_prompt_model(clip, names, Phase1Config(n_ctx=4, vpt_tokens=2), 0, device)
    forward = PromptTraining(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    guard = FiniteGuard("phase I")
    images = torch.randn(8, 3, size, size, device=device)
    labels = torch.randint(0, 10, (8,), device=device)
    complements = (labels + 1) % 10

    def phase1_step(step):
        feats, pos, neg = forward(images)
        loss, _, _ = ops.dual_prompt_loss(feats, pos, neg, labels, complements, SCALE, backend="auto",
                                          check_label_range=False)
        guard.step(loss, optimizer, scheduler, step, 0, torch.arange(8))

    phase1_step(1)  # the first step compiles and tunes the kernels, and allocates
    _no_sync(lambda: phase1_step(2))

    text = F.normalize(torch.randn(10, clip.model.text_projection.shape[1], device=device), dim=-1)
    classifier = build_classifier(clip.model.visual, text, 30.0, "zeroshot", 0)
    contrast = MomentumContrast(classifier.visual, text.shape[1], queue_size=4096, momentum=0.99)
    training = Phase2Training(classifier, classifier.visual, contrast)
    optimizer2 = torch.optim.SGD(list(classifier.parameters()), lr=0.01, momentum=0.9, fused=True)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda step: 1.0)
    guard2 = FiniteGuard("phase II")
    views = torch.randn(2, 8, 3, size, size, device=device)

    def phase2_step(step):
        logits, queries = training(torch.cat([images, views[0]]), len(images))
        contrast.update_(classifier.visual)
        keys = contrast.keys(views[1])
        loss = F.cross_entropy(logits, labels) + 0.5 * contrast.loss(queries, keys, T, "auto")
        guard2.step(loss, optimizer2, scheduler2, step, 0, torch.arange(8))
        contrast.push_(keys)

    phase2_step(1)
    _no_sync(lambda: phase2_step(2))
