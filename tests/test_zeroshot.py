import csv
import json

import pytest
import torch

import coft_fast
from coft_fast.cli import run as cli_run
from coft_fast.data.demo import digit_class_names


def recompute_acc1(predictions_csv, class_names):
    with open(predictions_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    hits = sum(row["path"].split("/")[-2] == row["prediction"] for row in rows)
    return hits / len(rows), rows


def test_zeroshot_api_writes_outputs(tiny_testbed, digits, tmp_path):
    out = tmp_path / "zs"
    result = coft_fast.zeroshot(
        digits["test"], digit_class_names(), model=f"local-dir:{tiny_testbed}", out=out,
        overrides=["data.num_workers=0", "run.progress=false", "data.batch_size=100"],
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == len(result.positions) == len(list(digits["test"].rglob("*.png"))) and metrics["num_skipped"] == 0
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert 0.0 <= metrics[key] <= 1.0
    acc1, rows = recompute_acc1(out / "predictions.csv", digit_class_names())
    assert acc1 == pytest.approx(metrics["acc1"])
    assert list(rows[0]) == ["path", "prediction", "confidence"]
    assert all(row["prediction"] in digit_class_names() for row in rows)
    # the full probability rows are there for later phases
    assert result.probabilities.shape == (len(rows), 10)
    torch.testing.assert_close(result.probabilities.sum(1), torch.ones(len(rows)))
    assert (out / "config.yaml").is_file() and (out / "run.log").is_file()


def test_templates_change_the_classifier(tiny_testbed, digits, tmp_path):
    common = dict(model=f"local-dir:{tiny_testbed}", out=None, overrides=["data.num_workers=0", "run.progress=false"])
    single = coft_fast.zeroshot(digits["test"], digit_class_names(), templates="single", **common)
    ensemble = coft_fast.zeroshot(digits["test"], digit_class_names(), templates="ensemble", **common)
    (tmp_path / "t.json").write_text(json.dumps(["a photo of a {}."]))
    from_file = coft_fast.zeroshot(digits["test"], digit_class_names(), templates=str(tmp_path / "t.json"), **common)
    torch.testing.assert_close(single.probabilities, from_file.probabilities)
    assert not torch.allclose(single.text_embeddings, ensemble.text_embeddings)


def test_corrupt_file_is_skipped_and_counted(tiny_testbed, digits, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(digits["test"] / "one", folder / "one")
    shutil.copytree(digits["test"] / "two", folder / "two")
    (folder / "two" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    result = coft_fast.zeroshot(folder, ["one", "two"], model=f"local-dir:{tiny_testbed}", out=out,
                                overrides=["data.num_workers=2", "run.progress=false", "data.batch_size=16"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_skipped"] == 1
    assert "zz_broken.png" in (out / "skipped.csv").read_text()
    assert len(result.positions) == metrics["num_images"] == len(result.source) - 1


def test_cli_zeroshot(tiny_testbed, digits, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(digit_class_names()) + "\n")
    out = tmp_path / "cli"
    code = cli_run(["zeroshot", "--images", str(digits["test"]), "--classes", str(classes),
                    "--model", f"local-dir:{tiny_testbed}", "--out", str(out), "--num-workers", "0",
                    "--no-progress", "--set", "data.batch_size=64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "acc1" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{100 * metrics['acc1']:.2f}" in printed
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 64 and saved["model"]["name"] == f"local-dir:{tiny_testbed}"


def test_unlabelled_flat_folder_writes_predictions_only(tiny_testbed, digits, tmp_path):
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, image in enumerate(sorted((digits["test"] / "three").iterdir())[:5]):
        shutil.copy(image, flat / f"{i}.png")
    out = tmp_path / "out"
    result = coft_fast.zeroshot(flat, digit_class_names(), model=f"local-dir:{tiny_testbed}", out=out,
                                overrides=["data.num_workers=0", "run.progress=false"])
    assert result.metrics == {"num_images": 5, "num_skipped": 0, "templates": "ensemble",
                              "seconds": result.metrics["seconds"]}
    assert (out / "predictions.csv").is_file() and not (out / "metrics.json").exists()


def test_long_class_name_is_refused_before_scoring(tiny_testbed, digits):
    names = digit_class_names()
    names[3] = " ".join(["very"] * 40) + " long three"
    with pytest.raises(Exception, match="class 'very very"):
        coft_fast.zeroshot(digits["test"] / "one", names, model=f"local-dir:{tiny_testbed}", templates="single",
                           overrides=["data.num_workers=0", "run.progress=false"])


def test_zeroshot_on_shared_cifar_with_tiny_testbed(tiny_testbed, cifar_root, tmp_path):
    """The shared images load and score end to end (a digits model: accuracy is not the point)."""
    result = coft_fast.zeroshot(cifar_root / "test", model=f"local-dir:{tiny_testbed}", out=None,
                                overrides=["data.num_workers=0", "run.progress=false", "data.batch_size=1000"])
    assert result.probabilities.shape == (5000, 10) and result.metrics["num_skipped"] == 0


def test_first_per_class_takes_file_name_order(digits):
    from coft_fast.api import load_images
    from coft_fast.testbed_commands import first_per_class

    source = first_per_class(load_images(digits["test"]), 3)
    assert len(source) == 30
    zero = source.class_names.index("zero")
    names = [p.rsplit("/", 1)[-1] for p, label in zip(source.paths, source.labels) if label == zero]
    all_zero = sorted(p.name for p in (digits["test"] / "zero").iterdir())
    assert names == all_zero[:3]
