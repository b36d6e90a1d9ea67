"""After training: load_run, predict (API and CLI), export to open_clip and ONNX, report.html."""
import contextlib
import csv
import json
import re
import shutil
import subprocess
import weakref
from pathlib import Path

import pytest
import torch

import coft_fast
from coft_fast.cli import run as cli
from coft_fast.config import ConfigError

TINY = [
    "phase1.steps=30", "phase1.min_epochs=1", "phase1.vpt_tokens=2", "phase1.n_ctx=4", "phase1.batch_size=32",
    "phase2.epochs=2", "pseudo.top_k=8", "data.num_workers=0", "run.progress=false", "phase2.train_on=both",
]
# ONNX Runtime and PyTorch run the same float32 graph with different kernels
ONNX_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def finished_run(tiny_testbed, digits, tmp_path_factory):
    """A CoFT run on the digits with both clean sets fine-tuned: (TrainResult, run folder)."""
    out = tmp_path_factory.mktemp("finished_run") / "run"
    result = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"], out=out,
                             overrides=TINY)
    return result, out


@contextlib.contextmanager
def hidden(folder: Path):
    """``folder`` renamed away for the block: whatever reads it fails."""
    away = folder.with_name(folder.name + "_hidden")
    folder.rename(away)
    try:
        yield
    finally:
        away.rename(folder)


def some_images(digits, count=6):
    return [str(p) for p in sorted(Path(digits["test"]).glob("*/*.png"))[::97][:count]]


def test_load_run_needs_only_the_run_folder_and_moves_with_it(finished_run, tiny_testbed, digits, tmp_path):
    result, out = finished_run
    moved = tmp_path / "moved_run"
    shutil.copytree(out, moved)
    images = some_images(digits)
    with hidden(tiny_testbed), hidden(Path(digits["pool"])):  # neither the model source nor the pool
        model = coft_fast.load_run(moved)
        prediction = model.predict(images)
    expected = result.predict(images)
    assert prediction.paths == expected.paths == images
    torch.testing.assert_close(prediction.probabilities, expected.probabilities)
    assert model.class_names == result.class_names
    assert model.metrics == json.loads((out / "metrics.json").read_text())
    assert model.config.phase2.train_on == "both" and model.device == torch.device("cpu")
    assert model.to("cpu") is model and sorted(model.classifiers) == ["s1", "s2"]


def test_the_default_classifier_is_the_runs_logit_ensemble(finished_run, digits):
    _, out = finished_run
    model = coft_fast.load_run(out)
    images = torch.stack([model.preprocess(_rgb(p)) for p in some_images(digits)])
    with torch.no_grad():  # make the two heads differ for sure (the tiny run may train them alike)
        model.classifiers["s2"].head.bias.add_(torch.linspace(-3, 3, len(model.class_names)))
        one = [model.classifiers[tag](images) for tag in ("s1", "s2")]
    assert not torch.allclose(one[0].softmax(1) + one[1].softmax(1), ((one[0] + one[1]) / 2).softmax(1) * 2)
    torch.testing.assert_close(model.logits(images), (one[0] + one[1]) / 2)
    single = coft_fast.load_run(out, classifier="s1")
    assert list(single.classifiers) == ["s1"]
    torch.testing.assert_close(single.logits(images), one[0])


def _rgb(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_a_run_without_phase_ii_is_refused_with_the_missing_stage(finished_run, tmp_path):
    _, out = finished_run
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "finetuned_s2.safetensors").unlink()
    (partial / "checkpoints" / "phase2_s2.pt").unlink()
    with pytest.raises(ConfigError, match=r"has not finished phase II: stage phase2_s2 is missing"):
        coft_fast.load_run(partial)
    assert sorted(coft_fast.load_run(partial, classifier="s1").classifiers) == ["s1"]
    (partial / "checkpoints" / "filter.pt").unlink()
    with pytest.raises(ConfigError, match=r"stage filter is missing"):
        coft_fast.load_run(partial, classifier="s2")
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        coft_fast.load_run(tmp_path / "nowhere")


def test_predict_command_streams_csv_and_metrics_like_zeroshot(finished_run, digits, tmp_path):
    result, out = finished_run
    images = tmp_path / "images"
    shutil.copytree(digits["test"], images)
    (images / "seven" / "broken.png").write_bytes(b"not an image")
    assert cli(["predict", "--run", str(out), "--images", str(images), "--out", str(tmp_path / "p"), "--top5",
                "--batch-size", "50", "--no-progress"]) == 0
    with open(tmp_path / "p" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "prediction", "confidence", "top5", "top5_confidence"]
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert set(metrics) == {"num_images", "num_skipped", "acc1", "acc5", "mean_per_class_recall", "num_labelled",
                            "seconds"}
    assert metrics["num_skipped"] == 1 and metrics["num_images"] == len(rows) == result.metrics["final"]["num_images"]
    assert "broken.png" in (tmp_path / "p" / "skipped.csv").read_text()
    # the run's own evaluation of the same images, with the same (ensemble) model
    assert metrics["acc1"] == pytest.approx(result.metrics["final"]["acc1"])
    truth = sum(row["prediction"] == Path(row["path"]).parent.name for row in rows) / len(rows)
    assert metrics["acc1"] == pytest.approx(truth)
    first = rows[0]
    assert first["top5"].split("|")[0] == first["prediction"] and len(first["top5"].split("|")) == 5
    assert float(first["top5_confidence"].split("|")[0]) == pytest.approx(float(first["confidence"]))


def test_predictions_stream_without_holding_earlier_batches(finished_run, digits, tmp_path):
    from coft_fast.inference import predict_to_folder

    _, out = finished_run
    model = coft_fast.load_run(out, classifier="s1")
    source = model.source(str(digits["test"]))
    alive = []
    real_batches = model.batches

    def watched(*args, **kwargs):
        for rows, probabilities, inductive in real_batches(*args, **kwargs):
            # by the time a batch is asked for, every batch before the previous one has been freed
            assert all(ref() is None for ref in alive[:-1]), "predict_to_folder kept earlier batches"
            alive.append(weakref.ref(probabilities))
            yield rows, probabilities, inductive

    model.batches = watched
    metrics = predict_to_folder(model, str(digits["test"]), tmp_path, batch_size=16, progress=False)
    assert len(alive) == -(-len(source) // 16) and metrics["num_images"] == len(source)


def test_export_open_clip_loads_with_open_clip_and_classifies_like_the_run(finished_run, digits, tmp_path):
    import open_clip
    import torch.nn.functional as F
    from safetensors.torch import load_file

    result, out = finished_run
    folder = tmp_path / "exported"
    assert cli(["export", "--run", str(out), "--format", "open_clip", "--out", str(folder)]) == 0
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "classifier.safetensors", "classes.txt",
                 "README.md"):
        assert (folder / name).is_file(), name
    # exactly as the exported README says
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    head = load_file(str(folder / "classifier.safetensors"))
    classes = (folder / "classes.txt").read_text(encoding="utf-8").splitlines()
    assert head["weight"].shape == (len(classes), model.text_projection.shape[1]) and head["logit_scale"].ndim == 0
    images = some_images(digits)
    with torch.no_grad():
        features = F.normalize(model.encode_image(torch.stack([preprocess(_rgb(p)) for p in images])), dim=-1)
        logits = head["logit_scale"] * features @ head["weight"].T + head["bias"]
    run_model = coft_fast.load_run(out, classifier="s1")
    expected = run_model.predict(images)
    assert [classes[i] for i in logits.argmax(1).tolist()] == [run_model.class_names[i] for i in expected.labels.tolist()]
    torch.testing.assert_close(logits.softmax(1), expected.probabilities, rtol=1e-4, atol=1e-5)
    # the object train() returns exports the same model without reading the run folder
    from coft_fast.exporters import export_open_clip

    export_open_clip(result.model, tmp_path / "from_memory", "s1")
    assert (tmp_path / "from_memory" / "classes.txt").read_text() == (folder / "classes.txt").read_text()
    # the text tower is the pre-trained one: the zero-shot text embeddings are unchanged
    original = coft_fast.load_clip(result.config.model.name, device="cpu")
    tokens = original.tokenizer(["a photo of a seven."])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), original.model.encode_text(tokens))


def test_export_names_an_unreadable_model_source(finished_run, tiny_testbed, tmp_path):
    _, out = finished_run
    with hidden(tiny_testbed), pytest.raises(ConfigError, match=re.escape(str(tiny_testbed))):
        coft_fast.export(out, "open_clip", tmp_path / "exported")


def test_export_onnx_matches_pytorch_logits_with_a_dynamic_batch(finished_run, digits, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    _, out = finished_run
    assert cli(["export", "--run", str(out), "--format", "onnx", "--out", str(tmp_path / "onnx"),
                "--classifier", "s2"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    model = coft_fast.load_run(out, classifier="s2")
    assert (tmp_path / "onnx" / "classes.txt").read_text(encoding="utf-8").splitlines() == model.class_names
    for count in (1, 5):
        images = torch.stack([model.preprocess(_rgb(p)) for p in some_images(digits, count)])
        logits = session.run(["logits"], {"images": images.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(logits), model.logits(images), **ONNX_TOLERANCE)


def test_report_is_written_and_rebuilt(finished_run):
    _, out = finished_run
    page = out / "report.html"
    assert page.is_file()
    page.unlink()
    assert cli(["report", "--run", str(out)]) == 0
    text = page.read_text(encoding="utf-8")
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{100 * metrics['final']['acc1']:.1f} %" in text and "http://" not in text and "https://" not in text


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no headless browser: install Debian's chromium (CI does)")
def test_report_renders_in_a_real_browser_with_every_image_and_the_runs_numbers(finished_run, tmp_path):
    _, out = finished_run
    page = tmp_path / "report.html"
    probe = """<script>window.addEventListener('load', () => {
      const images = Array.from(document.images);
      document.body.dataset.images = images.length;
      document.body.dataset.loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
    });</script>"""
    page.write_text((out / "report.html").read_text(encoding="utf-8") + probe, encoding="utf-8")
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    total, loaded = (int(re.search(rf'data-{key}="(\d+)"', body).group(1)) for key in ("images", "loaded"))
    assert total >= 3 and loaded == total  # plots and thumbnails all decode
    metrics = json.loads((out / "metrics.json").read_text())
    assert re.search(rf"id=\"final-acc1\">{100 * metrics['final']['acc1']:.1f} %<", dom)
    assert re.search(rf"id=\"zero-shot-acc1\">{100 * metrics['zero_shot']['acc1']:.1f} %<", dom)
    with open(out / "pseudo_labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = re.search(r'<table id="classes">(.*?)</table>', dom, re.S).group(1)
    cells = {re.search(r'<td class="name">([^<]*)</td>', row).group(1): re.findall(r"<td>([^<]*)</td>", row)
             for row in re.findall(r"<tr>(.*?)</tr>", table) if 'class="name"' in row}
    assert sorted(cells) == sorted(metrics["selection"]["per_class"])
    for name, values in cells.items():
        pool_images, pool_true, s_star, kept, _ = values
        assert int(pool_images) == sum(r["zero_shot_label"] == name for r in rows)
        assert int(pool_true) == sum(r["pool_label"] == name for r in rows)
        assert int(s_star) == metrics["selection"]["per_class"][name]
        assert int(kept) == sum(r["model1_label"] == name and r["kept1"] == "1" for r in rows)


def test_the_report_summary_is_one_bounded_pass_over_the_pool():
    from coft_fast.run_report import THUMBNAILS_PER_STRIP, PoolSummary, class_table

    summary = PoolSummary(seed=3)
    rows = [{"path": f"{i}.png", "zero_shot_label": "cat" if i % 3 else "dog", "model1_label": "cat" if i % 2 else "dog",
             "model2_label": "cat", "kept1": "1" if i % 5 else "0", "pool_label": "cat" if i % 4 else "dog"}
            for i in range(1000)]
    for row in rows:
        summary.add(row)
    for (label, kind), sample in summary.samples.items():
        assert len(sample) == THUMBNAILS_PER_STRIP
        assert all(r["model1_label"] == label and (r["kept1"] == "1") == (kind == "kept") for r in sample)
    table = {entry["class"]: entry for entry in class_table(summary, {"selection": {"per_class": {"cat": 4}}},
                                                            ["cat", "dog"])}
    kept_cat = [r for r in rows if r["model1_label"] == "cat" and r["kept1"] == "1"]
    assert table["cat"]["kept"] == len(kept_cat) and table["cat"]["s_star"] == 4 and table["dog"]["s_star"] is None
    assert table["cat"]["precision"] == sum(r["pool_label"] == "cat" for r in kept_cat) / len(kept_cat)
    assert table["dog"]["pool_images"] == sum(r["zero_shot_label"] == "dog" for r in rows)
    assert table["dog"]["pool_true"] == sum(r["pool_label"] == "dog" for r in rows)
