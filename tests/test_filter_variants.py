"""The filter variants that stayed (filter.rule=mixture, phase2.loss=gce, phase1.round_ranking=peer, the
probe detector): each a config key whose default is the paper's behaviour. The ones that lost are in
bench/results/archive/removed_options.md."""
import pytest
import torch

from coft_fast.config import Config, ConfigError


def _result(labels1, labels2, p1, p2, threshold=0.5):
    from coft_fast.pseudo.filter import FilterResult

    p1, p2 = torch.tensor(p1, dtype=torch.float64), torch.tensor(p2, dtype=torch.float64)
    return FilterResult(torch.tensor(labels1), torch.tensor(labels2), p1, p2, p1 > threshold, p2 > threshold)


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
    bad = {"filter.rule": "vote", "phase2.loss": "mae", "phase2.gce_q": 0}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Config().override([f"{key}={value}"]).validate()
    with pytest.raises(ConfigError, match="filter.rule"):  # the agreement rule lost everywhere: removed
        Config().override(["filter.rule=agreement"]).validate()
    defaults = Config()
    assert (defaults.filter.rule, defaults.phase2.loss) == ("auto", "ce")


def test_detector_keys_resolve_and_are_validated_by_name():
    from coft_fast.api import resolve_config

    coft = resolve_config()
    assert (coft.filter.detector, coft.filter.rule) == ("prompts", "paper")  # CoFT: the paper's filter
    given = resolve_config(overrides=["pseudo.source=given"])  # clean-labels
    assert (given.filter.detector, given.filter.rule) == ("probe", "mixture")
    chosen = resolve_config(overrides=["pseudo.source=given", "filter.detector=prompts"])  # phase I's models judge
    assert (chosen.filter.detector, chosen.filter.rule) == ("prompts", "paper")
    assert resolve_config(overrides=["pseudo.source=given", "method=coft+"]).filter.detector == "prompts"
    explicit = resolve_config(overrides=["pseudo.source=given", "filter.detector=probe", "filter.rule=paper"])
    assert (explicit.filter.detector, explicit.filter.rule) == ("probe", "paper")
    for overrides, key in ((["filter.detector=probe"], "filter.detector"),  # zero-shot labels
                           (["pseudo.source=given", "method=coft+", "filter.detector=probe"], "filter.detector"),
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
                "filter.rule=mixture", "phase2.loss=gce"]
    result = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"],
                             out=tmp_path / "run", overrides=settings)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["filter"]["rule"] == "mixture" and result.metrics["final"]["acc1"] >= 0
    assert metrics["phase2"]["s1"]["train_size"] == metrics["filter"]["s1"]["size"]


TINY_SETTINGS = ["phase1.steps=20", "phase1.min_epochs=2", "phase1.vpt_tokens=2", "phase1.n_ctx=4",
                 "phase1.batch_size=32", "phase2.epochs=1", "pseudo.top_k=8", "data.num_workers=0", "run.progress=false"]


def test_coft_plus_rounds_ranked_by_the_peer(tiny_testbed, digits, tmp_path):
    import json

    import coft_fast

    coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"], out=tmp_path / "run",
                    overrides=TINY_SETTINGS + ["method=coft+", "phase1.rounds=2", "phase1.round_ranking=peer",
                                               "contrastive.queue_size=64"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and metrics["rounds"][1]["model1"]["subset_size"] > 0
    with pytest.raises(ConfigError, match="phase1.round_ranking"):
        Config().override(["phase1.round_ranking=both"]).validate()
