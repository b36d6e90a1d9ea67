"""pseudo.refine=transclip: TransCLIP's zero-shot solver (coft_fast.pseudo.transductive) and its stage in a run."""
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coft_fast.config import Config, ConfigError
from coft_fast.pseudo.transductive import TextPrior, transclip

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_transductive import transclip_dense  # noqa: E402  (the dense reference)


def planted(rows=800, classes=8, dim=128, noise=0.6, seed=0):
    """Class clusters (noise: the norm of each row's offset from its centre) whose text embeddings
    lean towards the previous class's centre, so zero-shot mislabels a share of every class:
    (features, labels, text)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=generator), dim=1)
    labels = torch.arange(rows) % classes
    offsets = noise / math.sqrt(dim) * torch.randn(rows, dim, generator=generator)
    features = F.normalize(centres[labels] + offsets, dim=1)
    lean = centres.roll(1, 0) + 0.3 / math.sqrt(dim) * torch.randn(classes, dim, generator=generator)
    return features, labels, F.normalize(centres + 0.9 * lean, dim=1)


def accuracy(labels, truth):
    return (labels == truth).double().mean().item()


def test_planted_clusters_that_zero_shot_mislabels_are_recovered():
    features, truth, text = planted()
    prior = TextPrior(features, text, 15.0)
    zero_shot = prior(0, len(features)).argmax(1)
    result = transclip(features, prior)
    assert accuracy(zero_shot, truth) < 0.9
    assert accuracy(result.labels, truth) > 0.98
    assert result.graph == "exact" and result.empty_classes == []
    assert torch.allclose(result.probabilities.sum(1), torch.ones(len(features)), atol=1e-5)


@pytest.mark.parametrize("rows,classes,dim", [(257, 7, 33), (90, 3, 5)])
def test_it_matches_the_dense_reference(rows, classes, dim):
    features, _, text = planted(rows, classes, dim, noise=1.5, seed=rows)
    log_prior = TextPrior(features, text, 15.0)(0, rows)
    ours = transclip(features, log_prior)
    reference = transclip_dense(features, log_prior)
    assert (ours.probabilities - reference).abs().max() < 1e-4
    assert torch.equal(ours.labels, reference.argmax(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_feature_dtypes_give_float32_labels_close_to_float32_inputs(dtype):
    features, _, text = planted(noise=1.5)
    log_prior = TextPrior(features, text, 15.0)(0, len(features))
    ours = transclip(features.to(dtype), log_prior)
    assert ours.log_probabilities.dtype == torch.float32
    agreement = accuracy(ours.labels, transclip(features, log_prior).labels)
    assert agreement == 1.0 if dtype == torch.float64 else agreement > 0.95


def test_deterministic_and_chunked_equals_unchunked():
    features, _, text = planted(rows=333, noise=1.5)
    prior = TextPrior(features, text, 15.0)
    first, second = transclip(features, prior), transclip(features, prior)
    assert torch.equal(first.log_probabilities, second.log_probabilities)
    chunked = transclip(features, prior, chunk_rows=7)
    assert (chunked.log_probabilities.exp() - first.probabilities).abs().max() < 1e-5
    tensor_prior = transclip(features, prior(0, len(features)), chunk_rows=50)
    assert (tensor_prior.probabilities - first.probabilities).abs().max() < 1e-5


def test_fewer_images_than_neighbours_and_an_empty_class_warn(caplog):
    features, _, text = planted(rows=3, classes=3)
    with caplog.at_level(logging.WARNING):
        result = transclip(features, TextPrior(features, text, 15.0))
    assert result.graph == "none" and result.labels.shape == (3,)
    assert "no neighbour term" in caplog.text
    features, truth, text = planted(rows=60, classes=3)
    log_prior = torch.log_softmax(torch.tensor([0.0, 0.0, -80.0]).expand(60, 3) + 20 * features @ text.T * 0, 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = transclip(features, log_prior.contiguous())
    assert 2 in result.empty_classes and "get no image" in caplog.text


def test_bad_inputs_are_named():
    features, _, text = planted(rows=20)
    with pytest.raises(ValueError, match="prior must be"):
        transclip(features, torch.zeros(19, 5))
    with pytest.raises(ValueError, match="features must be"):
        transclip(torch.zeros(0, 4), torch.zeros(0, 5))
    with pytest.raises(ValueError, match="text embeddings"):
        TextPrior(features, text[:, :3], 15.0)


def test_the_config_key_and_the_removed_one():
    assert Config().pseudo.refine == "none"
    Config().override(["pseudo.refine=transclip"]).validate()
    with pytest.raises(ConfigError, match="pseudo.refine"):
        Config().override(["pseudo.refine=trans"]).validate()
    with pytest.raises(ConfigError, match="'pseudo.knn_refine' was removed: use pseudo.refine=knn"):
        Config().override(["pseudo.knn_refine=true"])
    with pytest.raises(ConfigError, match="pseudo.refine=knn"):
        Config.from_dict({"pseudo": {"knn_refine": True}})
    assert Config.from_dict({"pseudo": {"knn_refine": False}}).pseudo.refine == "none"  # an older run's saved config
    with pytest.raises(ConfigError, match="pseudo.refine"):
        Config().override(["pseudo.refine=transclip", "pseudo.source=given"]).validate()


SETTINGS = ["phase2.epochs=2", "pseudo.top_k=8", "data.num_workers=0", "run.progress=false"]


def test_a_run_trains_on_the_refined_labels(digits_testbed, digits, tmp_path):
    import coft_fast

    model = f"local-dir:{digits_testbed['model']}"
    run = coft_fast.train(digits["pool"], model=model, method="self-train", out=tmp_path / "run",
                          overrides=SETTINGS + ["pseudo.refine=transclip"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    pool, selection = metrics["pool"], metrics["selection"]
    assert pool["refine"] == "transclip" and pool["refine_details"]["graph"] == "exact"
    assert metrics["zero_shot"]["pool_acc1"] == pool["zero_shot_label_accuracy"]
    assert pool["pseudo_label_accuracy"] != pool["zero_shot_label_accuracy"]
    assert 0 <= selection["zero_shot_pseudo_label_accuracy"] <= 1
    # S* is the class-balanced top-K of the refined labels, ranked by log z
    zero_shot = torch.load(tmp_path / "run" / "checkpoints" / "zero_shot.pt", weights_only=False)
    refined = torch.load(tmp_path / "run" / "checkpoints" / "refine_transclip.pt", weights_only=False)
    from coft_fast.pseudo.selection import select_top_k

    expected = select_top_k(refined["probabilities"].argmax(1), refined["ranking"], 8, run.class_names)
    names = run.class_names
    want = sorted((run.pool.paths[int(zero_shot["positions"][r])], names[int(l)])
                  for r, l in zip(expected.rows, expected.labels))
    assert sorted(run.clean_sets["s_star"]) == want


def test_a_killed_run_resumes_with_the_refined_labels(tiny_testbed, digits, tmp_path):
    """SIGKILL a run once its refined labels are saved: the resumed run loads them and ends as an uninterrupted one."""
    from test_train import _finish_and_compare, _kill_and_resume, _train_command, _wait_for, reference_run

    # phase II long enough (about a second here) that the kill, polled every 50 ms, lands inside it:
    # at 4 epochs it took 50 ms and a busy CI machine's kill landed after it
    settings = SETTINGS + ["method=self-train", "pseudo.refine=transclip", "phase2.epochs=100",
                           "run.checkpoint_seconds=0"]
    command = _train_command(tiny_testbed, digits, settings)
    reference, _, _ = reference_run(command, tmp_path / "whole")
    out = tmp_path / "killed"
    marker = out / "checkpoints" / "refine_transclip.pt"
    assert _kill_and_resume(command, out, lambda process: _wait_for(marker, process)) in (
        "refine_transclip", "phase2_s_star_progress")
    _finish_and_compare(command, out, reference)
    assert "stage refine_transclip: finished by an earlier run, loaded" in (out / "run.log").read_text()


def test_zeroshot_classifies_the_given_images_transductively(digits_testbed, digits, tmp_path):
    import csv
    import subprocess
    import sys

    out = tmp_path / "zs"
    command = [sys.executable, "-m", "coft_fast", "zeroshot", "--images", str(digits["test"]), "--model",
               f"local-dir:{digits_testbed['model']}", "--out", str(out), "--no-progress",
               "--set", "pseudo.refine=transclip"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refined acc1" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refine"] == "transclip" and 0 < metrics["refined_acc1"] <= 1 and 0 < metrics["acc1"] <= 1
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    truth = {str(path): path.parent.name for path in digits["test"].rglob("*.png")}
    refined_right = sum(row["prediction"] == truth[row["path"]] for row in rows) / len(rows)
    assert abs(refined_right - metrics["refined_acc1"]) < 1e-9


def test_predict_transductive_refines_a_trained_runs_predictions(digits_testbed, digits, tmp_path):
    import csv

    import coft_fast

    model = f"local-dir:{digits_testbed['model']}"
    coft_fast.train(digits["pool"], model=model, method="self-train", out=tmp_path / "run", overrides=SETTINGS)
    plain = coft_fast.predict(tmp_path / "run", digits["test"], out=tmp_path / "plain", progress=False)
    from coft_fast.cli import run as cli  # the command as docs/usage.md shows it

    assert cli(["predict", "--run", str(tmp_path / "run"), "--images", str(digits["test"]), "--out",
                str(tmp_path / "refined"), "--transductive", "--no-progress"]) == 0
    refined = json.loads((tmp_path / "refined" / "metrics.json").read_text())
    assert refined["predictions"] == "transductive" and "predictions" not in plain
    assert abs(refined["inductive"]["acc1"] - plain["acc1"]) < 1e-9  # the classifier's own, as plain predict
    with open(tmp_path / "refined" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"path", "prediction", "confidence", "inductive_prediction", "inductive_confidence"}
    with open(tmp_path / "plain" / "predictions.csv") as handle:
        plain_rows = {row["path"]: row["prediction"] for row in csv.DictReader(handle)}
    assert all(plain_rows[row["path"]] == row["inductive_prediction"] for row in rows)
    run = coft_fast.load_run(tmp_path / "run")
    in_memory = run.predict(digits["test"], transductive=True)
    by_path = {row["path"]: row["prediction"] for row in rows}
    assert [by_path[path] for path in in_memory.paths] == in_memory.predictions


def test_lp_ft_starts_phase_ii_from_a_probe_on_the_frozen_features(digits_testbed, digits, tmp_path):
    """phase2.head_init=probe: with a zero learning rate the saved head is the probe itself."""
    from safetensors.torch import load_file

    import coft_fast
    from coft_fast.linear_probe import train_linear_head

    model = f"local-dir:{digits_testbed['model']}"
    run = coft_fast.train(digits["pool"], model=model, method="self-train", out=tmp_path / "run",
                          overrides=SETTINGS + ["phase2.head_init=probe", "phase2.lr=0", "phase2.weight_decay=0"])
    zero_shot = torch.load(tmp_path / "run" / "checkpoints" / "zero_shot.pt", weights_only=False)
    s_star = torch.load(tmp_path / "run" / "checkpoints" / "phase2_s_star.pt", weights_only=False)
    head = load_file(tmp_path / "run" / "finetuned_s_star.safetensors")
    rows = [run.pool.paths.index(path) for path, _ in run.clean_sets["s_star"]]
    positions = zero_shot["positions"].tolist()
    pool_rows = torch.tensor([positions.index(r) for r in rows])
    labels = torch.tensor([run.class_names.index(name) for _, name in run.clean_sets["s_star"]])
    order = pool_rows.argsort()  # the run trains on its rows in pool order
    weight, bias = train_linear_head(zero_shot["features"][pool_rows[order]], labels[order], len(run.class_names),
                                     generator=torch.Generator().manual_seed(0))
    scale = float(head["head.scale"])
    assert torch.allclose(head["head.weight"], weight / scale, atol=1e-5) and torch.allclose(head["head.bias"], bias, atol=1e-5)
    assert s_star["report"]["steps"] > 0
    with pytest.raises(ConfigError, match="phase2.head_init"):
        Config().override(["phase2.head_init=linear"]).validate()
