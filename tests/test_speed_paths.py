"""The switches between the fast path and the research code's naive one: each runs and computes the
same things (the benchmark bench/e2e_speed.py measures how fast)."""
import pytest
import torch

import coft_fast
from coft_fast.data import from_folder
from coft_fast.data.dali import dali_available
from coft_fast.data.streaming import StreamedImages, resolve_decoder
from coft_fast.runtime.device import run_padded

from test_train import TINY

NAIVE = ["data.resident=never", "data.decoder=pil", "phase1.text_encoding=separate", "run.op_backend=eager",
         "run.reuse=false", "model.precision=fp32", "run.compile=false"]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def test_run_padded_gives_the_unpadded_rows():
    seen = []

    def double(x):
        seen.append(x.shape[0])
        return 2 * x

    x = torch.arange(6.0).view(3, 2)
    torch.testing.assert_close(run_padded(double, x, 5), 2 * x)
    torch.testing.assert_close(run_padded(double, x, 3), 2 * x)
    assert seen == [5, 3]


def test_decoder_choice():
    assert resolve_decoder("auto", torch.device("cpu")) == "pil"
    assert resolve_decoder("pil", torch.device("cpu")) == "pil"
    with pytest.raises(ValueError, match="data.decoder"):
        resolve_decoder("turbo", torch.device("cpu"))


@pytest.mark.parametrize("decoder", ["pil", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="nvidia-dali is not installed"))])
def test_streamed_epochs_are_seeded_and_cover_the_rows(digits, decoder):
    source = from_folder(digits["pool"])
    streamed = StreamedImages(source, list(range(0, 60, 3)), 16, MEAN, STD, decoder, num_workers=0)
    rows = torch.arange(len(streamed))

    def epoch(seed, **kw):
        return list(streamed.epoch_batches(rows, 8, torch.Generator().manual_seed(seed), 0.5, **kw))

    first, again, other = epoch(1), epoch(1), epoch(2)
    assert sorted(torch.cat([picked for _, picked in first]).tolist()) == rows.tolist()
    assert [b.shape for b, _ in first] == [(8, 3, 16, 16), (8, 3, 16, 16), (4, 3, 16, 16)]
    for (a, pa), (b, pb) in zip(first, again):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(a, b)
    assert not all(torch.equal(pa, pb) for (_, pa), (_, pb) in zip(first, other))
    views = epoch(1, views=2, drop_last=True)
    assert len(views) == 2 and not torch.equal(views[0][0][0], views[0][0][1])  # two different augmentations


@pytest.fixture(scope="module")
def fast_and_naive(tiny_testbed, digits, tmp_path_factory):
    runs = {}
    for name, extra in (("fast", []), ("naive", NAIVE)):
        runs[name] = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"],
                                     out=tmp_path_factory.mktemp(name), overrides=TINY + extra).metrics
    return runs


def test_the_naive_path_runs_the_same_method(fast_and_naive):
    fast, naive = fast_and_naive["fast"], fast_and_naive["naive"]
    # zero-shot scoring and the top-K selection do not depend on the switches
    assert fast["pool"] == naive["pool"] and fast["selection"] == naive["selection"]
    assert fast["zero_shot"]["acc1"] == naive["zero_shot"]["acc1"]
    for metrics in (fast, naive):
        assert metrics["phase1"]["model1"]["steps"] == 30 and 0 <= metrics["final"]["acc1"] <= 1


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
def test_a_run_decoding_with_dali(tiny_testbed, digits, tmp_path):
    metrics = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"],
                              out=tmp_path, method="coft+",
                              overrides=TINY + ["data.decoder=dali", "data.resident=never", "phase1.rounds=2"]).metrics
    assert len(metrics["rounds"]) == 2 and metrics["phase2"]["s1"]["contrastive_loss"]
    assert 0 <= metrics["final"]["acc1"] <= 1


def test_compiled_models_only_ever_see_one_batch_shape(tiny_testbed, digits, tmp_path, monkeypatch):
    """With run.compile the training batches are whole and the inference batches padded, so a compiled
    model never meets a second shape (no recompiles); torch.compile itself is replaced by a recorder."""
    shapes = []

    def recording_compile(module, **kwargs):
        def call(images):
            shapes.append((getattr(module, "__name__", type(module).__name__), tuple(images.shape)))
            return module(images)

        return call

    monkeypatch.setattr(torch, "compile", recording_compile)
    coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", eval_images=digits["test"], out=tmp_path,
                    overrides=TINY + ["run.compile=true", "data.batch_size=100", "phase2.batch_size=16"])
    by_model = {}
    for name, shape in shapes:
        by_model.setdefault(name, set()).add(shape)
    assert set(by_model) == {"_ImageFeatures", "VisionTransformer", "FineTunedClassifier"}, by_model
    assert all(len(found) == 1 for found in by_model.values()), by_model


def test_training_images_stream_when_they_exceed_the_memory_budget(tiny_testbed, digits, tmp_path, caplog):
    caplog.set_level("INFO", logger="coft_fast")
    metrics = coft_fast.train(digits["pool"], model=f"local-dir:{tiny_testbed}", out=tmp_path,
                              overrides=TINY + ["data.resident_max_gb=0"]).metrics
    assert "more than data.resident_max_gb=0: decoding them every epoch (pil)" in caplog.text
    assert metrics["phase2"]["s1"]["steps"] > 0
