"""The settings the shots and noisy-label benchmarks build: seeded shot draws and synthetic label noise."""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import e2e_noisy_labels  # noqa: E402
import e2e_shots  # noqa: E402


def test_shot_draws_are_seeded_nested_and_per_class(digits):
    two, four = e2e_shots.draw_shots(digits["pool"], 2, seed=0), e2e_shots.draw_shots(digits["pool"], 4, seed=0)
    assert len(two) == 20 and len(four) == 40
    assert all(Path(path).parent.name == label for path, label in four)  # a shot's folder is its label
    for label in {label for _, label in four}:  # the 2-shot draw is the start of the 4-shot one, per class
        assert [p for p, l in two if l == label] == [p for p, l in four if l == label][:2]
    assert e2e_shots.draw_shots(digits["pool"], 2, seed=0) == two
    assert e2e_shots.draw_shots(digits["pool"], 2, seed=1) != two
    assert e2e_shots.draw_shots(digits["pool"], 0, seed=0) == []


def test_symmetric_noise_flips_exactly_the_share_to_other_classes():
    labels = torch.arange(10).repeat(100)
    noisy = e2e_noisy_labels.add_noise(labels, "symmetric", 0.4, seed=3, lookalike=torch.zeros(10), num_classes=10)
    assert int((noisy != labels).sum()) == 400
    assert torch.equal(noisy, e2e_noisy_labels.add_noise(labels, "symmetric", 0.4, 3, torch.zeros(10), 10))
    assert len(set(noisy[noisy != labels].tolist())) == 10  # spread over the classes


def test_asymmetric_noise_sends_each_class_to_its_lookalike():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    class_features = features.repeat_interleave(2, dim=0)  # two images per class
    lookalike = e2e_noisy_labels.lookalikes(class_features, torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    assert lookalike.tolist() == [1, 0, 1]
    labels = torch.arange(3).repeat_interleave(10)
    noisy = e2e_noisy_labels.add_noise(labels, "asymmetric", 0.3, seed=0, lookalike=lookalike, num_classes=3)
    for c in range(3):
        changed = noisy[(labels == c) & (noisy != labels)]
        assert len(changed) == 3 and set(changed.tolist()) == {lookalike[c].item()}


def test_detection_metrics():
    wrong = torch.tensor([True, True, False, False])
    found = e2e_noisy_labels.detection(torch.tensor([True, False, True, False]), torch.tensor([0.9, 0.8, 0.7, 0.1]),
                                       wrong)
    assert found == {"flagged": 2, "precision": 0.5, "recall": 0.5, "roc auc": 1.0}


def test_clean_labels_diagnosis_scores_a_run_folder(tmp_path):
    import csv
    import json

    import diagnose_clean_labels

    run = tmp_path / "clean-labels_sym40_seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "class_names.json").write_text(json.dumps(["cat", "dog"]))
    pool = [(f"/pool/cat/{i}.jpg", "cat") for i in range(3)] + [("/pool/dog/0.jpg", "cat")]  # the last label is wrong
    with open(tmp_path / "given_sym40_seed0.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *pool])
    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])  # zero-shot ranks row 2 worst
    torch.save({"positions": torch.arange(4), "probabilities": probabilities}, run / "checkpoints" / "zero_shot.pt")
    (run / "metrics.json").write_text(json.dumps({"phase1": {"model1": {"acc1": 0.5}, "model2": {"acc1": 0.25}}}))
    p_clean = [(0.9, 0.8), (0.7, 0.9), (0.6, 0.6), (0.1, 0.3)]  # both models rank the wrong label last
    with open(run / "label_issues.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "given_label", "p_clean_model1", "p_clean_model2", "is_issue"),
                                      *[(path, label, a, b, "true" if min(a, b) <= 0.5 else "false")
                                        for (path, label), (a, b) in zip(pool, p_clean)]])
    row = diagnose_clean_labels.diagnose(run, tmp_path / "given_sym40_seed0.csv")
    assert row["noisy share"] == "25.00"
    assert row["zero-shot auc"] == "0.6667" and row["min rule auc"] == "1.0000" and row["mean rule auc"] == "1.0000"
    assert (row["model1 top-1"], row["model2 top-1"]) == ("50.00", "25.00")
    assert row["kept"] == 3 and row["kept correct"] == "100.00" and row["right labels kept"] == "100.00"
    assert row.get("own confidence auc") is None  # the filter did not record the models' confidences

    # a run whose filter recorded them: the own-confidence column (the out-of-fold ones served only the
    # pool-halves detector, removed in issue 37, and stay empty)
    c1, c2 = torch.tensor([0.9, 0.8, 0.7, 0.2]), torch.tensor([0.1, 0.9, 0.8, 0.6])
    torch.save({"positions": torch.arange(4), "result": {"confidence1": c1, "confidence2": c2}},
               run / "checkpoints" / "filter.pt")
    row = diagnose_clean_labels.diagnose(run, tmp_path / "given_sym40_seed0.csv")
    assert row["own confidence auc"] == "0.6667"  # 1 - min(c1, c2) = [0.9, 0.2, 0.3, 0.8]: row 0 outranks the wrong one
    assert "out-of-fold p_clean auc" not in row and "out-of-fold own confidence auc" not in row


def test_noisy_label_methods_name_only_config_keys_that_exist(tmp_path, monkeypatch):
    import clean_labels_cost
    import common

    from coft_fast.config import Config

    for overrides in [*e2e_noisy_labels.CLEAN_LABELS_OPTIONS.values(), *clean_labels_cost.DETECTORS.values()]:
        Config().override(["pseudo.source=given", *overrides]).validate()  # a removed key raises ConfigError
    assert not {c["method"] for c in e2e_noisy_labels.cells()} & set(e2e_noisy_labels.RETIRED)  # not run any more
    # a committed row of a retired method still renders in the means table
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(e2e_noisy_labels, "RESULTS", tmp_path)
    table = common.CellTable("noisy", e2e_noisy_labels.HEADER, ("method", "noise", "seed"))
    for method, final in (("clean-labels-probe", "56.04"), ("clean-labels-probe-relabel", "55.16")):
        table.rows[(method, "sym40", "0")] = {h: "" for h in e2e_noisy_labels.HEADER} | {
            "method": method, "noise": "sym40", "seed": "0", "final": final}
    e2e_noisy_labels.write(table, tmp_path, stem="noisy")
    text = (tmp_path / "noisy.md").read_text()
    assert "| clean-labels-probe-relabel | sym40 | 0 |" in text
    assert "relabelled issues (removed) | - | - | - | 55.16 (1) |" in text
