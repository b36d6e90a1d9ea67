"""The phase-I loss at the logit level: the intended direction of L2, and the detach flags."""
import pytest
import torch

from coft_fast import ops


def _setup(seed=0, n=6, c=4, d=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    pos = torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    complement = (labels + torch.randint(1, c, (n,), generator=g)) % c
    return x, pos, neg, labels, complement


def test_l2_pushes_label_clean_and_complement_noisy():
    """d L2 / d (s+ - s-) is negative at the pseudo-label and positive at the complement label."""
    x, pos, neg, labels, complement = _setup()
    scale = 10.0
    # L2 as a function of the per-class margin m = s+ - s-: feed it through pos/neg such that
    # margin_k = scale * x.(pos_k - neg_k); differentiate with respect to a margin offset.
    offset = torch.zeros(x.shape[0], pos.shape[0], dtype=torch.float64, requires_grad=True)
    margins = scale * (x @ pos.T - x @ neg.T) + offset
    rows = torch.arange(x.shape[0])
    p_clean = torch.sigmoid(margins)
    l2 = -(torch.log(p_clean[rows, labels]) + torch.log(1 - p_clean[rows, complement])).mean()
    l2.backward()
    assert (offset.grad[rows, labels] < 0).all()
    assert (offset.grad[rows, complement] > 0).all()
    # and the op computes the same L2
    _, _, op_l2 = ops.dual_prompt_loss(x, pos, neg, labels, complement, scale, lam=1.0)
    torch.testing.assert_close(op_l2, l2.detach())


def test_gradient_descent_on_l2_raises_p_clean_of_label():
    x, pos, neg, labels, complement = _setup(seed=1)
    neg = neg.clone().requires_grad_(True)
    before = ops.clean_probability(x, pos, neg.detach(), labels, 10.0)
    before_c = ops.clean_probability(x, pos, neg.detach(), complement, 10.0)
    _, _, l2 = ops.dual_prompt_loss(x, pos, neg, labels, complement, 10.0)
    l2.backward()
    with torch.no_grad():
        stepped = neg - 0.05 * neg.grad
    assert ops.clean_probability(x, pos, stepped, labels, 10.0).mean() > before.mean()
    assert ops.clean_probability(x, pos, stepped, complement, 10.0).mean() < before_c.mean()


def test_detach_flags():
    x, pos, neg, labels, complement = _setup(seed=2)
    x = x.clone().requires_grad_(True)
    pos = pos.clone().requires_grad_(True)
    neg = neg.clone().requires_grad_(True)
    # detach_image_in_neg: with only L2 through the negative prompt, x gets no gradient from it
    _, l1, l2 = ops.dual_prompt_loss(x, pos.detach(), neg, labels, complement, 10.0,
                                     detach_image_in_neg=True, detach_pos_in_l2=True)
    l2.backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0
    # detach_pos_in_l2: pos gets gradient from L1 only
    pos.grad = None
    _, l1, l2 = ops.dual_prompt_loss(x.detach(), pos, neg, labels, complement, 10.0, detach_pos_in_l2=True)
    l2.backward()
    assert pos.grad is None or torch.count_nonzero(pos.grad) == 0
    _, l1, l2 = ops.dual_prompt_loss(x.detach(), pos, neg, labels, complement, 10.0, detach_pos_in_l2=False)
    l2.backward()
    assert torch.count_nonzero(pos.grad) > 0


def test_finite_guard_names_the_phase_step_and_batch_for_a_bad_gradient():
    from coft_fast.phases.guard import FiniteGuard, NonFiniteLossError

    weight = torch.nn.Parameter(torch.ones(3))
    guard = FiniteGuard("phase II s1")
    loss = (weight * 2).sum()
    loss.backward()
    guard.observe(loss, [weight], step=1, epoch=0, rows=torch.arange(4))  # healthy: no error
    weight.grad[1] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"phase II s1: non-finite loss or gradient at step 2 \(epoch 0\), batch rows \[0, 1, 2, 3\]"):
        guard.observe(loss, [weight], step=2, epoch=0, rows=torch.arange(4))
