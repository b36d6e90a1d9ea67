"""Classification metrics over probability or logit rows, with labels where they exist."""
from __future__ import annotations

from typing import Dict

import torch



def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1, top-5 (top-C when C < 5) and mean per-class recall (over the classes in ``labels``) as
    fractions in [0, 1] of ``scores`` (N, C) against ``labels`` (N,) int64, -1 marking an unlabelled row."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {tuple(scores.shape)}")
    running = RunningClassificationMetrics(scores.shape[1])
    running.update(scores, labels)
    return running.result()


class RunningClassificationMetrics:
    """:func:`classification_metrics` accumulated batch by batch, in O(C) memory."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.correct1 = self.correct5 = 0
        self.hits = torch.zeros(num_classes, dtype=torch.float64)
        self.totals = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(f"scores must be (N, {self.num_classes}), got shape {tuple(scores.shape)}")
        if labels.shape != (scores.shape[0],):
            raise ValueError(f"labels must be ({scores.shape[0]},), got shape {tuple(labels.shape)}")
        keep = labels >= 0
        scores, labels = scores[keep], labels[keep].long()
        if not labels.numel():
            return
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels hold class {int(labels.max())} but scores have only {self.num_classes} columns")
        top = scores.topk(min(5, self.num_classes), dim=1).indices
        correct1 = top[:, 0] == labels
        self.correct1 += int(correct1.sum())
        self.correct5 += int((top == labels[:, None]).any(dim=1).sum())
        self.hits += torch.bincount(labels[correct1], minlength=self.num_classes).double()
        self.totals += torch.bincount(labels, minlength=self.num_classes).double()

    def result(self) -> Dict[str, float]:
        count = int(self.totals.sum())
        if not count:
            return {"acc1": float("nan"), "acc5": float("nan"), "mean_per_class_recall": float("nan"), "num_labelled": 0}
        present = self.totals > 0
        return {
            "acc1": self.correct1 / count,
            "acc5": self.correct5 / count,
            "mean_per_class_recall": (self.hits[present] / self.totals[present]).mean().item(),
            "num_labelled": count,
        }

