"""Pseudo-label statistics, class-balanced top-K selection, and label agreement counts.

Plain-torch references; the C++/CUDA extension (``coft_fast._C``) provides the fast paths.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


class PseudoLabelStats(NamedTuple):
    labels: torch.Tensor  # (N,) int64 arg-max class (ties to the lower index)
    confidence: torch.Tensor  # (N,) softmax probability of that class
    class_counts: torch.Tensor  # (C,) int64
    confidence_hist: torch.Tensor  # (C, num_bins) int64, equal-width bins on [0, 1]


def _check_logits(logits):
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D (N, C) tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class column, got shape {tuple(logits.shape)}")


def _check_class_labels(name, labels, num_classes, rows=None):
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
        raise TypeError(f"{name} must be a 1-D int64 tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if rows is not None and labels.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} entries, got {labels.shape[0]}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]")


def pseudo_label_stats_reference(logits: torch.Tensor, num_bins: int = 10) -> PseudoLabelStats:
    _check_logits(logits)
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    num_classes = logits.shape[1]
    probabilities = logits.float().softmax(dim=1)
    confidence, labels = probabilities.max(dim=1)  # torch.max returns the first maximal index
    counts = torch.bincount(labels, minlength=num_classes)
    bins = (confidence * num_bins).long().clamp_(0, num_bins - 1)
    hist = torch.bincount(labels * num_bins + bins, minlength=num_classes * num_bins).view(num_classes, num_bins)
    return PseudoLabelStats(labels, confidence, counts, hist)


def class_balanced_topk_reference(labels: torch.Tensor, scores: torch.Tensor, k: int, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per class the indices of its k best-scoring samples (ties: lower index first), ordered by class
    then by descending score; and the (C,) count each class got."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_class_labels("labels", labels, num_classes)
    if not isinstance(scores, torch.Tensor) or scores.shape != labels.shape or not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor of shape {tuple(labels.shape)}, got {getattr(scores, 'shape', None)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # sort by (class, -score, index): stable sorts, least significant key first
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    sorted_labels = labels[order]
    counts_all = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts_all, 0) - counts_all
    rank = torch.arange(labels.numel(), device=labels.device) - starts[sorted_labels]
    chosen = order[rank < k]
    return chosen, torch.clamp(counts_all, max=k)


def agreement_matrix_reference(labels_a: torch.Tensor, labels_b: torch.Tensor, num_classes: int,
                               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(C, C) int64 counts of (labels_a[i], labels_b[i]) pairs, over the rows where ``mask`` is true."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_class_labels("labels_a", labels_a, num_classes)
    _check_class_labels("labels_b", labels_b, num_classes, rows=labels_a.shape[0])
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != labels_a.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(labels_a.shape)}")
        labels_a, labels_b = labels_a[mask], labels_b[mask]
    pairs = labels_a * num_classes + labels_b
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def pseudo_label_stats(logits: torch.Tensor, num_bins: int = 10) -> PseudoLabelStats:
    """Arg-max labels, confidences, per-class counts and confidence histograms in one pass."""
    return pseudo_label_stats_reference(logits, num_bins)


def class_balanced_topk(labels: torch.Tensor, scores: torch.Tensor, k: int, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """See :func:`class_balanced_topk_reference`."""
    return class_balanced_topk_reference(labels, scores, k, num_classes)


def agreement_matrix(labels_a: torch.Tensor, labels_b: torch.Tensor, num_classes: int,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """See :func:`agreement_matrix_reference`."""
    return agreement_matrix_reference(labels_a, labels_b, num_classes, mask)
