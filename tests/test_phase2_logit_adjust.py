"""Phase II's logit-adjusted cross-entropy (phase2.logit_adjust)."""
import math

import torch

from coft_fast.config import Config, Phase2Config
from coft_fast.phases.phase2 import build_classifier, logit_adjustment, train_phase2


def test_the_adjustment_is_tau_times_the_log_of_the_smoothed_prior():
    labels = torch.tensor([0, 0, 0, 2])  # class 1 absent: add-one smoothing keeps its log finite
    adjustment = logit_adjustment(labels, 3, tau=1.5)
    expected = 1.5 * torch.log(torch.tensor([4.0, 1.0, 2.0]) / 7)
    torch.testing.assert_close(adjustment, expected)
    assert torch.equal(logit_adjustment(labels, 3, tau=0.0), torch.zeros(3))


def test_the_default_is_the_papers_plain_cross_entropy_and_the_testbed_recipe_the_balanced_value():
    from coft_fast.config import load_recipe

    assert Config().phase2.logit_adjust == 0.0
    assert load_recipe("testbed").config().phase2.logit_adjust == 1.0


def _train(parts, labels, tau):
    clip, images, _, num_classes = parts
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(num_classes, clip.model.visual.output_dim), dim=-1)
    classifier = build_classifier(clip.model.visual, text, 10.0, "zeroshot", 0)
    cfg = Phase2Config(epochs=2, batch_size=8, lr=0.05, logit_adjust=tau)
    report = train_phase2(classifier, images, torch.arange(len(labels)), labels, cfg, seed=3,
                          device=torch.device("cpu"), precision="fp32", progress=False)
    return classifier, report


def test_balanced_labels_train_exactly_as_plain_cross_entropy(phase2_parts):
    """A constant added to every logit leaves cross-entropy unchanged: balanced labels give plain CE's model."""
    num_classes = phase2_parts[3]
    labels = torch.arange(40) % num_classes
    plain, plain_report = _train(phase2_parts, labels, 0.0)
    adjusted, adjusted_report = _train(phase2_parts, labels, 1.0)
    for (name, a), (_, b) in zip(plain.state_dict().items(), adjusted.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert math.isclose(plain_report["history"][-1]["loss"], adjusted_report["history"][-1]["loss"], rel_tol=1e-4)


def test_a_frequent_label_is_not_learnt_as_a_prior(phase2_parts):
    """Plain cross-entropy on labels that are mostly class 0 raises the head's bias of class 0 above the
    others; the adjusted loss already accounts for the prior, so that gap is smaller."""
    labels = torch.zeros(40, dtype=torch.long)
    labels[::5] = torch.arange(8) % (phase2_parts[3] - 1) + 1  # 8 of 40 spread over the other classes
    plain, _ = _train(phase2_parts, labels, 0.0)
    adjusted, _ = _train(phase2_parts, labels, 1.0)

    def gap(classifier):
        bias = classifier.head.bias.detach()
        return (bias[0] - bias[1:].mean()).item()

    assert gap(plain) > 0
    assert gap(adjusted) < 0.5 * gap(plain)
