"""The filter variants of issue 28: each a config key whose default is the paper's behaviour."""
import pytest
import torch

from coft_fast.config import Config, ConfigError
from coft_fast.phases.phase1 import complement_distribution, hard_complement_labels


def test_hard_complement_never_returns_the_label_and_follows_the_weights():
    probabilities = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.1, 0.1, 0.7]])
    labels = torch.tensor([0, 3])
    for weight in (0.0, 0.5, 1.0):
        expected = complement_distribution(labels, probabilities, weight)
        assert torch.allclose(expected.sum(1), torch.ones(2, dtype=expected.dtype))
        assert expected[0, 0] == 0 and expected[1, 3] == 0
        draws = 60_000
        generator = torch.Generator().manual_seed(0)
        picked = hard_complement_labels(labels.repeat(draws), probabilities.repeat(draws, 1), weight, generator)
        picked = picked.view(draws, 2)
        assert not bool((picked[:, 0] == 0).any()) and not bool((picked[:, 1] == 3).any())
        for row in range(2):
            frequency = torch.bincount(picked[:, row], minlength=4).double() / draws
            assert torch.allclose(frequency, expected[row], atol=0.01), (weight, row, frequency, expected[row])
    # weight 1 on sample 0: the model's confusions (0.2, 0.05, 0.05) renormalised without the label
    assert torch.allclose(complement_distribution(labels, probabilities, 1.0)[0],
                          torch.tensor([0.0, 2 / 3, 1 / 6, 1 / 6], dtype=torch.float64))
    # all mass on the label itself: the other classes fall back to uniform
    assert torch.allclose(complement_distribution(torch.tensor([1]), torch.tensor([[0.0, 1.0, 0.0]]), 1.0),
                          torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64))


def test_hard_complement_weight_is_validated_by_name():
    with pytest.raises(ConfigError, match="phase1.complement_hard_weight"):
        Config().override(["phase1.complement_hard_weight=1.5"]).validate()
    assert Config().phase1.complement_hard_weight == 0.0  # the paper's uniform complements


def test_phase1_trains_with_hard_complements(phase2_parts):
    from coft_fast.phases.phase1 import make_prompt_model, train_phase1

    from coft_fast.pseudo import prompt_names

    clip, images, labels, num_classes = phase2_parts
    cfg = Config().override(["phase1.steps=4", "phase1.min_epochs=1", "phase1.batch_size=16",
                             "phase1.complement_hard_weight=1.0", "phase1.vpt_tokens=2"]).phase1
    names = prompt_names([str(c) for c in range(num_classes)])
    rows = torch.arange(len(labels))
    runs = []
    for _ in range(2):
        model = make_prompt_model(clip, names, cfg, 3, torch.device("cpu"))
        result = train_phase1(model, images, rows, labels, cfg, 3, torch.device("cpu"), progress=False)
        runs.append((result, {k: v.clone() for k, v in model.state_dict().items()}))
    assert runs[0][0]["steps"] == 4
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])  # deterministic for a seed


def _result(labels1, labels2, p1, p2, threshold=0.5):
    from coft_fast.pseudo.filter import FilterResult

    p1, p2 = torch.tensor(p1, dtype=torch.float64), torch.tensor(p2, dtype=torch.float64)
    return FilterResult(torch.tensor(labels1), torch.tensor(labels2), p1, p2, p1 > threshold, p2 > threshold)


def test_agreement_keeps_only_labels_both_models_give_and_validate():
    from coft_fast.pseudo.filter import decide

    result = _result([0, 1, 2, 0], [0, 2, 2, 0], [0.9, 0.9, 0.9, 0.4], [0.8, 0.9, 0.7, 0.9])
    agreed = decide(result, "agreement")
    assert agreed.keep1.tolist() == [True, False, True, False] and torch.equal(agreed.keep1, agreed.keep2)
    assert decide(result, "paper") is result


def test_filters_record_each_models_own_confidence():
    from coft_fast.pseudo.filter import ModelView, generate_and_validate, validate_given

    generator = torch.Generator().manual_seed(0)

    def view():
        unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)
        return ModelView(unit(7, 5), unit(3, 5), unit(3, 5))

    view1, view2 = view(), view()
    result = generate_and_validate(view1, view2, logit_scale=10.0)
    probabilities1 = (10.0 * view1.features @ view1.pos.T).softmax(dim=1)
    assert torch.allclose(result.confidence1, probabilities1.max(dim=1).values)
    assert torch.allclose(result.confidence2, (10.0 * view2.features @ view2.pos.T).softmax(dim=1).max(dim=1).values)
    given = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    checked = validate_given(view1, view2, given, logit_scale=10.0)
    assert torch.allclose(checked.confidence1, probabilities1[torch.arange(7), given])


def test_mixture_splits_each_class_where_a_threshold_keeps_everything():
    from coft_fast.pseudo.filter import decide

    generator = torch.Generator().manual_seed(0)
    clean = 0.97 + 0.02 * torch.rand(60, generator=generator)  # a clean mode near 0.98
    noisy = 0.70 + 0.10 * torch.rand(40, generator=generator)  # a noisy mode near 0.75: all above 0.5
    p = torch.cat([clean, noisy, clean[:5]]).tolist()
    labels = [0] * 100 + [1] * 5  # class 1 is too small for a mixture: the threshold decides
    result = _result(labels, labels, p, p)
    assert bool(result.keep1.all())
    mixed = decide(result, "mixture")
    assert mixed.keep1[:60].all() and not mixed.keep1[60:100].any() and mixed.keep1[100:].all()
    assert torch.equal(decide(result, "mixture").keep1, mixed.keep1)  # deterministic


def test_variant_keys_are_validated_by_name():
    bad = {"filter.rule": "vote", "phase2.loss": "mae", "phase2.sample_weight": "confidence", "phase2.gce_q": 0}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Config().override([f"{key}={value}"]).validate()
    with pytest.raises(ConfigError, match="filter.rule"):
        Config().override(["pseudo.source=given", "filter.rule=agreement"]).validate()
    with pytest.raises(ConfigError, match="phase2.sample_weight"):
        Config().override(["method=self-train", "phase2.sample_weight=clean_probability"]).validate()
    defaults = Config()
    assert (defaults.filter.rule, defaults.phase2.loss, defaults.phase2.sample_weight) == ("auto", "ce", "none")


def test_detector_keys_resolve_and_are_validated_by_name():
    from coft_fast.api import resolve_config

    coft = resolve_config()
    assert (coft.filter.detector, coft.filter.rule) == ("prompts", "paper")  # CoFT: the paper's filter
    given = resolve_config(overrides=["pseudo.source=given"])  # clean-labels
    assert (given.filter.detector, given.filter.rule) == ("probe", "mixture")
    chosen = resolve_config(overrides=["pseudo.source=given", "phase1.train_on=pool_halves"])  # a phase-I choice
    assert (chosen.filter.detector, chosen.filter.rule) == ("prompts", "paper")
    assert resolve_config(overrides=["pseudo.source=given", "method=coft+"]).filter.detector == "prompts"
    explicit = resolve_config(overrides=["pseudo.source=given", "filter.detector=probe", "filter.rule=paper"])
    assert (explicit.filter.detector, explicit.filter.rule) == ("probe", "paper")
    for overrides, key in ((["filter.detector=probe"], "filter.detector"),  # zero-shot labels
                           (["pseudo.source=given", "method=coft+", "filter.detector=probe"], "filter.detector"),
                           (["pseudo.source=given", "filter.detector=probe", "phase1.train_on=pool_halves"],
                            "phase1.train_on"),
                           (["filter.detector=linear"], "filter.detector"),
                           (["pseudo.source=given", "filter.probe_folds=1"], "filter.probe_folds")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve_config(overrides=overrides)


def test_phase2_losses():
    import torch.nn.functional as F

    from coft_fast.phases.phase2 import classification_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    ce = Config().phase2
    assert torch.equal(classification_loss(logits, labels, ce), F.cross_entropy(logits, labels))
    assert torch.allclose(classification_loss(logits, labels, ce, torch.full((7,), 0.3)), F.cross_entropy(logits, labels))
    weights = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    assert torch.allclose(classification_loss(logits, labels, ce, weights), F.cross_entropy(logits[:1], labels[:1]))
    gce = Config().override(["phase2.loss=gce", "phase2.gce_q=0.5"]).phase2
    p = torch.softmax(logits, 1)[torch.arange(7), labels]
    loss = classification_loss(logits, labels, gce)
    assert torch.allclose(loss, ((1 - p ** 0.5) / 0.5).mean())
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_a_run_with_every_variant_on(tiny_testbed, digits, tmp_path):
    import json

    import coft_fast

    settings = ["phase1.steps=20", "phase1.min_epochs=1", "phase1.vpt_tokens=2", "phase1.n_ctx=4", "phase1.batch_size=32",
                "phase2.epochs=1", "pseudo.top_k=8", "data.num_workers=0", "run.progress=false",
                "phase1.complement_hard_weight=0.5", "filter.rule=mixture", "phase2.loss=gce",
                "phase2.sample_weight=clean_probability"]
    result = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"],
                             out=tmp_path / "run", overrides=settings)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["filter"]["rule"] == "mixture" and result.metrics["final"]["acc1"] >= 0
    assert metrics["phase2"]["s1"]["train_size"] == metrics["filter"]["s1"]["size"]


def test_stratified_halves_split_each_class_in_two():
    from coft_fast.pipeline import stratified_halves

    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 1)
    first, second = stratified_halves(labels, seed=0)
    assert sorted(first.tolist() + second.tolist()) == list(range(12)) and not set(first.tolist()) & set(second.tolist())
    for c in range(3):
        a, b = int((labels[first] == c).sum()), int((labels[second] == c).sum())
        assert a - b in (0, 1)
    again = stratified_halves(labels, seed=0)
    assert torch.equal(first, again[0]) and not torch.equal(first, stratified_halves(labels, seed=1)[0])


def test_selected_cross_entropy():
    import torch.nn.functional as F

    from coft_fast.phases.phase1 import selected_cross_entropy

    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    chosen = torch.tensor([True, False, True, False])
    assert torch.allclose(selected_cross_entropy(logits, labels, chosen), F.cross_entropy(logits[chosen], labels[chosen]))
    none = selected_cross_entropy(logits, labels, torch.zeros(4, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_train_on_keys():
    from coft_fast.api import resolve_config

    assert resolve_config().phase1.train_on == "s_star"  # CoFT's default: the paper's
    assert resolve_config(overrides=["pseudo.source=given"]).phase1.train_on == "s_star"  # clean-labels' too
    assert resolve_config(overrides=["pseudo.source=given", "phase1.train_on=pool_halves"]).phase1.train_on == "pool_halves"
    with pytest.raises(ConfigError, match="phase1.train_on"):
        resolve_config(overrides=["method=coft+", "phase1.train_on=pool_halves"])
    with pytest.raises(ConfigError, match="phase1.train_on"):
        resolve_config(overrides=["phase1.train_on=everything"])


DEFT_SETTINGS = ["phase1.steps=20", "phase1.min_epochs=2", "phase1.vpt_tokens=2", "phase1.n_ctx=4",
                 "phase1.batch_size=32", "phase2.epochs=1", "pseudo.top_k=8", "data.num_workers=0", "run.progress=false"]


@pytest.mark.parametrize("train_on", ["s_star_then_pool", "pool_halves", "s_star_halves"])
def test_runs_that_train_phase1_on_the_pool(tiny_testbed, digits, tmp_path, train_on):
    import json

    import coft_fast

    coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"], out=tmp_path / "run",
                    overrides=DEFT_SETTINGS + [f"phase1.train_on={train_on}"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    model1, model2 = metrics["phase1"]["model1"], metrics["phase1"]["model2"]
    pool = metrics["pool"]["num_images"]
    assert model1["train_on"] == model2["train_on"] == train_on
    if train_on == "pool_halves":
        assert model1["train_size"] + model2["train_size"] == pool and abs(model1["train_size"] - model2["train_size"]) <= 10
    elif train_on == "s_star_halves":
        assert model1["train_size"] + model2["train_size"] == metrics["selection"]["size"]
    else:
        assert model1["train_size"] == pool and model1["pool_stage"]["steps"] >= 20
    assert metrics["filter"]["s1"]["size"] > 0


def test_the_deft_style_stage_resumes_after_a_kill(tiny_testbed, digits, tmp_path):
    """SIGKILL a run in its DeFT-style continuation on the pool: the resumed run ends as an uninterrupted one."""
    from test_train import _finish_and_compare, _kill_and_resume, _train_command, _wait_for, reference_run

    settings = DEFT_SETTINGS + ["phase1.train_on=s_star_then_pool", "phase1.min_epochs=6", "run.checkpoint_seconds=0"]
    command = _train_command(tiny_testbed, digits, settings)
    reference, _, _ = reference_run(command, tmp_path / "whole")
    out = tmp_path / "killed"
    marker = out / "checkpoints" / "phase1_model1_pool_progress.pt"
    assert _kill_and_resume(command, out, lambda process: _wait_for(marker, process)) == "phase1_model1_pool_progress"
    _finish_and_compare(command, out, reference)


def test_confidently_relabelled_issues_join_the_training_set():
    from coft_fast.pseudo.filter import ModelView, validate_given

    # three classes on the axes of a 3-d space; both models share positive prompts, negatives at 45 degrees
    pos = torch.eye(3)
    neg = torch.nn.functional.normalize(torch.eye(3) + 0.2, dim=1)
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05, 0.0], [0.0, 1.0, 0.05], [0.9, 0.1, 0.0]]), dim=1)
    view = ModelView(features, pos, neg)
    given = torch.tensor([0, 1, 2])  # the third is wrong: it looks like class 0
    result = validate_given(view, view, given, logit_scale=20.0)
    assert result.keep1.tolist() == [True, True, False]
    assert result.relabel.tolist() == [-1, -1, 0]
    joined = result.with_relabelled_issues()
    assert joined.keep1.all() and joined.training_labels(1).tolist() == [0, 1, 0]
    shots = torch.tensor([-1, -1, 2])  # a shot is never relabelled
    assert result.with_shots(shots).relabel.tolist() == [-1, -1, -1]
    with pytest.raises(ConfigError, match="phase2.relabel_issues"):
        Config().override(["phase2.relabel_issues=true"]).validate()
    Config().override(["phase2.relabel_issues=true", "pseudo.source=given"]).validate()


def test_coft_plus_rounds_ranked_by_the_peer(tiny_testbed, digits, tmp_path):
    import json

    import coft_fast

    coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"], out=tmp_path / "run",
                    overrides=DEFT_SETTINGS + ["method=coft+", "phase1.rounds=2", "phase1.round_ranking=peer",
                                               "contrastive.queue_size=64"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and metrics["rounds"][1]["model1"]["subset_size"] > 0
    with pytest.raises(ConfigError, match="phase1.round_ranking"):
        Config().override(["phase1.round_ranking=both"]).validate()
