"""The probe detector of given labels (filter.detector=probe): folds, out-of-fold scoring, self-selection."""
import torch

from coft_fast.pseudo import probe_detector as detector_module
from coft_fast.pseudo.filter import decide
from coft_fast.pseudo.probe_detector import out_of_fold_probabilities, probe_detector, stratified_folds


def _clusters(per_class=60, num_classes=3, flipped=0.2, seed=0):
    """Well-separated Gaussian clusters, a share of their labels moved to the next class."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, 8) * 4
    truth = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[truth] + torch.randn(len(truth), 8, generator=generator)
    given = truth.clone()
    wrong = torch.rand(len(truth), generator=generator) < flipped
    given[wrong] = (truth[wrong] + 1) % num_classes
    return features, truth, given, wrong


def _record_fits(monkeypatch) -> list:
    """The rows each linear probe of the detector trains on, in the order they are fitted."""
    fits = []
    original = detector_module.fit_linear_probe

    def recording(rows_features, labels, num_classes, **kwargs):
        fits.append(rows_features.clone())
        return original(rows_features, labels, num_classes, **kwargs)

    monkeypatch.setattr(detector_module, "fit_linear_probe", recording)
    return fits


def test_stratified_folds_split_every_class_evenly_and_are_seeded():
    labels = torch.tensor([0] * 11 + [1] * 7 + [2] * 3)
    fold = stratified_folds(labels, 5, seed=3)
    for label in range(3):
        counts = torch.bincount(fold[labels == label], minlength=5)
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == int((labels == label).sum())
    assert torch.equal(fold, stratified_folds(labels, 5, seed=3))
    assert not torch.equal(fold, stratified_folds(labels, 5, seed=4))


def test_no_row_is_scored_by_a_probe_that_trained_on_it(monkeypatch):
    features, _, given, _ = _clusters()
    fold = stratified_folds(given, 4, seed=0)
    seen = _record_fits(monkeypatch)
    train = torch.rand(len(given), generator=torch.Generator().manual_seed(1)) < 0.7
    out_of_fold_probabilities(features, given, 3, fold, train, steps=5)
    assert len(seen) == 4
    for f, trained in enumerate(seen):
        expected = features[(fold != f) & train]  # the other folds' rows that may train, none of fold f
        assert torch.equal(trained, expected)


def test_flipped_labels_rank_first_and_the_mixture_flags_them():
    from sklearn.metrics import roc_auc_score

    features, truth, given, wrong = _clusters()
    result = probe_detector(features, given, 3, seeds=(1, 2), folds=5, rounds=2)
    issue_score = 1 - torch.minimum(result.p_clean1, result.p_clean2)
    assert roc_auc_score(wrong.numpy(), issue_score.numpy()) > 0.95
    decided = decide(result, "mixture")
    flagged = ~decided.keep1
    assert int((flagged & wrong).sum()) >= 0.8 * int(wrong.sum())  # recall
    assert int((flagged & wrong).sum()) >= 0.8 * int(flagged.sum())  # precision
    assert torch.equal(result.training_labels(1), given)  # kept rows train on their given label
    for labels in (result.labels1, result.labels2):  # each model's out-of-fold prediction: a hint at the right label
        assert float((labels[wrong] == truth[wrong]).double().mean()) > 0.8


def test_self_selection_trains_later_rounds_on_agreeing_rows_and_trusted_ones(monkeypatch):
    features, _, given, wrong = _clusters(per_class=20)
    fits = _record_fits(monkeypatch)
    trusted = wrong.clone()  # trusted rows with wrong labels: the probes disagree, yet they keep training
    probe_detector(features, given, 3, seeds=(1, 2), folds=2, rounds=2, trusted=trusted)
    assert len(fits) == 8  # 2 models x 2 rounds x 2 folds
    for model in range(2):
        first, second = fits[4 * model:4 * model + 2], fits[4 * model + 2:4 * model + 4]
        assert sum(len(f) for f in first) == len(given)  # round 1: every row, in the other fold's fit
        assert sum(len(f) for f in second) < len(given)  # round 2: the disagreeing untrusted rows drop out
        trained = torch.cat(second)
        for row in trusted.nonzero().flatten().tolist():
            assert bool((trained == features[row]).all(1).any())
