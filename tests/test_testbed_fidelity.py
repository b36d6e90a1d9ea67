"""bench/testbed_fidelity.py on the tiny digits test bed: its cells, resuming, the k-means matching."""
import csv
import itertools
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import testbed_fidelity  # noqa: E402

SMOKE = ["--steps", "2", "--probe-steps", "5", "--shots", "1", "16", "--threads", "1"]


def read_csv(path: Path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_hungarian_accuracy_on_a_hand_built_example():
    clusters = [0, 0, 1, 1, 2, 2, 2]
    labels = [1, 1, 2, 0, 0, 0, 2]
    # the best one-to-one match: cluster 0 -> class 1 (2 right), 2 -> 0 (2 right), 1 -> 2 (1 right)
    assert testbed_fidelity.hungarian_accuracy(clusters, labels, 3) == pytest.approx(5 / 7)
    best = max(sum(match[c] == y for c, y in zip(clusters, labels)) for match in itertools.permutations(range(3)))
    assert best == 5
    # k-means on three separated blobs whose labels are a permutation of the cluster order: 100 %
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    points = centres.repeat_interleave(20, dim=0) + 0.1 * torch.randn(60, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 0, 1]).repeat_interleave(20)
    assert testbed_fidelity.kmeans_accuracy(points, labels, 3, seed=0) == 1.0


def test_cells_follow_the_issue():
    order = testbed_fidelity.cells("t")
    assert {c["method"] for c in order} == set(testbed_fidelity.METHODS)
    coop = sorted((c["shots"], c["seed"]) for c in order if c["method"] == "coop")
    assert coop == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2), (8, 0), (16, 0)]
    for method in ("probe", "zs-init probe"):
        assert sorted((c["shots"], c["seed"]) for c in order if c["method"] == method) == coop
    for method in ("zero-shot", "kmeans", "coop s*", "probe s*", "phase1 s*", "phase1 no-vpt s*"):
        assert [(c["shots"], c["seed"]) for c in order if c["method"] == method] == [(0, 0)]
    configs = testbed_fidelity.phase1_configs()
    assert (configs["coop"].lam, configs["coop"].vpt_tokens) == (0.0, 0)
    assert (configs["phase1"].lam, configs["phase1"].vpt_tokens, configs["phase1"].steps) == (1.0, 20, 1000)
    assert (configs["phase1 no-vpt"].lam, configs["phase1 no-vpt"].vpt_tokens) == (1.0, 0)


def test_reduced_settings_never_write_into_bench_results(tiny_testbed, digits):
    with pytest.raises(SystemExit, match="--results"):
        testbed_fidelity.main(["--testbed", str(tiny_testbed), "--pool", str(digits["pool"]), "--eval",
                               str(digits["test"]), "--tag", "digits", "--steps", "2"])


def test_every_method_runs_writes_the_tables_and_resumes(tiny_testbed, digits, tmp_path, monkeypatch):
    results = tmp_path / "results"
    argv = ["--testbed", str(tiny_testbed), "--pool", str(digits["pool"]), "--eval", str(digits["test"]),
            "--tag", "digits", "--results", str(results), *SMOKE]
    testbed_fidelity.main(argv + ["--cells", "zero-shot:0:0", "kmeans:0:0"])  # a subset first
    header, rows = read_csv(results / "testbed_fidelity.csv")
    assert header[:5] == ["testbed", "method", "shots", "seed", "acc1"]
    assert [(r["method"], r["shots"], r["seed"]) for r in rows] == [("zero-shot", "0", "0"), ("kmeans", "0", "0")]

    testbed_fidelity.main(argv)
    header, rows = read_csv(results / "testbed_fidelity.csv")
    assert header == ["testbed", "method", "shots", "seed", "acc1", "pool_acc1"]
    expected = testbed_fidelity.cells("digits", (1, 16))
    assert [(r["method"], int(r["shots"]), int(r["seed"])) for r in rows] == [
        (c["method"], c["shots"], c["seed"]) for c in expected]
    assert {r["method"] for r in rows} == set(testbed_fidelity.METHODS)
    for row in rows:
        assert row["testbed"] == "digits"
        for column in ("acc1", "pool_acc1"):
            assert 0.0 <= float(row[column]) <= 100.0 and len(row[column].split(".")[1]) == 2
    kmeans = next(r for r in rows if r["method"] == "kmeans")
    assert kmeans["acc1"] == kmeans["pool_acc1"]  # scored on the pool
    table = (results / "testbed_fidelity.md").read_text()
    assert "## digits" in table and "| coop | - | " in table and "CoOp@1 >= probe@1 + 10:" in table
    assert "reduced settings" in table and (results / "testbed_fidelity.png").is_file()

    def never(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(testbed_fidelity, "run_cell", never)
    before = (results / "testbed_fidelity.csv").read_text()
    testbed_fidelity.main(argv)  # every cell is done: nothing runs, nothing changes
    assert (results / "testbed_fidelity.csv").read_text() == before


def test_coop_reads_frozen_features_and_the_zero_shot_probe_starts_at_zero_shot(tiny_testbed, digits):
    from coft_fast.phases.phase1 import encode_with_models

    bed = testbed_fidelity.Bed(tiny_testbed, digits["pool"], digits["test"])
    rows, labels = bed.shot_rows(2, seed=0)
    assert len(rows) == 2 * len(bed.names) and torch.equal(labels, bed.pool[1][rows])
    model = bed.prompt_model(rows, labels, testbed_fidelity.phase1_configs(steps=1)["coop"], seed=0)
    (features,), positions = encode_with_models([model], bed.eval_source, None, bed.device, progress=False)
    assert torch.equal(positions, bed.eval[2])
    assert torch.allclose(features, bed.eval[0], atol=1e-5)  # no visual prompts: the frozen tower's features

    zero_shot = testbed_fidelity.run_cell({"testbed": "t", "method": "zero-shot", "shots": 0, "seed": 0}, bed, {}, 0)
    weight, bias = testbed_fidelity.train_head(bed.pool[0][rows], labels, len(bed.names), 0, steps=0,
                                               init=bed.text * bed.logit_scale)
    assert [testbed_fidelity.pct(a) for a in bed.head_accuracies(weight, bias)] == [zero_shot["acc1"],
                                                                                    zero_shot["pool_acc1"]]
