"""Class-balanced top-K selection of confident pseudo-labels (S*)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from coft_fast import ops

log = logging.getLogger(__name__)


@dataclass
class Selection:
    rows: torch.Tensor  # (S,) int64 rows of the scored pool, ordered by class then confidence
    labels: torch.Tensor  # (S,) int64 pseudo-label of each selected row
    counts: torch.Tensor  # (C,) int64 how many each class got
    short_classes: List[str]  # classes with fewer than K candidates (but at least one)
    empty_classes: List[str]  # classes with no candidate at all


def select_top_k(labels: torch.Tensor, confidence: torch.Tensor, k: int, class_names: Sequence[str],
                 shots: Optional[torch.Tensor] = None) -> Selection:
    """The K most confident samples of every class (fewer where it has fewer). ``shots`` (a shot's class per
    row, -1 elsewhere): each class's shots come first, with their labels, its best other rows fill its K."""
    num_classes = len(class_names)
    if shots is None or not bool((shots >= 0).any()):
        rows, counts = ops.class_balanced_topk(labels, confidence.float(), k, num_classes)
    else:
        is_shot = shots >= 0
        labels = torch.where(is_shot, shots, labels)
        scores = torch.where(is_shot, torch.full_like(confidence, 2.0, dtype=torch.float32), confidence.float())
        limit = torch.bincount(shots[is_shot], minlength=num_classes).clamp(min=k)  # per class: max(K, its shots)
        rows, counts = ops.class_balanced_topk(labels, scores, int(limit.max()), num_classes)
        starts = torch.cumsum(counts, 0) - counts  # rows are ordered by class, shots (score 2) first
        rank = torch.arange(len(rows)) - starts[labels[rows]]
        rows = rows[rank < limit[labels[rows]]]
        counts = torch.minimum(counts, limit)
    short = [name for name, n in zip(class_names, counts.tolist()) if 0 < n < k]
    empty = [name for name, n in zip(class_names, counts.tolist()) if n == 0]
    if short:
        log.warning("top-%d selection: %d classes have fewer than %d candidates: %s", k, len(short), k, ", ".join(short[:10]))
    if empty:
        log.warning("top-%d selection: no sample is labelled with %d classes: %s", k, len(empty), ", ".join(empty[:10]))
    return Selection(rows, labels[rows], counts, short, empty)
