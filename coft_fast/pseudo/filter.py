"""The bidirectional generate-and-validate filter of CoFT.

Model 1 labels every pool image with its positive prompts (y1 = argmax s+); model 2 validates:
(x, y1) is kept in S1_clean iff model 2's p_clean(y1 | x) > threshold (0.5: s+ > s-). S2_clean
is the same with the roles swapped. No global confidence threshold and no top-K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coft_fast import ops


@dataclass
class ModelView:
    """One trained phase-I model's view of the pool."""

    features: torch.Tensor  # (M, d) normalised image features (with its visual prompts)
    pos: torch.Tensor  # (C, d) normalised positive class features
    neg: torch.Tensor  # (C, d) normalised negative class features

    def positive_logits(self, logit_scale: float) -> torch.Tensor:
        return logit_scale * self.features @ self.pos.T

    def labels(self) -> torch.Tensor:
        return (self.features @ self.pos.T).argmax(dim=1)

    def clean_probability(self, labels: torch.Tensor, logit_scale: float) -> torch.Tensor:
        return ops.clean_probability(self.features, self.pos, self.neg, labels, logit_scale)


@dataclass
class FilterResult:
    labels1: torch.Tensor  # (M,) model 1's labels
    labels2: torch.Tensor  # (M,) model 2's labels
    p_clean1: torch.Tensor  # (M,) model 2's p_clean of labels1
    p_clean2: torch.Tensor  # (M,) model 1's p_clean of labels2
    keep1: torch.Tensor  # (M,) bool: in S1_clean
    keep2: torch.Tensor  # (M,) bool: in S2_clean


def generate_and_validate(view1: ModelView, view2: ModelView, logit_scale: float, threshold: float = 0.5) -> FilterResult:
    labels1, labels2 = view1.labels(), view2.labels()
    p_clean1 = view2.clean_probability(labels1, logit_scale)
    p_clean2 = view1.clean_probability(labels2, logit_scale)
    return FilterResult(labels1, labels2, p_clean1, p_clean2, p_clean1 > threshold, p_clean2 > threshold)


def filter_quality(labels: torch.Tensor, keep: torch.Tensor, truth: torch.Tensor) -> dict:
    """Precision (label accuracy among kept) and recall (share of the correctly labelled samples
    that were kept), over the samples whose true label is known (truth >= 0). Diagnostics only."""
    known = truth >= 0
    labels, keep, truth = labels[known], keep[known], truth[known]
    correct = labels == truth
    kept = int(keep.sum())
    return {
        "kept": kept,
        "precision": (correct & keep).sum().item() / max(kept, 1),
        "recall": (correct & keep).sum().item() / max(int(correct.sum()), 1),
        "label_accuracy_before": correct.double().mean().item() if len(correct) else float("nan"),
    }
