"""CoFT+: the momentum encoder's EMA, the key queue's resume, the round loop, a whole tiny run."""
import json
import os

import pytest
import torch
import torch.nn as nn

import coft_fast
from coft_fast.config import Phase2Config
from coft_fast.models.momentum import MomentumContrast, ema_update_

from test_train import TINY


def test_ema_update_matches_the_formula_per_tensor():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 3, 4), (1,)]
    targets = [torch.randn(s, generator=generator) for s in shapes]
    sources = [torch.randn(s, generator=generator) for s in shapes]
    expected = [0.999 * t + 0.001 * s for t, s in zip(targets, sources)]
    ema_update_(targets, sources, 0.999)
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="2 target tensors but 1 source"):
        ema_update_(targets[:2], sources[:1], 0.5)
    with pytest.raises(ValueError, match="momentum must be in"):
        ema_update_(targets, sources, 1.5)


@pytest.mark.parametrize("projection_dim", [0, 6])
def test_momentum_contrast_updates_every_key_tensor_and_nothing_else(projection_dim):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8))
    contrast = MomentumContrast(encoder, 8, queue_size=10, momentum=0.9, projection_dim=projection_dim)
    assert not any(p.requires_grad for p in contrast.key_encoder.parameters())
    with torch.no_grad():  # the trained side moves away from the momentum copy
        for parameter in list(encoder.parameters()) + list(contrast.projection.parameters()):
            parameter.add_(torch.randn_like(parameter))
    targets, sources = contrast.online_pairs(encoder)
    expected = [0.9 * t.clone() + 0.1 * s.detach() for t, s in zip(targets, sources)]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    contrast.update_(encoder)
    for got, want in zip(contrast.online_pairs(encoder)[0], expected):
        torch.testing.assert_close(got, want)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert len(targets) == len(list(encoder.parameters())) + (4 if projection_dim else 0)


def test_the_queue_starts_as_unit_vectors_and_wraps_around():
    contrast = MomentumContrast(nn.Linear(3, 4), 4, queue_size=5, momentum=0.5, seed=3)
    torch.testing.assert_close(contrast.queue.norm(dim=1), torch.ones(5))
    keys = torch.arange(12, dtype=torch.float32).view(3, 4)
    contrast.push_(keys)
    contrast.push_(keys)
    assert int(contrast.ptr) == 1
    torch.testing.assert_close(contrast.queue[:1], keys[2:])  # the 6th key wrapped to row 0
    torch.testing.assert_close(contrast.queue[1:5], torch.cat([keys[1:], keys[:2]]))


def test_keys_are_gathered_before_they_are_queued():
    gathered = []

    def gather(keys):  # stands in for all_gather over two ranks
        gathered.append(keys)
        return torch.cat([keys, -keys])

    contrast = MomentumContrast(nn.Linear(3, 4), 4, queue_size=8, momentum=0.5, gather=gather)
    keys = torch.ones(2, 4)
    contrast.push_(keys)
    assert len(gathered) == 1 and int(contrast.ptr) == 4
    torch.testing.assert_close(contrast.queue[:4], torch.cat([keys, -keys]))


def _contrastive_phase2(parts, checkpoint, writer=None):
    from coft_fast.phases.phase2 import ContrastiveTerm, build_classifier, train_phase2

    clip, images, labels, num_classes = parts
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(num_classes, clip.model.visual.output_dim), dim=-1)
    classifier = build_classifier(clip.model.visual, text, 10.0, "zeroshot", 0)
    contrast = MomentumContrast(classifier.visual, text.shape[1], queue_size=24, momentum=0.9, projection_dim=8, seed=1)
    term = ContrastiveTerm(contrast, torch.arange(len(images)), gamma=1.0, temperature=0.1)
    cfg = Phase2Config(epochs=3, batch_size=8, lr=0.01)
    rows = torch.arange(0, len(images), 2)
    report = train_phase2(classifier, images, rows, labels[rows], cfg, seed=5, device=torch.device("cpu"),
                          precision="fp32", checkpoint=checkpoint, checkpoint_seconds=0.0, progress=False,
                          writer=writer, tag="s1", contrastive=term)
    return classifier, contrast, report


class _StopAtEpoch:
    """A TensorBoard writer stand-in that kills the run when epoch ``epoch`` logs (after the previous checkpoint)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def add_scalar(self, name, value, step):
        if step == self.epoch:
            raise KeyboardInterrupt


def test_the_queue_and_momentum_encoder_resume_from_a_checkpoint(phase2_parts, tmp_path):
    classifier, contrast, report = _contrastive_phase2(phase2_parts, tmp_path / "straight.pt")
    assert len(report["history"]) == 3 and all("contrastive" in entry for entry in report["history"])
    assert int(contrast.ptr) == (3 * 3 * 8) % 24  # 3 epochs x 3 steps x 8 keys through a 24-key queue

    with pytest.raises(KeyboardInterrupt):
        _contrastive_phase2(phase2_parts, tmp_path / "killed.pt", writer=_StopAtEpoch(1))
    resumed_classifier, resumed_contrast, resumed_report = _contrastive_phase2(phase2_parts, tmp_path / "killed.pt")
    assert resumed_report["history"] == report["history"]
    for got, want in ((resumed_contrast, contrast), (resumed_classifier, classifier)):
        state, expected = got.state_dict(), want.state_dict()
        assert state.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(state[key], expected[key], msg=key)


@pytest.fixture(scope="module")
def coft_plus_run(tiny_testbed, digits, tmp_path_factory):
    """A tiny CoFT+ run, recording each phase-I model's state when its training starts."""
    import coft_fast.stages.prompt_tuning as prompt_tuning

    started = []
    real = prompt_tuning.train_phase1

    def recording(model, *args, **kwargs):
        started.append((kwargs["tag"], {k: v.detach().clone() for k, v in model.state_dict().items()},
                        {k: v.clone() for k, v in model.clip.model.state_dict().items()}))
        report = real(model, *args, **kwargs)
        started[-1] += ({k: v.detach().clone() for k, v in model.state_dict().items()},)
        return report

    out = tmp_path_factory.mktemp("coft_plus")
    frozen = {k: v.clone() for k, v in coft_fast.load_clip(f"local-dir:{tiny_testbed}").model.state_dict().items()}
    prompt_tuning.train_phase1 = recording
    try:
        result = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"], out=out,
                                 method="coft+", overrides=TINY)
    finally:
        prompt_tuning.train_phase1 = real
    return result, out, started, frozen


def test_coft_plus_writes_rounds_and_the_contrastive_loss(coft_plus_run):
    result, out, _, _ = coft_plus_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "coft+"
    rounds = metrics["rounds"]
    assert [entry["round"] for entry in rounds] == [1, 2, 3]
    for entry in rounds:
        for model in ("model1", "model2"):
            assert entry[model]["subset_size"] > 0
            assert 0 <= entry[model]["subset_label_accuracy"] <= 1 and 0 <= entry[model]["pool_label_accuracy"] <= 1
    assert rounds[0]["model1"]["subset_size"] == metrics["selection"]["size"]  # round 1 trains on S*
    assert rounds[-1]["model1"]["pool_label_accuracy"] == metrics["phase1"]["model1"]["pool_label_accuracy"]
    pool_size = metrics["pool"]["num_images"]
    for entry in rounds:  # label-free signs of each round: agreement, and what each model calls the pool
        assert 0 <= entry["agreement"] <= 1
        for model in ("model1", "model2"):
            counts = entry[model]["pool_class_counts"]
            assert list(counts) == list(metrics["selection"]["per_class"]) and sum(counts.values()) == pool_size
    assert rounds[-1]["agreement"] == metrics["filter"]["agreement"]  # the last round's models are the filter's
    losses = metrics["phase2"]["s1"]["contrastive_loss"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert metrics["contrastive"]["queue_size"] == max(int(0.25 * metrics["pool"]["num_images"]), 64)
    assert {"phase1", "round_labels", "filter", "phase2"} <= set(metrics["timings"])
    assert (out / "rounds.png").is_file() and (out / "finetuned_s1.safetensors").is_file()
    assert 0 <= metrics["final"]["acc1"] <= 1


def test_each_round_starts_from_fresh_prompts_and_the_untouched_pre_trained_model(coft_plus_run, tiny_testbed):
    from coft_fast.config import Phase1Config
    from coft_fast.phases.phase1 import make_prompt_model
    from coft_fast.stages.prompt_tuning import round_seed

    result, _, started, frozen = coft_plus_run
    assert [tag for tag, *_ in started] == ["model1", "model2", "round2/model1", "round2/model2", "round3/model1",
                                            "round3/model2"]
    clip = coft_fast.load_clip(f"local-dir:{tiny_testbed}")
    cfg = Phase1Config(steps=30, min_epochs=1, vpt_tokens=2, n_ctx=4, batch_size=32)
    trained_before = []
    for number, (tag, initial, clip_state, trained) in enumerate(started):
        round_, index = number // 2 + 1, number % 2 + 1
        seed = round_seed(index, round_)  # run seed 0, phase1.seeds [1, 2]
        fresh = make_prompt_model(clip, result.class_names, cfg, seed, torch.device("cpu")).state_dict()
        for key in fresh:  # the initial state is the fresh initialisation of this round's seed ...
            torch.testing.assert_close(initial[key], fresh[key], msg=f"{tag} {key}")
            for earlier in trained_before:  # ... and shares nothing with a trained model of an earlier round
                assert not torch.equal(initial[key], earlier[key]), f"{tag} {key}"
        for key, value in frozen.items():  # the frozen CLIP never changes between rounds
            assert torch.equal(clip_state[key], value), f"{tag} changed the pre-trained {key}"
        trained_before.append(trained)


def _plus_command(tiny_testbed, digits):
    from test_train import KILL_SETTINGS, _train_command

    return _train_command(tiny_testbed, digits, KILL_SETTINGS + ["method=coft+", "phase1.rounds=2"])


@pytest.fixture(scope="module")
def uninterrupted_plus_run(tiny_testbed, digits, tmp_path_factory):
    from test_train import reference_run

    return reference_run(_plus_command(tiny_testbed, digits), tmp_path_factory.mktemp("plus_whole"))


def test_coft_plus_killed_in_a_later_round_and_in_contrastive_phase_ii_resumes_to_the_same_metrics(
        tiny_testbed, digits, tmp_path, uninterrupted_plus_run):
    from test_train import _finish_and_compare, _kill_and_resume, _wait_for

    command, out = _plus_command(tiny_testbed, digits), tmp_path / "killed"
    for marker in ("round2_phase1_model1_progress.pt", "phase2_s1_progress.pt"):
        stage = _kill_and_resume(command, out, lambda process: _wait_for(out / "checkpoints" / marker, process))
        assert stage is not None
    metrics = uninterrupted_plus_run[0]
    assert len(metrics["rounds"]) == 2 and metrics["phase2"]["s1"]["contrastive_loss"]
    _finish_and_compare(command, out, metrics)


PLUS_STAGES = ["zero_shot", "phase1_model1", "phase1_model2", "round1_labels", "round2_phase1_model1",
               "round2_phase1_model2", "filter", "phase2_s1"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(int(os.environ.get("COFT_FAULT_SEEDS", "4"))))
def test_coft_plus_fault_injection_sweep(tiny_testbed, digits, tmp_path, uninterrupted_plus_run, seed):
    """CoFT+'s share of the sweep (pytest -m slow -k fault_injection -s): killed at a random moment of every stage."""
    from test_train import _random_kill_sweep

    _random_kill_sweep(tmp_path / "coft_plus", _plus_command(tiny_testbed, digits), uninterrupted_plus_run,
                       PLUS_STAGES, seed=200 + seed)
