"""The dual-prompt head of CoFT phase I on L2-normalised inputs (``logit_scale``: exp(model.logit_scale)):
s+ = logit_scale * x @ pos_text.T, s- = logit_scale * x @ neg_text.T, p_clean(k) = sigmoid(s+_k - s-_k),
L1 = CE(s+, y), L2 = -[log p_clean(y) + log(1 - p_clean(yc))]. Only the label and complement columns of
s- enter L2, so neither the reference (plain torch) nor the Triton path forms the N x C negative logits.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from coft_fast.ops._checks import (check_labels, check_op_inputs, check_same_device, check_same_dtype, no_autocast,
                                   scale_value, use_triton)


def _check_head(image_feats, pos_text, neg_text, labels, logit_scale, backend, complement_labels=None,
                check_label_range=True):
    check_op_inputs(backend, image_feats=image_feats, pos_text=pos_text, neg_text=neg_text)
    if pos_text.shape != neg_text.shape:
        raise ValueError(f"pos_text and neg_text must have the same shape, got {tuple(pos_text.shape)} and {tuple(neg_text.shape)}")
    check_same_dtype(image_feats=image_feats, pos_text=pos_text, neg_text=neg_text)
    check_same_device(image_feats=image_feats, pos_text=pos_text, neg_text=neg_text, labels=labels,
                      complement_labels=complement_labels)
    rows, classes = image_feats.shape[0], pos_text.shape[0]
    check_labels("labels", labels, rows, classes, check_label_range)
    if complement_labels is not None:
        check_labels("complement_labels", complement_labels, rows, classes, check_label_range)
    return scale_value(logit_scale)


def dual_prompt_loss_reference(image_feats, pos_text, neg_text, labels, complement_labels, logit_scale, lam=1.0,
                               detach_image_in_neg=False, detach_pos_in_l2=False,
                               unfused=False) -> Tuple[torch.Tensor, ...]:
    """Plain-torch ground truth (in float32 or wider, also under autocast). ``unfused``: DEFT's formulation
    (both N x C logit matrices, a two-way log-softmax per class), the "eager" baseline."""
    compute = torch.promote_types(image_feats.dtype, torch.float32)
    with no_autocast(image_feats):
        x, pos, neg = image_feats.to(compute), pos_text.to(compute), neg_text.to(compute)
        x_neg = x.detach() if detach_image_in_neg else x
        rows = torch.arange(x.shape[0], device=x.device)
        positive = logit_scale * x @ pos.T if unfused else logit_scale * (x @ pos.T)
        positive_l2 = positive.detach() if detach_pos_in_l2 else positive
        if unfused:
            pair = torch.stack([positive_l2, logit_scale * x_neg @ neg.T], dim=-1).log_softmax(-1)
            l2 = -(pair[rows, labels, 0] + pair[rows, complement_labels, 1]).mean()
        else:  # -log sigmoid(m) = softplus(-m);  -log(1 - sigmoid(m)) = softplus(m)
            margin_y = positive_l2[rows, labels] - logit_scale * (x_neg * neg[labels]).sum(-1)
            margin_c = positive_l2[rows, complement_labels] - logit_scale * (x_neg * neg[complement_labels]).sum(-1)
            l2 = (F.softplus(-margin_y) + F.softplus(margin_c)).mean()
        l1 = F.cross_entropy(positive, labels)
        return l1 + lam * l2, l1, l2


# the Triton path as custom ops: torch.compile sees each as one node, traced with fake kernels

@torch.library.custom_op("coft_fast::dual_prompt_loss", mutates_args=())
def _dual_prompt_op(
    image_feats: torch.Tensor, pos_text: torch.Tensor, neg_text: torch.Tensor, labels: torch.Tensor,
    complement_labels: torch.Tensor, scale: Optional[torch.Tensor], scale_value: float, lam: float,
    detach_image_in_neg: bool, detach_pos_in_l2: bool, splits: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, l1, l2, lse, p_y, p_c) of the Triton kernels at logit scale ``scale`` (0-dim) or ``scale_value``."""
    from coft_fast.kernels.dual_prompt import dual_forward_triton

    return dual_forward_triton(image_feats, pos_text, neg_text, labels, complement_labels,
                               scale if scale is not None else scale_value, lam, splits or None)


@_dual_prompt_op.register_fake
def _(image_feats, pos_text, neg_text, labels, complement_labels, scale, scale_value, lam, detach_image_in_neg,
      detach_pos_in_l2, splits):
    shapes = [()] * 3 + [(image_feats.shape[0],)] * 3  # loss, l1, l2; lse, p_y, p_c
    return tuple(image_feats.new_empty(shape, dtype=torch.float32) for shape in shapes)


@torch.library.custom_op("coft_fast::dual_prompt_loss_backward", mutates_args=())
def _dual_prompt_backward_op(
    image_feats: torch.Tensor, pos_text: torch.Tensor, neg_text: torch.Tensor, labels: torch.Tensor,
    complement_labels: torch.Tensor, lse: torch.Tensor, p_y: torch.Tensor, p_c: torch.Tensor,
    scale: Optional[torch.Tensor], scale_value: float, grad_loss: torch.Tensor, grad_l1: torch.Tensor,
    grad_l2: torch.Tensor, lam: float, detach_image_in_neg: bool, detach_pos_in_l2: bool, need_x: bool,
    need_pos: bool, need_neg: bool, need_scale: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d image_feats, d pos_text, d neg_text, d scale); an empty tensor for each one not needed."""
    from coft_fast.kernels.dual_prompt import dual_backward_triton

    grads = dual_backward_triton(image_feats, pos_text, neg_text, labels, complement_labels, lse, p_y, p_c,
                                 scale if scale is not None else scale_value, (grad_loss, grad_l1, grad_l2), lam,
                                 detach_image_in_neg, detach_pos_in_l2, need_x, need_pos, need_neg, need_scale)
    return tuple(g if g is not None else image_feats.new_empty(0) for g in grads)


@_dual_prompt_backward_op.register_fake
def _(image_feats, pos_text, neg_text, labels, complement_labels, lse, p_y, p_c, scale, scale_value, grad_loss,
      grad_l1, grad_l2, lam, detach_image_in_neg, detach_pos_in_l2, need_x, need_pos, need_neg, need_scale):
    def like(t, needed):
        return torch.empty_like(t) if needed and t is not None else image_feats.new_empty(0)

    return like(image_feats, need_x), like(pos_text, need_pos), like(neg_text, need_neg), like(scale, need_scale)


def _dual_setup_context(ctx, inputs, output):
    x, pos, neg, labels, complements, scale, scale_value, lam, detach_image_in_neg, detach_pos_in_l2, _ = inputs
    _, _, _, lse, p_y, p_c = output
    ctx.save_for_backward(x, pos, neg, labels, complements, lse, p_y, p_c, scale)
    ctx.scale_value, ctx.lam = scale_value, lam
    ctx.detach_image_in_neg, ctx.detach_pos_in_l2 = detach_image_in_neg, detach_pos_in_l2


def _dual_backward(ctx, grad_loss, grad_l1, grad_l2, *_row_grads):
    x, pos, neg, labels, complements, lse, p_y, p_c, scale = ctx.saved_tensors
    need_x, need_pos, need_neg = ctx.needs_input_grad[:3]
    need_scale = scale is not None and ctx.needs_input_grad[5]
    zero = x.new_zeros((), dtype=torch.float32)
    grads = [g if g is not None else zero for g in (grad_loss, grad_l1, grad_l2)]
    dx, dpos, dneg, dscale = _dual_prompt_backward_op(
        x, pos, neg, labels, complements, lse, p_y, p_c, scale, ctx.scale_value, *grads, ctx.lam,
        ctx.detach_image_in_neg, ctx.detach_pos_in_l2, need_x, need_pos, need_neg, need_scale)
    return (dx if need_x else None, dpos if need_pos else None, dneg if need_neg else None, None, None,
            dscale if need_scale else None, None, None, None, None, None)


_dual_prompt_op.register_autograd(_dual_backward, setup_context=_dual_setup_context)


@torch.library.custom_op("coft_fast::clean_probability", mutates_args=())
def _clean_probability_op(image_feats: torch.Tensor, pos_text: torch.Tensor, neg_text: torch.Tensor,
                          labels: torch.Tensor, scale: Optional[torch.Tensor], scale_value: float) -> torch.Tensor:
    from coft_fast.kernels.dual_prompt import clean_probability_triton as kernel

    return kernel(image_feats, pos_text, neg_text, labels, scale if scale is not None else scale_value)


@_clean_probability_op.register_fake
def _(image_feats, pos_text, neg_text, labels, scale, scale_value):
    return image_feats.new_empty((image_feats.shape[0],), dtype=torch.float32)


def _split_scale(scale, like: torch.Tensor):
    """The custom ops' (scale, scale_value): a tensor moved to ``like``'s device (read there), or a float."""
    return (scale.to(like.device), 1.0) if isinstance(scale, torch.Tensor) else (None, float(scale))


def dual_prompt_loss_triton(image_feats, pos_text, neg_text, labels, complement_labels, logit_scale, lam=1.0,
                            detach_image_in_neg=False, detach_pos_in_l2=False, splits=None):
    """The Triton path: (loss, l1, l2), fp32 0-dim; ``splits`` (tests only) fixes the forward's column slices."""
    from coft_fast.kernels.dual_prompt import _check_inputs

    _check_inputs(image_feats, pos_text, neg_text)
    scale, scale_value = _split_scale(logit_scale, image_feats)
    out = _dual_prompt_op(image_feats, pos_text, neg_text, labels, complement_labels, scale, scale_value, float(lam),
                          bool(detach_image_in_neg), bool(detach_pos_in_l2), int(splits or 0))
    return out[0], out[1], out[2]


def clean_probability_triton(image_feats, pos_text, neg_text, labels, logit_scale):
    """The Triton path of :func:`clean_probability`: (N,) fp32."""
    from coft_fast.kernels.dual_prompt import _check_inputs

    _check_inputs(image_feats, pos_text, neg_text)
    return _clean_probability_op(image_feats, pos_text, neg_text, labels, *_split_scale(logit_scale, image_feats))


def dual_prompt_loss(
    image_feats: torch.Tensor, pos_text: torch.Tensor, neg_text: torch.Tensor, labels: torch.Tensor,
    complement_labels: torch.Tensor, logit_scale, lam: float = 1.0, detach_image_in_neg: bool = False,
    detach_pos_in_l2: bool = False, backend: str = "auto", check_label_range: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, l1, l2), each 0-dim: loss = l1 + lam * l2. ``detach_image_in_neg`` stops gradients to image_feats
    through s-; ``detach_pos_in_l2`` treats s+ in l2 as constant (DEFT: both). ``backend``: "auto" (Triton on
    CUDA tensors), "triton", "reference" or "eager" (unfused). ``check_label_range=False`` skips the host sync."""
    scale = _check_head(image_feats, pos_text, neg_text, labels, logit_scale, backend, complement_labels,
                        check_label_range)
    if use_triton(backend, image_feats, image_feats.dtype):
        return dual_prompt_loss_triton(image_feats, pos_text, neg_text, labels, complement_labels, scale, lam,
                                       detach_image_in_neg, detach_pos_in_l2)
    return dual_prompt_loss_reference(image_feats, pos_text, neg_text, labels, complement_labels, scale, lam,
                                      detach_image_in_neg, detach_pos_in_l2, unfused=backend == "eager")


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
        return clean_probability_triton(image_feats, pos_text, neg_text, labels, scale)
    return clean_probability_reference(image_feats, pos_text, neg_text, labels, scale)
