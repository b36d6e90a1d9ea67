"""The dual-prompt head of CoFT phase I: positive/negative logits, the L1 + lambda * L2 loss, and p_clean.

Inputs are already L2-normalised; ``logit_scale`` is the multiplier exp(model.logit_scale).
s+ = logit_scale * x @ pos_text.T, s- = logit_scale * x @ neg_text.T,
p_clean(k) = sigmoid(s+_k - s-_k), L1 = CE(s+, y), L2 = -[log p_clean(y) + log(1 - p_clean(yc))].

Only the label and complement columns of s- enter L2, so both paths read two rows of neg_text per
sample instead of forming the N x C negative logits. Paths: ``dual_prompt_loss_reference`` (plain torch,
the CPU path and ground truth) and ``coft_fast.kernels.dual_prompt`` (Triton: one pass over pos_text
with an online log-sum-exp, no N x C tensor in the forward; see that module), chosen by ``backend``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from coft_fast.ops._checks import (
    check_backend,
    check_labels,
    check_matrix,
    check_nonempty,
    check_same_device,
    check_same_dtype,
    no_autocast,
    scale_value,
    use_triton,
)


def _check_head(image_feats, pos_text, neg_text, labels, logit_scale, backend, complement_labels=None):
    check_backend(backend)
    check_matrix("image_feats", image_feats)
    check_matrix("pos_text", pos_text, columns=image_feats.shape[1])
    check_matrix("neg_text", neg_text, columns=image_feats.shape[1])
    if pos_text.shape != neg_text.shape:
        raise ValueError(f"pos_text and neg_text must have the same shape, got {tuple(pos_text.shape)} and {tuple(neg_text.shape)}")
    check_same_dtype(image_feats=image_feats, pos_text=pos_text, neg_text=neg_text)
    check_same_device(image_feats=image_feats, pos_text=pos_text, neg_text=neg_text, labels=labels,
                      complement_labels=complement_labels)
    check_nonempty("image_feats", image_feats)
    check_labels("labels", labels, image_feats.shape[0], pos_text.shape[0])
    if complement_labels is not None:
        check_labels("complement_labels", complement_labels, image_feats.shape[0], pos_text.shape[0])
    return scale_value(logit_scale)


def _on_device(scale, like: torch.Tensor):
    """A tensor logit scale travels to the features' device (kernels read it there, no sync)."""
    return scale.to(like.device) if isinstance(scale, torch.Tensor) else scale


def dual_prompt_loss_reference(
    image_feats, pos_text, neg_text, labels, complement_labels, logit_scale, lam=1.0,
    detach_image_in_neg=False, detach_pos_in_l2=False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch ground truth (computed in float32 or wider, also under autocast)."""
    compute = torch.promote_types(image_feats.dtype, torch.float32)
    with no_autocast(image_feats):
        x, pos, neg = image_feats.to(compute), pos_text.to(compute), neg_text.to(compute)
        positive = logit_scale * (x @ pos.T)  # (N, C)
        l1 = F.cross_entropy(positive, labels)
        x_neg = x.detach() if detach_image_in_neg else x
        positive_l2 = positive.detach() if detach_pos_in_l2 else positive
        # only the label and complement columns of the negative logits enter L2
        rows = torch.arange(x.shape[0], device=x.device)
        margin_y = positive_l2[rows, labels] - logit_scale * (x_neg * neg[labels]).sum(-1)
        margin_c = positive_l2[rows, complement_labels] - logit_scale * (x_neg * neg[complement_labels]).sum(-1)
        # -log sigmoid(m) = softplus(-m);  -log(1 - sigmoid(m)) = softplus(m)
        l2 = (F.softplus(-margin_y) + F.softplus(margin_c)).mean()
        return l1 + lam * l2, l1, l2


def dual_prompt_loss_eager(
    image_feats, pos_text, neg_text, labels, complement_labels, logit_scale, lam=1.0,
    detach_image_in_neg=False, detach_pos_in_l2=False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DEFT's formulation: both N x C logit matrices and a two-way log-softmax per class (the
    research code's unfused path; the baseline of bench/e2e_speed.py)."""
    compute = torch.promote_types(image_feats.dtype, torch.float32)
    with no_autocast(image_feats):
        x, pos, neg = image_feats.to(compute), pos_text.to(compute), neg_text.to(compute)
        positive = logit_scale * x @ pos.T
        negative = logit_scale * (x.detach() if detach_image_in_neg else x) @ neg.T
        l1 = F.cross_entropy(positive, labels)
        pair = torch.stack([positive.detach() if detach_pos_in_l2 else positive, negative], dim=-1).log_softmax(-1)
        rows = torch.arange(x.shape[0], device=x.device)
        l2 = -(pair[rows, labels, 0] + pair[rows, complement_labels, 1]).mean()
        return l1 + lam * l2, l1, l2


def dual_prompt_loss(
    image_feats: torch.Tensor,
    pos_text: torch.Tensor,
    neg_text: torch.Tensor,
    labels: torch.Tensor,
    complement_labels: torch.Tensor,
    logit_scale,
    lam: float = 1.0,
    detach_image_in_neg: bool = False,
    detach_pos_in_l2: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, l1, l2), each 0-dim: loss = l1 + lam * l2 (see the module docstring).

    ``detach_image_in_neg`` stops gradients to image_feats through the negative logits;
    ``detach_pos_in_l2`` treats the positive logits inside l2 as constants (DEFT: both on).
    ``backend``: "auto" (Triton on CUDA tensors, reference elsewhere), "triton", "reference" or
    "eager" (the unfused N x C formulation).
    """
    scale = _check_head(image_feats, pos_text, neg_text, labels, logit_scale, backend, complement_labels)
    if backend == "eager":
        return dual_prompt_loss_eager(image_feats, pos_text, neg_text, labels, complement_labels, scale, lam,
                                      detach_image_in_neg, detach_pos_in_l2)
    if use_triton(backend, image_feats, image_feats.dtype):
        from coft_fast.kernels.dual_prompt import dual_prompt_loss_triton

        return dual_prompt_loss_triton(image_feats, pos_text, neg_text, labels, complement_labels,
                                       _on_device(scale, image_feats), lam,
                                       detach_image_in_neg, detach_pos_in_l2)
    return dual_prompt_loss_reference(image_feats, pos_text, neg_text, labels, complement_labels, scale, lam,
                                      detach_image_in_neg, detach_pos_in_l2)


def clean_probability_reference(image_feats, pos_text, neg_text, labels, logit_scale) -> torch.Tensor:
    compute = torch.promote_types(image_feats.dtype, torch.float32)
    with no_autocast(image_feats):
        x = image_feats.to(compute)
        margin = (x * (pos_text.to(compute)[labels] - neg_text.to(compute)[labels])).sum(-1)
        return torch.sigmoid(logit_scale * margin)


@torch.no_grad()
def clean_probability(image_feats, pos_text, neg_text, labels, logit_scale, backend: str = "auto") -> torch.Tensor:
    """(N,) p_clean(label) = sigmoid(s+_label - s-_label), float32 (float64 for float64 inputs), no gradient."""
    scale = _check_head(image_feats, pos_text, neg_text, labels, logit_scale, backend)
    if use_triton(backend, image_feats, image_feats.dtype):
        from coft_fast.kernels.dual_prompt import clean_probability_triton

        return clean_probability_triton(image_feats, pos_text, neg_text, labels, _on_device(scale, image_feats))
    return clean_probability_reference(image_feats, pos_text, neg_text, labels, scale)
