"""CoFT's bidirectional generate-and-validate filter: (x, y1 = model 1's label) is kept in S1_clean iff
model 2's p_clean(y1 | x) > threshold; S2_clean swaps the roles. Given labels (``pseudo.source=given``)
are validated by both models instead. Labelled shots are always kept."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Optional

import torch

from coft_fast import ops


@dataclass
class ModelView:
    """One trained phase-I model's view of the pool."""
    features: torch.Tensor  # (M, d) normalised image features (with its visual prompts)
    pos: torch.Tensor  # (C, d) normalised positive class features
    neg: torch.Tensor  # (C, d) normalised negative class features

    @cached_property
    def similarities(self) -> torch.Tensor:
        """(M, C) cosine similarities to the positive prompts."""
        return self.features @ self.pos.T

    def labels(self) -> torch.Tensor:
        return self.similarities.argmax(dim=1)

    def clean_probability(self, labels: torch.Tensor, logit_scale: float) -> torch.Tensor:
        return ops.clean_probability(self.features, self.pos, self.neg, labels, logit_scale)

    def confidence(self, labels: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """(M,) the softmax probability of ``labels`` over the positive prompts: the model's own confidence."""
        probabilities = (logit_scale * self.similarities).softmax(dim=1)
        return probabilities.gather(1, labels.view(-1, 1)).squeeze(1)


@dataclass
class FilterResult:
    labels1: torch.Tensor  # (M,) model 1's labels
    labels2: torch.Tensor  # (M,) model 2's labels
    p_clean1: torch.Tensor  # (M,) model 2's p_clean of labels1 (given labels: model 1's p_clean of the given label)
    p_clean2: torch.Tensor  # (M,) model 1's p_clean of labels2 (given labels: model 2's p_clean of the given label)
    keep1: torch.Tensor  # (M,) bool: in S1_clean
    keep2: torch.Tensor  # (M,) bool: in S2_clean
    # (M,) what S1 / S2 train on where not labels1 / labels2 (given labels, shots' labels; None: those)
    targets1: Optional[torch.Tensor] = None
    targets2: Optional[torch.Tensor] = None
    # (M,) diagnostics: each model's softmax confidence in the label it scores (None in older filters)
    confidence1: Optional[torch.Tensor] = None
    confidence2: Optional[torch.Tensor] = None

    def training_labels(self, index: int) -> torch.Tensor:
        """The label each row of S<index>_clean (index 1 or 2) trains on."""
        target, own = (self.targets1, self.labels1) if index == 1 else (self.targets2, self.labels2)
        return own if target is None else target

    @classmethod
    def from_dict(cls, state: dict) -> "FilterResult":
        """A FilterResult from a filter checkpoint's dict (fields it no longer has are dropped)."""
        return cls(**{name: value for name, value in state.items() if name in cls.__dataclass_fields__})

    def with_shots(self, shots: torch.Tensor) -> "FilterResult":
        """Rows holding a labelled shot (``shots`` >= 0) kept in both sets, training on the shot's label."""
        is_shot = shots >= 0
        if not bool(is_shot.any()):
            return self
        return replace(self, keep1=self.keep1 | is_shot, keep2=self.keep2 | is_shot,
                       targets1=torch.where(is_shot, shots, self.training_labels(1)),
                       targets2=torch.where(is_shot, shots, self.training_labels(2)))


def generate_and_validate(view1: ModelView, view2: ModelView, logit_scale: float, threshold: float = 0.5) -> FilterResult:
    labels1, labels2 = view1.labels(), view2.labels()
    p_clean1 = view2.clean_probability(labels1, logit_scale)
    p_clean2 = view1.clean_probability(labels2, logit_scale)
    return FilterResult(labels1, labels2, p_clean1, p_clean2, p_clean1 > threshold, p_clean2 > threshold,
                        confidence1=view1.confidence(labels1, logit_scale),
                        confidence2=view2.confidence(labels2, logit_scale))


def validate_given(view1: ModelView, view2: ModelView, given: torch.Tensor, logit_scale: float,
                   threshold: float = 0.5) -> FilterResult:
    """Both models validate the given labels (:func:`judge_given`); labels1/2 are their own predictions."""
    return judge_given(given, view1.labels(), view2.labels(), view1.clean_probability(given, logit_scale),
                       view2.clean_probability(given, logit_scale), threshold,
                       view1.confidence(given, logit_scale), view2.confidence(given, logit_scale))


def judge_given(given: torch.Tensor, labels1: torch.Tensor, labels2: torch.Tensor, p_clean1: torch.Tensor,
                p_clean2: torch.Tensor, threshold: float, confidence1: Optional[torch.Tensor] = None,
                confidence2: Optional[torch.Tensor] = None) -> FilterResult:
    """The given labels' FilterResult from any two models: kept iff both p_clean exceed ``threshold``."""
    keep = (p_clean1 > threshold) & (p_clean2 > threshold)
    return FilterResult(labels1, labels2, p_clean1, p_clean2, keep, keep.clone(), given, given,
                        confidence1, confidence2)


FILTER_RULES = ("paper", "mixture")


def decide(result: FilterResult, rule: str, threshold: float = 0.5) -> FilterResult:
    """The keep decisions of ``rule``: ``paper`` (p_clean > threshold) or ``mixture`` (:func:`mixture_keep`)."""
    if rule == "paper":
        return result
    if rule == "mixture":
        return replace(result, keep1=mixture_keep(result.p_clean1, result.training_labels(1), threshold),
                       keep2=mixture_keep(result.p_clean2, result.training_labels(2), threshold))
    raise ValueError(f"unknown filter rule {rule!r} (one of {', '.join(FILTER_RULES)})")


def mixture_keep(p_clean: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5,
                 min_per_class: int = 20) -> torch.Tensor:
    """(M,) bool: per label class, posterior > 0.5 of the higher-mean component of a two-component Gaussian
    mixture on logit(p_clean) (as DivideMix's); p_clean > threshold in a small or flat class."""
    from sklearn.mixture import GaussianMixture

    keep = p_clean > threshold
    scores = torch.logit(p_clean.double().clamp(1e-6, 1 - 1e-6))
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        values = scores[members]
        if len(members) < min_per_class or float(values.std()) < 1e-3:
            continue
        mixture = GaussianMixture(n_components=2, reg_covar=1e-3, max_iter=200, random_state=0)
        mixture.fit(values.numpy()[:, None])
        clean = int(mixture.means_.ravel().argmax())
        posterior = torch.from_numpy(mixture.predict_proba(values.numpy()[:, None])[:, clean])
        keep[members] = posterior > 0.5
    return keep


def filter_quality(labels: torch.Tensor, keep: torch.Tensor, truth: torch.Tensor) -> dict:
    """Precision and recall of ``keep`` over the samples whose true label is known (diagnostics only)."""
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
