import json

import pytest
import torch
from safetensors.torch import load_file

from coft_fast.data import from_folder
from coft_fast.testbed_builder import (
    biased_caption_classes,
    build_testbed,
    lookalike_classes,
    model_config,
    preset_config,
)


def test_folder_is_an_open_clip_local_dir(tiny_testbed, digits):
    config = json.loads((tiny_testbed / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 49408
    assert config["model_cfg"]["text_cfg"]["context_length"] >= 32
    assert config["preprocess_cfg"]["size"] == 16
    assert (tiny_testbed / "open_clip_model.safetensors").is_file()
    report = json.loads((tiny_testbed / "testbed_report.json").read_text())
    assert report["num_images"] == len(list(digits["pretrain"].rglob("*.png"))) and set(report["lookalike"]) == set(report["captions_per_class"])
    # the machine, as builds with the bf16 teacher differ between CPU kinds
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu"]
    assert isinstance(report["machine"]["native_bf16"], bool)


def test_same_seed_same_weights(digits, tmp_path, tiny_testbed):
    source = from_folder(digits["pretrain"])
    cfg = preset_config("tiny", image_epochs=1, text_steps=5)
    build_testbed(source, tmp_path / "a", cfg, seed=3, progress=False)
    build_testbed(source, tmp_path / "b", cfg, seed=3, progress=False)
    build_testbed(source, tmp_path / "c", cfg, seed=4, progress=False)
    a, b, c = (load_file(tmp_path / name / "open_clip_model.safetensors") for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_short_context_is_refused():
    with pytest.raises(ValueError, match="at least 32"):
        model_config(preset_config("tiny", context_length=20))


def test_lookalike_is_the_nearest_other_class():
    weights = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    assert lookalike_classes(weights) == [1, 0, 1]


def test_captions_are_long_tailed_and_name_lookalikes():
    labels = torch.arange(4).repeat_interleave(100)
    cfg = preset_config("tiny", longtail_ratio=10.0, lookalike_share=0.3)
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
        build_testbed(source, tmp_path, preset_config("tiny"), progress=False)


# --- presets, several sources, teacher distillation, resumable builds (issue 27) ---

def test_strong_preset_strengthens_the_image_tower_and_keeps_the_biased_text_tower():
    from coft_fast.config import TESTBED_PRESET_HELP, TESTBED_PRESETS, TestbedConfig
    from coft_fast.testbed_builder import TEXT_TOWER_FIELDS, preset_config

    default, strong = TestbedConfig(), preset_config("strong")
    assert preset_config("default") == default
    assert strong.teacher_width > 0 and strong.distill_weight > 0 and strong.image_epochs > default.image_epochs
    # the same text tower, its look-alike bias raised so that zero-shot stays weak over stronger features
    assert all(getattr(strong, name) == getattr(default, name) for name in TEXT_TOWER_FIELDS if name != "lookalike_share")
    assert default.lookalike_share < strong.lookalike_share < 0.45
    assert default.teacher_width == 0  # the default test bed (the tables, tests and demo) has no teacher
    assert set(TESTBED_PRESET_HELP) == set(TESTBED_PRESETS)


def test_unknown_preset_lists_the_presets(digits, tmp_path):
    import coft_fast
    from coft_fast.config import ConfigError

    with pytest.raises(ConfigError, match="unknown test-bed preset 'strongest'.*default, strong, clip-like, digits, tiny"):
        coft_fast.testbed(digits["pretrain"], tmp_path / "tb", preset="strongest")
    from coft_fast.cli import build_parser

    assert "strong" in build_parser()._subparsers._group_actions[0].choices["testbed"].format_help()


def test_preset_fields_sit_under_overrides(digits, tmp_path):
    import coft_fast
    import yaml

    coft_fast.testbed(digits["pretrain"], tmp_path / "tb", preset="tiny", per_class=5,
                      overrides=["testbed.image_epochs=1", "testbed.text_steps=3", "run.progress=false"])
    saved = yaml.safe_load((tmp_path / "tb" / "config.yaml").read_text())["testbed"]
    assert saved["image_epochs"] == 1 and saved["vision_width"] == 32  # --set wins, the preset fills the rest
    assert json.loads((tmp_path / "tb" / "testbed_report.json").read_text())["preset"] == "tiny"


def _split_digits(digits, tmp_path, move_class=None):
    """The digits pretrain folder as two sources (even / odd files); ``move_class`` leaves that class
    out of the second one."""
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    for folder in sorted(p for p in digits["pretrain"].iterdir() if p.is_dir()):
        for index, image in enumerate(sorted(folder.iterdir())):
            target = first if index % 2 == 0 or folder.name == move_class else second
            (target / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target / folder.name / image.name)
    return first, second


def test_several_sources_are_pooled(digits, tmp_path):
    import coft_fast

    first, second = _split_digits(digits, tmp_path)
    report = coft_fast.testbed([first, second], tmp_path / "tb", preset="tiny",
                               overrides=["testbed.image_epochs=1", "testbed.text_steps=3", "run.progress=false"])
    assert report["num_images"] == len(list(digits["pretrain"].rglob("*.png")))
    assert report["source"] == f"{first} + {second}"


def test_bad_sources_are_named(digits, tmp_path):
    import coft_fast
    from coft_fast.data import DataError, combine_sources, from_folder

    first, second = _split_digits(digits, tmp_path, move_class="three")
    quick = dict(preset="tiny", overrides=["testbed.image_epochs=1", "testbed.text_steps=3", "run.progress=false"])
    with pytest.raises(DataError, match=f"{second}: its class folders disagree with {first}'s \\(missing: three; extra: none\\)"):
        coft_fast.testbed([first, second], tmp_path / "tb", **quick)
    with pytest.raises(DataError, match=f"images not found: {tmp_path / 'nope'}"):
        coft_fast.testbed([first, tmp_path / "nope"], tmp_path / "tb", **quick)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no images in {tmp_path / 'empty'}"):
        coft_fast.testbed([first, tmp_path / "empty"], tmp_path / "tb", **quick)
    names = from_folder(first).class_names
    with pytest.raises(DataError, match="sub-folder 'three' matches no class name"):
        coft_fast.testbed([first], tmp_path / "tb", classes=[n for n in names if n != "three"], **quick)
    with pytest.raises(DataError, match="is in both"):
        combine_sources([from_folder(first), from_folder(first)])
    # with --classes a source may lack a class, but some source must have it
    only_second = from_folder(second, names)
    with pytest.raises(DataError, match="no images of class three in any source"):
        combine_sources([only_second, only_second.subset([])], classes_given=True)
    assert not (tmp_path / "tb" / "open_clip_config.json").exists()


def test_teacher_distillation_is_deterministic_and_reported(digits, tmp_path):
    source = from_folder(digits["pretrain"])
    cfg = preset_config("tiny", image_epochs=1, text_steps=5, teacher_width=4, teacher_epochs=1)
    reports = [build_testbed(source, tmp_path / name, cfg, seed=3, progress=False) for name in "ab"]
    a, b = (load_file(tmp_path / name / "open_clip_model.safetensors") for name in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert 0.0 <= reports[0]["teacher_train_accuracy"] <= 1.0 and reports[0]["resumed_epochs"] == {"teacher": 0, "image_tower": 0}
    plain = build_testbed(source, tmp_path / "c", preset_config("tiny", image_epochs=1, text_steps=5), seed=3, progress=False)
    c = load_file(tmp_path / "c" / "open_clip_model.safetensors")
    assert plain["teacher_train_accuracy"] is None and not all(torch.equal(a[k], c[k]) for k in a)


def test_text_only_rebuild_reuses_the_image_tower(digits, tmp_path):
    source = from_folder(digits["pretrain"])
    cfg = preset_config("tiny", image_epochs=2, text_steps=5, teacher_width=4, teacher_epochs=1)
    build_testbed(source, tmp_path / "tb", cfg, seed=0, progress=False)
    first = load_file(tmp_path / "tb" / "open_clip_model.safetensors")
    report = build_testbed(source, tmp_path / "tb", preset_config("tiny", image_epochs=2, text_steps=5, teacher_width=4,
                                                                 teacher_epochs=1, lookalike_share=0.1),
                           seed=0, progress=False)
    again = load_file(tmp_path / "tb" / "open_clip_model.safetensors")
    assert report["resumed_epochs"] == {"teacher": 1, "image_tower": 2}
    assert report["build_seconds_all_builds"] > report["build_seconds"]  # the first build's training counts
    assert all(torch.equal(first[k], again[k]) for k in first if k.startswith("visual."))
    # another image-side setting or seed trains the image tower again
    report = build_testbed(source, tmp_path / "tb", cfg, seed=1, progress=False)
    assert report["resumed_epochs"] == {"teacher": 0, "image_tower": 0}


def test_killed_build_never_loads_and_resumes_to_the_same_weights(digits, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from coft_fast.models import load_clip

    command = [sys.executable, "-m", "coft_fast", "testbed", "--images", str(digits["pretrain"]), "--preset", "tiny",
               "--no-progress", "--set", "testbed.image_epochs=40", "--set", "testbed.teacher_width=4",
               "--set", "testbed.teacher_epochs=2", "--set", "testbed.text_steps=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(command + ["--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True,
                               timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = tmp_path / "killed"
    state = killed / "build_state" / "image_tower.pt"
    process = subprocess.Popen(command + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists(), "the build finished or failed before its first image-tower epoch was saved"
    assert not (killed / "open_clip_config.json").exists()
    with pytest.raises(Exception):
        load_clip(f"local-dir:{killed}")
    resumed = subprocess.run(command + ["--out", str(killed)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((killed / "testbed_report.json").read_text())
    assert report["resumed_epochs"]["teacher"] == 2 and 1 <= report["resumed_epochs"]["image_tower"] < 40
    a, b = (load_file(folder / "open_clip_model.safetensors") for folder in (tmp_path / "whole", killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(killed.rglob(".*.tmp"))
    load_clip(f"local-dir:{killed}")


@pytest.mark.slow
def test_scaled_down_strong_preset_builds_and_classifies(digits, tmp_path):
    """The strong preset's recipe (teacher, distillation, more epochs) at digits' size: it builds,
    its teacher and tower learn, and it loads and classifies."""
    import coft_fast

    report = coft_fast.testbed(digits["pretrain"], tmp_path / "tb", preset="strong", overrides=[
        "testbed.image_size=16", "testbed.vision_width=64", "testbed.vision_layers=2", "testbed.embed_dim=64",
        "testbed.text_width=64", "testbed.text_layers=1", "testbed.image_batch_size=64", "testbed.image_epochs=6",
        "testbed.teacher_epochs=20", "testbed.teacher_batch_size=64", "testbed.text_steps=100", "run.progress=false"])
    assert report["config"]["teacher_width"] == 16 and report["teacher_train_accuracy"] > 0.8
    assert report["stage1_train_accuracy"] > 0.25  # the distilled tower learns (chance: 0.1)
    result = coft_fast.zeroshot(digits["test"], model=f"local-dir:{tmp_path / 'tb'}", out=tmp_path / "zs",
                                overrides=["run.progress=false"])
    # the biased text tower at this size (about 70 images a class, long-tailed captions) may be near chance
    assert 0.0 <= result.metrics["acc1"] <= 1.0 and result.metrics["num_images"] == len(list(digits["test"].rglob("*.png")))


def test_public_testbed_stays_callable_after_the_builder_is_imported():
    """The builder module must not shadow coft_fast.testbed() (a submodule import rebinds the name)."""
    import coft_fast
    import coft_fast.testbed_builder  # noqa: F401

    assert callable(coft_fast.testbed)


# --- image-grounded captions (issue 36) ---

def test_attribute_words_rank_each_image_along_its_class_directions():
    from coft_fast.testbed_training import ATTRIBUTE_WORDS, attribute_ranks

    generator = torch.Generator().manual_seed(0)
    # class 0 spreads along axis 0 (strongly) and axis 1 (weakly); class 1 along axis 2
    spread = torch.tensor([[3.0, 0.5, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    labels = torch.arange(2).repeat_interleave(200)
    features = torch.randn(400, 4, generator=generator) * spread[labels] + 5 * torch.eye(4)[labels]
    ranks = attribute_ranks(features, labels, 2, directions=2)
    assert ranks.shape == (400, 2) and len(set(ATTRIBUTE_WORDS)) == len(ATTRIBUTE_WORDS)
    # each image's first word is a side of direction 0 (its class's main axis) for most images, and its
    # sign follows the offset's sign along that axis (the principal direction's own sign is arbitrary)
    assert (ranks[:, 0] // 2 == 0).float().mean() > 0.8
    offset = features[:200, 0] - features[:200, 0].mean()
    main = ranks[:200, 0] // 2 == 0
    side = ranks[:200, 0][main] % 2
    agree = (side == (offset[main] < 0).long()).float().mean()
    assert agree in (0.0, 1.0)
    assert set(ranks[:, :2].flatten().tolist()) <= set(range(4))
    with pytest.raises(ValueError, match="attribute_directions"):
        attribute_ranks(features, labels, 2, directions=len(ATTRIBUTE_WORDS))


def test_grounded_captions_build_a_loadable_test_bed(digits, tmp_path):
    import coft_fast

    source = from_folder(digits["pretrain"])
    cfg = preset_config("tiny", image_epochs=1, text_steps=4, text_batch_size=16, caption_attributes=2, attribute_directions=3)
    report = build_testbed(source, tmp_path / "tb", cfg, seed=0, progress=False)
    assert report["config"]["caption_attributes"] == 2 and report["stage2_final_loss"] > 0
    clip = coft_fast.load_clip(f"local-dir:{tmp_path / 'tb'}")
    assert clip.model.encode_text(clip.tokenizer(["a photo of a dark small zero."])).shape[-1] == cfg.embed_dim


def test_clip_like_preset_is_strongs_image_tower_under_a_grounded_text_tower(digits):
    from coft_fast.testbed_builder import TEXT_TOWER_FIELDS, build_fingerprint, preset_config

    strong, clip_like = preset_config("strong"), preset_config("clip-like")
    source = from_folder(digits["pretrain"])
    # the same image side: a clip-like build reuses a strong folder's build_state/ (a text-only rebuild)
    assert build_fingerprint(source, strong, 0) == build_fingerprint(source, clip_like, 0)
    changed = {name for name in TEXT_TOWER_FIELDS if getattr(strong, name) != getattr(clip_like, name)}
    assert changed == {"caption_attributes", "text_steps", "lookalike_share"} and clip_like.caption_attributes > 0
