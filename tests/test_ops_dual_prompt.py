"""coft_fast.ops.dual_prompt_loss / clean_probability: the plain-torch reference against an independent
fp64 formula, the Triton kernels (under TRITON_INTERPRET=1 without a GPU) against the fp64 reference
(forward and every gradient, odd shapes, fp32 / fp16 / bf16, the detach flags, a tensor logit scale),
the dispatch, and every argument error."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import coft_fast.ops as ops
from coft_fast.ops.dual_prompt import clean_probability_reference, dual_prompt_loss_reference

# max-norm error allowed, relative to the largest magnitude of the fp64 result (inputs are first
# rounded to the dtype, so these bound only the arithmetic): losses are fp32 in every case,
# gradients come back in the inputs' dtype.
LOSS_TOL = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
# plus an absolute term for the losses: l1 is a difference of logits of magnitude logit_scale = 100
LOSS_ATOL = 3e-5
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SCALE = 100.0


def kernels_or_skip():
    from coft_fast.kernels import triton_installed, triton_runnable

    if not triton_installed() or not (torch.cuda.is_available() or triton_runnable(torch.device("cpu"))):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def make_inputs(n, c, d, dtype, seed=0, dev=None):
    """Unit-norm features; text features correlated with the images so that the logits are CLIP-like."""
    g = torch.Generator().manual_seed(seed)
    pos = F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    neg = F.normalize(pos + 0.8 * torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    x = F.normalize(pos[labels] + 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    # complement: uniform over the other classes (the label itself when C = 1)
    complement = (labels + torch.randint(1, max(c, 2), (n,), generator=g)) % c
    dev = dev or device()
    return x.to(dev, dtype), pos.to(dev, dtype), neg.to(dev, dtype), labels.to(dev), complement.to(dev)


def assert_close(actual, expected, tol, what, atol=0.0):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = tol * max(expected.abs().max().item() if expected.numel() else 0.0, 1e-3) + atol
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def run(fn, x, pos, neg, labels, comp, scale, lam=1.0, detach=(False, False), weights=(1.0, 0.3, -0.2), **kw):
    """Forward, then backward of w0 * loss + w1 * l1 + w2 * l2 so that all three outputs carry a gradient."""
    x, pos, neg = (t.detach().requires_grad_(True) for t in (x, pos, neg))  # leaves that keep their strides
    out = fn(x, pos, neg, labels, comp, scale, lam, *detach, **kw)
    sum(w * o for w, o in zip(weights, out)).backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (x, pos, neg)]
    return list(out), grads


def fp64_reference(x, pos, neg, labels, comp, scale, lam=1.0, detach=(False, False), weights=(1.0, 0.3, -0.2)):
    return run(dual_prompt_loss_reference, x.double(), pos.double(), neg.double(), labels, comp, scale, lam,
               detach, weights)


def triton_loss(*args, splits=None):
    from coft_fast.ops.dual_prompt import dual_prompt_loss_triton

    return dual_prompt_loss_triton(*args, splits=splits)


# ------------------------------------------------------------------------------------ the reference

def test_reference_matches_full_logit_formula():
    """The reference (gathered negative columns, softplus form) against a direct transcription of the
    method: both full logit sets, a two-way softmax per class, the BCE with the complement label."""
    x, pos, neg, y, yc = make_inputs(9, 7, 16, torch.float64, dev=torch.device("cpu"))
    scale = 10.0  # small enough that the naive log(1 - p) below does not round to log(0)
    loss, l1, l2 = dual_prompt_loss_reference(x, pos, neg, y, yc, scale, lam=0.5)
    s_pos, s_neg = scale * x @ pos.T, scale * x @ neg.T
    rows = torch.arange(9)
    expect_l1 = -torch.log_softmax(s_pos, dim=1)[rows, y].mean()
    p_clean = torch.softmax(torch.stack([s_pos, s_neg]), dim=0)[0]  # exp(s+) / (exp(s+) + exp(s-))
    expect_l2 = -(torch.log(p_clean[rows, y]) + torch.log(1 - p_clean[rows, yc])).mean()
    torch.testing.assert_close(l1, expect_l1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l2, expect_l2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, expect_l1 + 0.5 * expect_l2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(clean_probability_reference(x, pos, neg, y, scale), p_clean[rows, y])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_l2_pushes_label_clean_and_complement_noisy(backend):
    """The BCE direction (not the paper's misprinted sign): a gradient step on L2 raises p_clean(y)
    and lowers p_clean(yc)."""
    if backend == "triton":
        kernels_or_skip()
    x, pos, neg, y, yc = make_inputs(16, 5, 16, torch.float32)
    pos, neg = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    _, _, l2 = ops.dual_prompt_loss(x, pos, neg, y, yc, 10.0, backend=backend)
    l2.backward()
    with torch.no_grad():
        before_y = ops.clean_probability(x, pos, neg, y, 10.0, backend=backend)
        before_c = ops.clean_probability(x, pos, neg, yc, 10.0, backend=backend)
        pos2, neg2 = pos - 0.05 * pos.grad, neg - 0.05 * neg.grad
        after_y = ops.clean_probability(x, pos2, neg2, y, 10.0, backend=backend)
        after_c = ops.clean_probability(x, pos2, neg2, yc, 10.0, backend=backend)
    assert after_y.mean() > before_y.mean()
    assert after_c.mean() < before_c.mean()


def test_reference_detach_semantics():
    """DEFT's flags: with both on, L2 trains only neg_text; with detach_pos_in_l2 alone, L2 gives pos_text
    no gradient; with detach_image_in_neg alone, L2's gradient to x comes only through the positive logits."""
    x, pos, neg, y, yc = make_inputs(8, 6, 16, torch.float64, dev=torch.device("cpu"))
    _, (gx, gp, gn) = run(dual_prompt_loss_reference, x, pos, neg, y, yc, SCALE, detach=(True, True),
                          weights=(0.0, 0.0, 1.0))
    assert gx.abs().max() == 0 and gp.abs().max() == 0 and gn.abs().max() > 0
    _, (_, gp, _) = run(dual_prompt_loss_reference, x, pos, neg, y, yc, SCALE, detach=(False, True),
                        weights=(0.0, 0.0, 1.0))
    assert gp.abs().max() == 0
    # detach_image_in_neg: x's L2 gradient equals the one with the negative text rows frozen at zero influence
    _, (gx_detached, _, _) = run(dual_prompt_loss_reference, x, pos, neg, y, yc, SCALE, detach=(True, False),
                                 weights=(0.0, 0.0, 1.0))
    xr = x.clone().requires_grad_()
    rows = torch.arange(8)
    s_pos = SCALE * xr @ pos.T
    m_y = s_pos[rows, y] - SCALE * (x * neg[y]).sum(-1)
    m_c = s_pos[rows, yc] - SCALE * (x * neg[yc]).sum(-1)
    (F.softplus(-m_y) + F.softplus(m_c)).mean().backward()
    torch.testing.assert_close(gx_detached, xr.grad)


def test_reference_computes_in_float32_under_autocast():
    x, pos, neg, y, yc = make_inputs(16, 9, 32, torch.float32, dev=torch.device("cpu"))
    expect = dual_prompt_loss_reference(x, pos, neg, y, yc, SCALE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE, backend="reference")
        p_clean = ops.clean_probability(x, pos, neg, y, SCALE, backend="reference")
    for a, e in zip(got, expect):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(p_clean, clean_probability_reference(x, pos, neg, y, SCALE))


# ------------------------------------------------------------------------------- Triton parity

SHAPES = [(1, 1, 16), (3, 2, 48), (70, 37, 64), (3, 37, 16), (70, 2, 48)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,c,d", SHAPES)
def test_triton_matches_fp64_reference(n, c, d, dtype):
    kernels_or_skip()
    inputs = make_inputs(n, c, d, dtype, seed=n * 100 + c)
    out, grads = run(triton_loss, *inputs, SCALE, lam=0.7)
    ref_out, ref_grads = fp64_reference(*inputs, SCALE, lam=0.7)
    for name, a, e in zip(("loss", "l1", "l2"), out, ref_out):
        assert a.shape == () and a.dtype == torch.float32
        assert_close(a, e, LOSS_TOL[dtype], name, LOSS_ATOL)
    for name, a, e, t in zip(("image_feats", "pos_text", "neg_text"), grads, ref_grads, inputs):
        assert a.dtype == dtype
        assert_close(a, e, GRAD_TOL[dtype], f"d {name}")


@pytest.mark.parametrize("detach_image_in_neg,detach_pos_in_l2", list(itertools.product([False, True], repeat=2)))
def test_triton_detach_flags(detach_image_in_neg, detach_pos_in_l2):
    kernels_or_skip()
    detach = (detach_image_in_neg, detach_pos_in_l2)
    inputs = make_inputs(70, 37, 48, torch.float32, seed=3)
    out, grads = run(triton_loss, *inputs, SCALE, lam=1.3, detach=detach)
    ref_out, ref_grads = fp64_reference(*inputs, SCALE, lam=1.3, detach=detach)
    for name, a, e in zip(("loss", "l1", "l2"), out, ref_out):
        assert_close(a, e, LOSS_TOL[torch.float32], name, LOSS_ATOL)
    for name, a, e in zip(("image_feats", "pos_text", "neg_text"), grads, ref_grads):
        assert_close(a, e, GRAD_TOL[torch.float32], f"d {name}")
    # and L2 alone (the part the flags change) against the reference
    _, grads = run(triton_loss, *inputs, SCALE, detach=detach, weights=(0.0, 0.0, 1.0))
    _, ref_grads = fp64_reference(*inputs, SCALE, detach=detach, weights=(0.0, 0.0, 1.0))
    for name, a, e in zip(("image_feats", "pos_text", "neg_text"), grads, ref_grads):
        assert_close(a, e, GRAD_TOL[torch.float32], f"L2 d {name}")


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_triton_column_slices_merge(splits):
    """The forward's split over classes (flash-decoding style merge), including slices that fall inside
    one column tile and more slices than tiles."""
    kernels_or_skip()
    inputs = make_inputs(33, 37, 16, torch.float32, seed=splits)
    out, grads = run(triton_loss, *inputs, SCALE, splits=splits)
    ref_out, ref_grads = fp64_reference(*inputs, SCALE)
    for name, a, e in zip(("loss", "l1", "l2"), out, ref_out):
        assert_close(a, e, LOSS_TOL[torch.float32], f"{name} (splits={splits})", LOSS_ATOL)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, GRAD_TOL[torch.float32], f"gradient (splits={splits})")


def test_triton_bfloat16():
    kernels_or_skip()
    inputs = make_inputs(70, 37, 64, torch.bfloat16, seed=7)
    out, grads = run(triton_loss, *inputs, SCALE, detach=(True, True))
    ref_out, ref_grads = fp64_reference(*inputs, SCALE, detach=(True, True))
    for name, a, e in zip(("loss", "l1", "l2"), out, ref_out):
        assert_close(a, e, LOSS_TOL[torch.bfloat16], name, LOSS_ATOL)
    for a, e in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        assert_close(a, e, GRAD_TOL[torch.bfloat16], "gradient")


def test_triton_tensor_logit_scale_gets_its_gradient():
    kernels_or_skip()
    x, pos, neg, y, yc = make_inputs(70, 37, 48, torch.float32, seed=11)
    for detach in [(False, False), (True, True)]:
        scale = torch.tensor(SCALE, device=x.device, requires_grad=True)
        scale64 = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        out, _ = run(triton_loss, x, pos, neg, y, yc, scale, lam=0.5, detach=detach)
        ref_out, _ = fp64_reference(x, pos, neg, y, yc, scale64, lam=0.5, detach=detach)
        for a, e in zip(out, ref_out):
            assert_close(a, e, LOSS_TOL[torch.float32], "loss with a tensor scale", LOSS_ATOL)
        assert_close(scale.grad, scale64.grad, 1e-4, f"d logit_scale {detach}")
    # a float and a 0-dim tensor give the same loss through the public op
    a = ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE, backend="triton")
    b = ops.dual_prompt_loss(x, pos, neg, y, yc, torch.tensor([SCALE]), backend="triton")
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_triton_non_contiguous_inputs():
    kernels_or_skip()
    x, pos, neg, y, yc = make_inputs(20, 9, 32, torch.float32, seed=5)
    wide = torch.cat([x, torch.randn_like(x)], dim=1)[:, :32]  # row stride 64
    pos_t = pos.T.contiguous().T  # column-major
    out, grads = run(triton_loss, wide, pos_t, neg, y, yc, SCALE)
    ref_out, ref_grads = fp64_reference(x, pos, neg, y, yc, SCALE)
    for a, e in zip(out + grads, ref_out + ref_grads):
        assert_close(a, e, GRAD_TOL[torch.float32], "non-contiguous")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c,d", [(1, 1, 16), (3, 2, 48), (70, 37, 64)])
def test_clean_probability_matches_reference(n, c, d, dtype):
    kernels_or_skip()
    x, pos, neg, y, _ = make_inputs(n, c, d, dtype, seed=d)
    x.requires_grad_(True)
    got = ops.clean_probability(x, pos, neg, y, SCALE, backend="triton")
    expect = clean_probability_reference(x.detach().double(), pos.double(), neg.double(), y, SCALE)
    assert got.shape == (n,) and got.dtype == torch.float32 and not got.requires_grad
    assert ((got >= 0) & (got <= 1)).all()
    assert_close(got, expect, 1e-5, "p_clean")
    ref = ops.clean_probability(x, pos, neg, y, SCALE, backend="reference")
    assert ref.dtype == torch.float32 and not ref.requires_grad


# ---------------------------------------------------------------------------------------- dispatch

def test_auto_uses_reference_on_cpu(monkeypatch):
    import coft_fast.kernels.dual_prompt as kernel_module

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors under backend='auto'")

    monkeypatch.setattr(kernel_module, "dual_forward_triton", boom)
    monkeypatch.setattr(kernel_module, "clean_probability_triton", boom)
    x, pos, neg, y, yc = make_inputs(5, 3, 16, torch.float32, dev=torch.device("cpu"))
    got = ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE)
    expect = dual_prompt_loss_reference(x, pos, neg, y, yc, SCALE)
    for a, e in zip(got, expect):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    torch.testing.assert_close(ops.clean_probability(x, pos, neg, y, SCALE),
                               clean_probability_reference(x, pos, neg, y, SCALE), rtol=0, atol=0)


def test_float64_stays_on_reference_and_triton_refuses_it():
    kernels_or_skip()
    x, pos, neg, y, yc = make_inputs(5, 3, 16, torch.float64)
    loss, _, _ = ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE)  # auto: reference, fp64 result
    assert loss.dtype == torch.float64
    with pytest.raises(TypeError, match="image_feats"):
        ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE, backend="triton")


def test_triton_backend_without_gpu_or_interpreter_is_an_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, pos, neg, y, yc = make_inputs(5, 3, 16, torch.float32, dev=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.clean_probability(x, pos, neg, y, SCALE, backend="triton")


# ------------------------------------------------------------------------------------------ errors

def _good():
    return make_inputs(4, 3, 16, torch.float32, dev=torch.device("cpu"))


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


ERROR_CASES = {
    "image_feats not 2-D": (lambda x, p, n, y, c: (x[0], p, n, y, c), ValueError, "image_feats"),
    "image_feats not a tensor": (lambda x, p, n, y, c: (x.tolist(), p, n, y, c), TypeError, "image_feats"),
    "image_feats integer": (lambda x, p, n, y, c: (x.long(), p, n, y, c), TypeError, "image_feats"),
    "pos_text columns": (lambda x, p, n, y, c: (x, p[:, :8], n, y, c), ValueError, "pos_text"),
    "neg_text columns": (lambda x, p, n, y, c: (x, p, n[:, :8], y, c), ValueError, "neg_text"),
    "neg_text rows": (lambda x, p, n, y, c: (x, p, n[:2], y, c), ValueError, "neg_text"),
    "pos_text dtype": (lambda x, p, n, y, c: (x, p.half(), n, y, c), TypeError, "pos_text"),
    "neg_text dtype": (lambda x, p, n, y, c: (x, p, n.double(), y, c), TypeError, "neg_text"),
    "neg_text device": (lambda x, p, n, y, c: (x, p, _meta(n), y, c), ValueError, "neg_text"),
    "labels device": (lambda x, p, n, y, c: (x, p, n, _meta(y), c), ValueError, "labels"),
    "complement device": (lambda x, p, n, y, c: (x, p, n, y, _meta(c)), ValueError, "complement_labels"),
    "labels dtype": (lambda x, p, n, y, c: (x, p, n, y.int(), c), TypeError, "labels"),
    "labels shape": (lambda x, p, n, y, c: (x, p, n, y[:3], c), ValueError, "labels"),
    "labels too large": (lambda x, p, n, y, c: (x, p, n, torch.full_like(y, 3), c), ValueError, "labels"),
    "labels negative": (lambda x, p, n, y, c: (x, p, n, torch.full_like(y, -1), c), ValueError, "labels"),
    "complement too large": (lambda x, p, n, y, c: (x, p, n, y, torch.full_like(c, 5)), ValueError, "complement_labels"),
    "complement shape": (lambda x, p, n, y, c: (x, p, n, y, c[None]), ValueError, "complement_labels"),
    "N = 0": (lambda x, p, n, y, c: (x[:0], p, n, y[:0], c[:0]), ValueError, "image_feats"),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_argument(case, backend):
    change, error, name = ERROR_CASES[case]
    args = change(*_good())
    with pytest.raises(error, match=rf"\b{name}\b"):
        ops.dual_prompt_loss(*args, SCALE, backend=backend)
    if case.startswith("complement"):
        return
    with pytest.raises(error, match=rf"\b{name}\b"):
        ops.clean_probability(*args[:4], SCALE, backend=backend)


@pytest.mark.parametrize("scale,error", [(torch.ones(2), ValueError), ("100", TypeError), (None, TypeError)])
def test_bad_logit_scale(scale, error):
    x, p, n, y, c = _good()
    with pytest.raises(error, match="logit_scale"):
        ops.dual_prompt_loss(x, p, n, y, c, scale)
    with pytest.raises(error, match="logit_scale"):
        ops.clean_probability(x, p, n, y, scale)


def test_bad_backend():
    x, p, n, y, c = _good()
    with pytest.raises(ValueError, match="backend"):
        ops.dual_prompt_loss(x, p, n, y, c, SCALE, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ops.clean_probability(x, p, n, y, SCALE, backend="fast")


# ------------------------------------------------------------------------------------ the eager baseline
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n,c,d", SHAPES)
@pytest.mark.parametrize("detach", list(itertools.product([False, True], repeat=2)))
def test_eager_formulation_matches_the_reference(n, c, d, dtype, detach):
    """The unfused N x C formulation (e2e_speed's naive path) is the same loss and the same gradients."""
    from coft_fast import ops

    x, pos, neg, labels, comp = make_inputs(n, c, d, dtype, dev=torch.device("cpu"))
    eager = run(lambda *a: ops.dual_prompt_loss(*a, backend="eager"), x, pos, neg, labels, comp, SCALE, 0.7, detach)
    expected = fp64_reference(x, pos, neg, labels, comp, SCALE, 0.7, detach)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5}[dtype]
    for name, got, want in zip(("loss", "l1", "l2"), eager[0], expected[0]):
        assert_close(got, want, tol, name, atol=1e-5 if dtype != torch.float64 else 0.0)
    grad_tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for name, got, want in zip(("x", "pos", "neg"), eager[1], expected[1]):
        assert_close(got, want, grad_tol, f"grad {name}", atol=1e-6)


# ------------------------------------------------------------------------- GPU readiness (issue 20)

@pytest.mark.parametrize("detach", [(False, False), (True, True)])
def test_triton_deterministic_mode_gathers_rows_with_a_gemm(detach):
    """Under torch.use_deterministic_algorithms(True) the gathered negative rows' gradient comes from one
    GEMM over a one-hot coefficient matrix (no atomic adds) and the kernels use one fixed config; the
    gradients (the logit scale's included) still match the fp64 reference, and repeat bitwise."""
    kernels_or_skip()
    x, pos, neg, y, yc = make_inputs(70, 37, 48, torch.float32, seed=13)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            scale = torch.tensor(SCALE, device=x.device, requires_grad=True)
            out, grads = run(triton_loss, x, pos, neg, y, yc, scale, lam=0.7, detach=detach)
            results.append((out, grads, scale.grad))
    finally:
        torch.use_deterministic_algorithms(previous)
    scale64 = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    ref_out, ref_grads = fp64_reference(x, pos, neg, y, yc, scale64, lam=0.7, detach=detach)
    out, grads, scale_grad = results[0]
    for name, a, e in zip(("image_feats", "pos_text", "neg_text"), grads, ref_grads):
        assert_close(a, e, GRAD_TOL[torch.float32], f"d {name}")
    assert_close(scale_grad, scale64.grad, 1e-4, "d logit_scale")
    for a, b in zip(results[0][1] + [results[0][2]], results[1][1] + [results[1][2]]):
        assert torch.equal(a, b)


def test_labels_checked_by_the_public_op_unless_told_otherwise():
    x, pos, neg, y, yc = make_inputs(5, 3, 16, torch.float32, dev=torch.device("cpu"))
    bad = y.clone()
    bad[0] = 3
    with pytest.raises(ValueError, match="labels"):
        ops.dual_prompt_loss(x, pos, neg, bad, yc, SCALE, backend="reference")
    # a caller that validated the labels once (phase I, per S*) skips the per-step host read
    ops.dual_prompt_loss(x, pos, neg, y, yc, SCALE, backend="reference", check_label_range=False)
