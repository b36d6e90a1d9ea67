"""A few labelled shots (--labeled) and noisy given labels (clean-labels, pseudo.source=given)."""
import csv
import json
from pathlib import Path

import pytest
import torch

import coft_fast
from coft_fast.config import ConfigError
from coft_fast.data import from_folder
from coft_fast.data.sources import DataError, ImageSource, add_shots
from coft_fast.pseudo.filter import ModelView, generate_and_validate, validate_given
from coft_fast.pseudo.label_issues import LABEL_ISSUES_HEADER, issue_scores
from coft_fast.pseudo.selection import select_top_k

TINY = [
    "phase1.steps=30", "phase1.min_epochs=1", "phase1.vpt_tokens=2", "phase1.n_ctx=4", "phase1.batch_size=32",
    "phase2.epochs=2", "pseudo.top_k=8", "data.num_workers=0", "run.progress=false",
]


def test_shots_take_the_first_places_of_their_class_and_the_rest_is_filled_by_confidence():
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 2])
    confidence = torch.tensor([0.9, 0.5, 0.7, 0.6, 0.8, 0.95, 0.3])
    shots = torch.tensor([-1, 1, -1, -1, -1, -1, 0])  # row 1: a shot of class 1 (zero-shot said 0); row 6 of 0
    selection = select_top_k(labels, confidence, 2, ["a", "b", "c"], shots)
    assert selection.rows.tolist() == [6, 0, 1, 5]  # per class: shots first, then the most confident
    assert selection.labels.tolist() == [0, 0, 1, 1]
    assert selection.counts.tolist() == [2, 2, 0]
    # more shots than K: every shot is kept, nothing else
    many = torch.tensor([0, 0, 0, -1, -1, -1, -1])
    selection = select_top_k(labels, confidence, 2, ["a", "b", "c"], many)
    assert selection.rows.tolist() == [0, 1, 2, 5, 3, 6] and selection.counts.tolist() == [3, 2, 1]
    # no shots: exactly the plain selection
    plain = select_top_k(labels, confidence, 2, ["a", "b", "c"])
    same = select_top_k(labels, confidence, 2, ["a", "b", "c"], torch.full((7,), -1))
    assert torch.equal(plain.rows, same.rows) and torch.equal(plain.counts, same.counts)


def _views():
    eye = torch.eye(3)
    view1 = ModelView(features=eye.clone(), pos=eye.clone(), neg=torch.zeros(3, 3))
    view2 = ModelView(features=torch.tensor([[1.0, 0, 0]] * 3), pos=eye.clone(), neg=-eye.clone())
    return view1, view2


def test_a_shot_is_never_filtered_out_and_trains_on_its_own_label():
    result = generate_and_validate(*_views(), logit_scale=10.0)
    assert result.keep1.tolist() == [True, False, False]
    shots = torch.tensor([-1, 2, -1])
    with_shots = result.with_shots(shots)
    assert with_shots.keep1.tolist() == [True, True, False] and with_shots.keep2.tolist() == [True, True, False]
    assert with_shots.training_labels(1).tolist() == [0, 2, 2]  # model 1's labels, the shot's in row 1
    assert with_shots.training_labels(2).tolist() == [0, 2, 0]
    assert with_shots.labels1.tolist() == [0, 1, 2]  # the models' own predictions are unchanged


def test_given_labels_are_kept_only_when_both_models_accept_them():
    view1, view2 = _views()
    given = torch.tensor([0, 1, 0])
    result = validate_given(view1, view2, given, logit_scale=10.0)
    # row 0: both models accept class 0; row 1: model 2 sees class 0 (p_clean of 1 low); row 2: model 1 sees class 2
    assert result.keep1.tolist() == [True, False, False] and torch.equal(result.keep1, result.keep2)
    assert torch.equal(result.training_labels(1), given) and torch.equal(result.training_labels(2), given)
    scores = issue_scores(result)
    assert scores[0] < 0.5 <= min(scores[1], scores[2])  # an issue iff score >= 1 - threshold
    assert issue_scores(result.with_shots(torch.tensor([-1, 1, -1])), torch.tensor([-1, 1, -1]))[1] == 0


def test_add_shots_appends_new_images_and_labels_pool_images_once(tmp_path):
    pool = ImageSource([str(tmp_path / "a.png"), str(tmp_path / "b.png")], [-1, -1], ["cat", "dog"], "pool")
    shots = ImageSource([str(tmp_path / "b.png"), str(tmp_path / "c.png")], [1, 0], ["cat", "dog"], "shots.csv")
    merged, shot_labels = add_shots(pool, shots)
    assert merged.paths == [str(tmp_path / n) for n in ("a.png", "b.png", "c.png")]
    assert shot_labels == [-1, 1, 0] and merged.labels == [-1, -1, 0] and merged.origin == "pool"
    unlabelled = ImageSource([str(tmp_path / "d.png")], [-1], ["cat", "dog"], "flat_shots")
    with pytest.raises(DataError, match="flat_shots.*needs a label for every image"):
        add_shots(pool, unlabelled)


def test_bad_inputs_name_the_file(tiny_testbed, digits, tmp_path):
    shots = tmp_path / "shots.csv"
    image = next((digits["test"] / "seven").iterdir())
    shots.write_text(f"path,label\n{image},seven\n{image.parent / '0000.png'},zebra\n")
    with pytest.raises(DataError, match=f"{shots}.*'zebra' is not one of the 10 class names"):
        coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", overrides=TINY, labeled=shots)
    flat = tmp_path / "flat"
    flat.mkdir()
    for source in sorted((digits["test"] / "seven").iterdir())[:3]:
        (flat / source.name).write_bytes(source.read_bytes())
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(from_folder(digits["pool"]).class_names))
    with pytest.raises(DataError, match=f"{flat}: pseudo.source=given .* 3 of 3 have none"):
        coft_fast.clean_labels(flat, classes, model=f"local-dir:{tiny_testbed}", overrides=TINY)
    with pytest.raises(ConfigError, match="train_on"):
        coft_fast.clean_labels(digits["pool"], model=f"local-dir:{tiny_testbed}", overrides=TINY + ["phase2.train_on=both"])


def _rows(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_with_shots_keeps_every_shot(tiny_testbed, digits, tmp_path):
    """Two shots per class, one of them also a pool image: all are in S*, kept by the filter in both sets,
    marked in pseudo_labels.csv and counted in metrics.json; CoFT+'s later rounds keep them too."""
    pool = from_folder(digits["pool"])
    test = from_folder(digits["test"])
    rows, taken = [], {}
    for image, label in zip(test.paths, test.labels):
        if taken.get(label, 0) < 1:
            taken[label] = 1
            rows.append((image, test.class_names[label]))
    in_pool = pool.paths[0]
    rows.append((in_pool, pool.class_names[pool.labels[0]]))
    with open(tmp_path / "shots.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    out = tmp_path / "run"
    result = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", out=out, method="coft+",
                             overrides=TINY + ["phase1.rounds=2", "contrastive.gamma=0"], labeled=tmp_path / "shots.csv")
    metrics = result.metrics
    assert metrics["shots"]["total"] == 11 and metrics["shots"]["per_class"][pool.class_names[pool.labels[0]]] == 2
    assert metrics["pool"]["num_images"] == len(pool) + 10  # the 10 test images joined the pool, the pool image did not
    table = _rows(out / "pseudo_labels.csv")
    shot_rows = [row for row in table if row["shot"] == "1"]
    assert {row["path"] for row in shot_rows} == {path for path, _ in rows}
    assert all(row["kept1"] == "1" and row["kept2"] == "1" for row in shot_rows)
    trained = dict(result.clean_sets["s1"])
    assert all(trained[path] == label for path, label in rows)  # the shots train on their own labels
    assert [entry["model1"]["next_subset_shots"] for entry in metrics["rounds"][:-1]] == [11]  # round 2 keeps them
    assert [entry["model2"]["next_subset_shots"] for entry in metrics["rounds"][:-1]] == [11]


@pytest.fixture(scope="module")
def flipped_run(digits_testbed, digits, tmp_path_factory):
    """clean-labels on the digits pool as a CSV with its true labels, except one deliberately flipped:
    the image zero-shot CLIP is surest of, labelled with the class it finds least likely."""
    model = f"local-dir:{digits_testbed['model']}"
    pool = from_folder(digits["pool"])
    zero_shot = coft_fast.zeroshot(digits["pool"], model=model, templates="single", out=None)
    probabilities = zero_shot.probabilities
    truth = torch.tensor([pool.labels[i] for i in zero_shot.positions.tolist()])
    own = probabilities.gather(1, truth[:, None]).squeeze(1)
    row = int(torch.where(probabilities.argmax(1) == truth, own, torch.zeros_like(own)).argmax())
    path = pool.paths[int(zero_shot.positions[row])]
    wrong = pool.class_names[int(probabilities[row].argmin())]
    labels = {p: pool.class_names[l] for p, l in zip(pool.paths, pool.labels)}
    labels[path] = wrong
    work = tmp_path_factory.mktemp("flipped")
    with open(work / "given.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *labels.items()])
    classes = work / "classes.txt"
    classes.write_text("\n".join(pool.class_names))
    out = work / "run"
    result = coft_fast.clean_labels(work / "given.csv", classes, model=model, eval_images=digits["test"], out=out,
                                    overrides=["phase1.steps=60", "phase1.vpt_tokens=2", "phase2.epochs=2",
                                               "data.num_workers=0", "run.progress=false"])
    return result, out, path, wrong


def test_label_issues_flag_a_deliberately_flipped_label(flipped_run):
    result, out, path, wrong = flipped_run
    table = _rows(out / "label_issues.csv")
    assert list(table[0]) == LABEL_ISSUES_HEADER
    assert len(table) == result.metrics["pool"]["num_images"]
    flipped = next(row for row in table if row["path"] == path)
    assert flipped["given_label"] == wrong and flipped["is_issue"] == "true"
    scores = [float(row["issue_score"]) for row in table]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    # is_issue is exactly "not kept", and the kept images are what phase II trained on
    issues = {row["path"] for row in table if row["is_issue"] == "true"}
    assert len(issues) == result.metrics["label_issues"]["issues"]
    assert {p for p, _ in result.clean_sets["s1"]} == {row["path"] for row in table} - issues
    assert all(result.clean_sets["s1"][i][1] == dict((r["path"], r["given_label"]) for r in table)[p]
               for i, (p, _) in enumerate(result.clean_sets["s1"][:20]))
    per_class = result.metrics["label_issues"]["per_class"]
    assert sum(entry["issues"] for entry in per_class.values()) == len(issues)
    assert [row.path for row in result.label_issues] == [row["path"] for row in table]
    assert (out / "label_issue_scores.png").is_file() and (out / "finetuned_s1.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"]["source"] == "given" and metrics["pool"]["pseudo_label_accuracy"] is None
    assert coft_fast.load_run(out).class_names == result.class_names  # a clean-labels run is a model like any other
    pseudo = {row["path"]: row for row in _rows(out / "pseudo_labels.csv")}
    assert all(pseudo[row["path"]]["given_label"] == row["given_label"] for row in table)
    assert all((pseudo[row["path"]]["kept1"] == "0") == (row["is_issue"] == "true") for row in table)
    report = (out / "report.html").read_text()
    assert "By the given label" in report and "given: " in report and "label_issue_scores.png" in report


def test_shots_from_a_coop_split_json(tmp_path, digits):
    """--labeled with --labeled-split reads CoOp's split files; without the split the error names the file."""
    from coft_fast.config import Config
    from coft_fast.data import load_source

    pool = from_folder(digits["pool"])
    entries = [[str(Path(path).relative_to(digits["test"])), label, pool.class_names[label]]
               for path, label in list(zip(from_folder(digits["test"]).paths, from_folder(digits["test"]).labels))[:5]]
    split = digits["test"] / "split_zhou_digits.json"
    split.write_text(json.dumps({"train": entries, "test": entries}))
    try:
        cfg = Config()
        cfg.override([f"data.labeled={split}", "data.labeled_split=train"])
        shots = load_source(cfg.data.labeled, pool.class_names, split=cfg.data.labeled_split)
        merged, shot_labels = add_shots(pool, shots)
        assert sum(label >= 0 for label in shot_labels) == 5 and len(merged) == len(pool) + 5
        with pytest.raises(DataError, match="split_zhou_digits.json is a CoOp split file: choose a split"):
            load_source(split, pool.class_names)
    finally:
        split.unlink()
