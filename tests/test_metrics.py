import math
import sys
from pathlib import Path

import pytest
import torch

from coft_fast.linear_probe import fit_linear_probe
from coft_fast.runtime.metrics import classification_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import linear_probe_accuracy  # noqa: E402  (a benchmark's oracle ceiling)


def test_metrics_against_hand_computed_values():
    # 6 samples, 3 classes. Top-1 predictions: 0, 1, 2, 0, 2, 1
    scores = torch.tensor(
        [
            [0.7, 0.2, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.3, 0.5],
            [0.6, 0.3, 0.1],
            [0.1, 0.2, 0.7],
            [0.2, 0.5, 0.3],
        ]
    )
    labels = torch.tensor([0, 1, 1, 2, 2, -1])  # the last row is unlabelled and ignored
    m = classification_metrics(scores, labels)
    # correct: rows 0, 1, 4 -> 3 of 5
    assert m["acc1"] == pytest.approx(3 / 5)
    # C = 3 < 5, so top-5 is top-3: always right
    assert m["acc5"] == pytest.approx(1.0)
    # recall: class 0: 1/1, class 1: 1/2, class 2: 1/2 -> mean 2/3
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)
    assert m["num_labelled"] == 5


def test_top5_with_many_classes():
    scores = torch.arange(10.0).repeat(2, 1)  # ranking 9, 8, 7, 6, 5, ...
    m = classification_metrics(scores, torch.tensor([5, 4]))
    assert m["acc1"] == 0.0 and m["acc5"] == pytest.approx(0.5)


def test_no_labels_gives_nan():
    m = classification_metrics(torch.rand(3, 2), torch.tensor([-1, -1, -1]))
    assert math.isnan(m["acc1"]) and m["num_labelled"] == 0


def test_shape_errors():
    with pytest.raises(ValueError, match="scores"):
        classification_metrics(torch.rand(3), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(torch.rand(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class 5"):
        classification_metrics(torch.rand(2, 2), torch.tensor([0, 5]))


def test_linear_probe_separates_separable_data():
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(4, 8)
    labels = torch.randint(0, 4, (200,), generator=generator)
    features = centers[labels] + 0.05 * torch.randn(200, 8, generator=generator)
    assert linear_probe_accuracy(features[:150], labels[:150], features[150:], labels[150:], steps=200) == 1.0


def test_fit_linear_probe_zero_start_is_deterministic_and_scale_free():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (90,), generator=generator)
    features = torch.eye(3, 6)[labels] + 0.1 * torch.randn(90, 6, generator=generator)
    first = fit_linear_probe(features, labels, num_classes=3, steps=100)
    second = fit_linear_probe(features, labels, num_classes=3, steps=100)
    assert first(features).shape == (90, 3)
    assert torch.equal(first(features), second(features))  # no generator: zero start, same result
    assert torch.allclose(first(features * 7.0), first(features), atol=1e-6)  # rows are normalised
    assert (first(features).argmax(1) == labels).double().mean().item() > 0.95
