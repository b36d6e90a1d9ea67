import json

import pytest
import torch
from safetensors.torch import load_file

from coft_fast.data import from_folder
from coft_fast.testbed import (
    biased_caption_classes,
    build_testbed,
    lookalike_classes,
    model_config,
    tiny_config,
)


def test_folder_is_an_open_clip_local_dir(tiny_testbed, digits):
    config = json.loads((tiny_testbed / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 49408
    assert config["model_cfg"]["text_cfg"]["context_length"] >= 32
    assert config["preprocess_cfg"]["size"] == 16
    assert (tiny_testbed / "open_clip_model.safetensors").is_file()
    report = json.loads((tiny_testbed / "testbed_report.json").read_text())
    assert report["num_images"] == len(list(digits["pretrain"].rglob("*.png"))) and set(report["lookalike"]) == set(report["captions_per_class"])


def test_same_seed_same_weights(digits, tmp_path, tiny_testbed):
    source = from_folder(digits["pretrain"])
    cfg = tiny_config(image_epochs=1, text_steps=5)
    build_testbed(source, tmp_path / "a", cfg, seed=3, progress=False)
    build_testbed(source, tmp_path / "b", cfg, seed=3, progress=False)
    build_testbed(source, tmp_path / "c", cfg, seed=4, progress=False)
    a, b, c = (load_file(tmp_path / name / "open_clip_model.safetensors") for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_short_context_is_refused():
    with pytest.raises(ValueError, match="at least 32"):
        model_config(tiny_config(context_length=20))


def test_lookalike_is_the_nearest_other_class():
    weights = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    assert lookalike_classes(weights) == [1, 0, 1]


def test_captions_are_long_tailed_and_name_lookalikes():
    labels = torch.arange(4).repeat_interleave(100)
    cfg = tiny_config(longtail_ratio=10.0, lookalike_share=0.3)
    generator = torch.Generator().manual_seed(0)
    captioned, named, per_class = biased_caption_classes(labels, 4, [1, 0, 3, 2], cfg, generator)
    assert sorted(per_class) == [10, 22, 46, 100]  # 100 * 10 ** (-r / 3), rounded
    assert len(captioned) == len(named) == sum(per_class)
    true = labels[captioned]
    swapped = named != true
    assert torch.equal(named[swapped], torch.tensor([1, 0, 3, 2])[true[swapped]])
    assert 0.15 < swapped.float().mean() < 0.45


def test_unlabelled_images_are_refused(digits, tmp_path):
    source = from_folder(digits["pretrain"])
    source.labels[0] = -1
    with pytest.raises(ValueError, match="every image needs a label"):
        build_testbed(source, tmp_path, tiny_config(), progress=False)
