"""Wrong given labels found out of fold by linear probes on frozen image features (``filter.detector=probe``):
each model is a K-fold probe ensemble over its own seeded, stratified split; later rounds train only on rows
whose out-of-fold prediction was their given label (DeFT's self-selection; shots always train)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from coft_fast.pseudo.filter import FilterResult, judge_given
from coft_fast.linear_probe import fit_linear_probe


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """(M,) the fold of each row: each class permuted (seeded) and cut into ``folds`` near-equal chunks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    fold = torch.empty(len(labels), dtype=torch.long)
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) * folds // max(len(members), 1)
    return fold


def out_of_fold_probabilities(features: torch.Tensor, labels: torch.Tensor, num_classes: int, fold: torch.Tensor,
                              train: Optional[torch.Tensor] = None, steps: int = 500) -> torch.Tensor:
    """(M, C) each row's probabilities from the probe trained on the other folds' (``train``) rows."""
    probabilities = torch.zeros(len(labels), num_classes)
    for f in range(int(fold.max()) + 1):
        held = fold == f
        rows = ~held if train is None else ~held & train
        predict = fit_linear_probe(features[rows], labels[rows], num_classes, steps=steps)
        probabilities[held.cpu()] = predict(features[held]).softmax(1).float().cpu()
    return probabilities


def probe_detector(features: torch.Tensor, given: torch.Tensor, num_classes: int, seeds: Sequence[int],
                   folds: int = 5, rounds: int = 2, threshold: float = 0.5,
                   trusted: Optional[torch.Tensor] = None) -> FilterResult:
    """The two models' out-of-fold views of the ``given`` labels; ``trusted`` (M,) rows always train."""
    if folds < 2 or rounds < 1:
        raise ValueError(f"probe detector: folds must be >= 2 and rounds >= 1, got {folds} and {rounds}")
    device = features.device
    given_on = given.to(device)
    views = []
    for seed in seeds:
        fold = stratified_folds(given, folds, seed).to(device)
        train = None
        for _ in range(rounds):
            probabilities = out_of_fold_probabilities(features, given_on, num_classes, fold, train)
            agrees = probabilities.argmax(1) == given  # self-selection for the next round
            train = (agrees if trusted is None else agrees | trusted).to(device)
        views.append(probabilities)
    labels1, labels2 = (view.argmax(1) for view in views)
    p_clean1, p_clean2 = (view.gather(1, given.view(-1, 1)).squeeze(1) for view in views)
    return judge_given(given, labels1, labels2, p_clean1, p_clean2, threshold, p_clean1, p_clean2)
