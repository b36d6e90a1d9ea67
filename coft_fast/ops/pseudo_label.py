"""Pseudo-label statistics, class-balanced top-K selection and label agreement counts: the deterministic
C++/CUDA kernels of ``coft_fast._C`` (csrc/; the tests hold plain-torch references), with fake kernels.
Logits are taken in float32; the label is the first index of the row maximum, the confidence its softmax
probability, binned as floor(confidence * num_bins). Rows with NaN, +inf or only -inf are rejected."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from coft_fast.ops import _extension
from coft_fast.ops._checks import check_labels


class PseudoLabelStats(NamedTuple):
    labels: torch.Tensor  # (N,) int64 arg-max class (ties to the lower index)
    confidence: torch.Tensor  # (N,) softmax probability of that class
    class_counts: torch.Tensor  # (C,) int64
    confidence_hist: torch.Tensor  # (C, num_bins) int64, equal-width bins on [0, 1]


def _check_logits(logits, num_bins: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D (N, C) tensor, got {got}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")


def _check_topk_args(labels, scores, k: int, num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_labels("labels", labels)
    if not isinstance(scores, torch.Tensor) or scores.shape != labels.shape or not scores.is_floating_point():
        got = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a float tensor of shape {tuple(labels.shape)}, got {got}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def _check_tensors(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")


def pseudo_label_stats(logits: torch.Tensor, num_bins: int = 10) -> PseudoLabelStats:
    """Arg-max labels, confidences, per-class counts and confidence histograms of ``logits`` (N, C) in one pass."""
    _check_tensors(logits=logits)
    _extension.require("pseudo_label_stats", logits.device)
    return PseudoLabelStats(*torch.ops.coft_fast.pseudo_label_stats(logits.detach(), num_bins))


def class_balanced_topk(labels: torch.Tensor, scores: torch.Tensor, k: int, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per class the indices of its k best-scoring samples, by class then score; the (C,) counts)."""
    _check_tensors(labels=labels, scores=scores)
    _extension.require("class_balanced_topk", labels.device)
    return tuple(torch.ops.coft_fast.class_balanced_topk(labels, scores.detach(), k, num_classes))


def agreement_matrix(labels_a: torch.Tensor, labels_b: torch.Tensor, num_classes: int,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(C, C) int64 counts of (labels_a[i], labels_b[i]) pairs over the rows where ``mask`` is true."""
    _check_tensors(labels_a=labels_a, labels_b=labels_b)
    if mask is not None:
        _check_tensors(mask=mask)
    _extension.require("agreement_matrix", labels_a.device)
    return torch.ops.coft_fast.agreement_matrix(labels_a, labels_b, num_classes, mask)


# fake implementations (output metadata only) for torch.compile
if _extension.available():

    @torch.library.register_fake("coft_fast::pseudo_label_stats")
    def _pseudo_label_stats_fake(logits, num_bins=10):
        _check_logits(logits, num_bins)
        rows, classes = logits.shape
        torch._check(classes >= 1, lambda: "logits must have at least one class column")
        long = dict(dtype=torch.int64)
        return (logits.new_empty((rows,), **long), logits.new_empty((rows,), dtype=torch.float32),
                logits.new_empty((classes,), **long), logits.new_empty((classes, num_bins), **long))

    @torch.library.register_fake("coft_fast::class_balanced_topk")
    def _class_balanced_topk_fake(labels, scores, k, num_classes):
        _check_topk_args(labels, scores, k, num_classes)
        selected = torch.library.get_ctx().new_dynamic_size()  # how many depends on the labels
        return labels.new_empty((selected,)), labels.new_empty((num_classes,))

    @torch.library.register_fake("coft_fast::agreement_matrix")
    def _agreement_matrix_fake(labels_a, labels_b, num_classes, mask=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        check_labels("labels_a", labels_a)
        check_labels("labels_b", labels_b)
        return labels_a.new_empty((num_classes, num_classes))
