"""Pseudo-label statistics, class-balanced top-K selection, and label agreement counts.

Each op is a pair: a plain-torch ``*_reference`` (the ground truth the tests compare against) and
the public function, which runs the C++/CUDA kernels of ``coft_fast._C`` registered as
``torch.ops.coft_fast.*`` (csrc/). The kernels validate their inputs themselves (dtype, shape,
device, labels in range, no NaN) with errors that name the argument, and are deterministic. Fake
implementations below let torch.compile trace the ops (the selection's length is data-dependent).

Semantics shared by reference and kernels: logits are taken in float32; the label is the first
index of the row maximum (the softmax arg-max, ties to the lower class); the confidence is its
softmax probability 1 / sum_j exp(l_j - l_max); confidence bins are floor(confidence * num_bins)
in float32, with 1.0 in the last bin. Rows with NaN or +inf, or with only -inf, are rejected
(-inf entries, e.g. masked classes, are allowed). Statistics are not differentiable: the public
functions detach their inputs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from coft_fast.ops import _extension


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
    x = logits.float()
    probabilities = x.softmax(dim=1)
    if probabilities.isnan().any():
        raise ValueError("logits must be finite (no NaN or +inf, and not a row of only -inf)")
    # arg-max of the logits themselves (torch.argmax returns the first maximal index): the softmax
    # arg-max in exact arithmetic, without ties that rounding of the probabilities could create
    labels = x.argmax(dim=1) if x.shape[0] else torch.zeros(0, dtype=torch.int64, device=x.device)
    confidence = probabilities.gather(1, labels[:, None]).squeeze(1)
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
    if scores.isnan().any():
        raise ValueError("scores must not contain NaN")
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


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")


def _require(op: str, device: torch.device) -> None:
    if not torch.compiler.is_compiling():
        _extension.require(op, device)


def pseudo_label_stats(logits: torch.Tensor, num_bins: int = 10) -> PseudoLabelStats:
    """Arg-max labels, confidences, per-class counts and confidence histograms in one pass.

    logits: (N, C) float (any float dtype, computed in float32). Returns
    ``PseudoLabelStats(labels (N,) int64, confidence (N,) float32, class_counts (C,) int64,
    confidence_hist (C, num_bins) int64)``; see :func:`pseudo_label_stats_reference`.
    """
    _check_tensor("logits", logits)
    _require("pseudo_label_stats", logits.device)
    return PseudoLabelStats(*torch.ops.coft_fast.pseudo_label_stats(logits.detach(), num_bins))


def class_balanced_topk(labels: torch.Tensor, scores: torch.Tensor, k: int, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per class the indices of its k best-scoring samples (all of them when fewer; ties: lower
    index first), as one int64 tensor ordered by class then by descending score, and the (C,) int64
    count each class got. See :func:`class_balanced_topk_reference`."""
    _check_tensor("labels", labels)
    _check_tensor("scores", scores)
    _require("class_balanced_topk", labels.device)
    return tuple(torch.ops.coft_fast.class_balanced_topk(labels, scores.detach(), k, num_classes))


def agreement_matrix(labels_a: torch.Tensor, labels_b: torch.Tensor, num_classes: int,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(C, C) int64 counts of (labels_a[i], labels_b[i]) pairs over the rows where ``mask`` is true
    (all rows when None). See :func:`agreement_matrix_reference`."""
    _check_tensor("labels_a", labels_a)
    _check_tensor("labels_b", labels_b)
    if mask is not None:
        _check_tensor("mask", mask)
    _require("agreement_matrix", labels_a.device)
    return torch.ops.coft_fast.agreement_matrix(labels_a, labels_b, num_classes, mask)


# ---- fake (meta) implementations: output metadata only, for torch.compile / FakeTensor tracing ----
def _fake_check_labels(name: str, labels: torch.Tensor) -> None:
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}")


if _extension.available():

    @torch.library.register_fake("coft_fast::pseudo_label_stats")
    def _pseudo_label_stats_fake(logits, num_bins=10):
        if logits.dim() != 2:
            raise ValueError(f"logits must be a 2-D (N, C) tensor, got shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        rows, classes = logits.shape
        torch._check(classes >= 1, lambda: "logits must have at least one class column")
        long = dict(dtype=torch.int64)
        return (logits.new_empty((rows,), **long), logits.new_empty((rows,), dtype=torch.float32),
                logits.new_empty((classes,), **long), logits.new_empty((classes, num_bins), **long))

    @torch.library.register_fake("coft_fast::class_balanced_topk")
    def _class_balanced_topk_fake(labels, scores, k, num_classes):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        _fake_check_labels("labels", labels)
        if not scores.is_floating_point() or scores.shape != labels.shape:
            raise ValueError(f"scores must be a float tensor of shape {tuple(labels.shape)}, got {tuple(scores.shape)}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        selected = torch.library.get_ctx().new_dynamic_size()  # how many depends on the labels
        return labels.new_empty((selected,)), labels.new_empty((num_classes,))

    @torch.library.register_fake("coft_fast::agreement_matrix")
    def _agreement_matrix_fake(labels_a, labels_b, num_classes, mask=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        _fake_check_labels("labels_a", labels_a)
        _fake_check_labels("labels_b", labels_b)
        return labels_a.new_empty((num_classes, num_classes))
