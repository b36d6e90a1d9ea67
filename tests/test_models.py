import os
import subprocess
import sys

import open_clip
import pytest
import torch

from coft_fast.models import WeightsUnavailableError, load_clip, needs_quick_gelu
from coft_fast.models.loading import is_torchscript_archive


def test_quick_gelu_for_openai_weights():
    assert needs_quick_gelu("ViT-B-16", "openai")
    assert not needs_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not needs_quick_gelu("ViT-B-16", None)
    assert needs_quick_gelu("ViT-B-16-quickgelu", "some/file.pt")


def test_torchscript_checkpoint_files_need_quick_gelu(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "openai.pt"))
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "plain.pt")
    assert is_torchscript_archive(str(tmp_path / "openai.pt"))
    assert not is_torchscript_archive(str(tmp_path / "plain.pt"))
    assert needs_quick_gelu("ViT-B-32", str(tmp_path / "openai.pt"))
    assert not needs_quick_gelu("ViT-B-32", str(tmp_path / "plain.pt"))


def _activation(clip):
    return type(clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_local_checkpoint_path_round_trip(tmp_path):
    model = open_clip.create_model("ViT-S-32")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    clip = load_clip("ViT-S-32", str(tmp_path / "weights.pt"))
    for (name, a), b in zip(model.state_dict().items(), clip.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _activation(clip) == "GELU"
    assert _activation(load_clip("ViT-S-32", None, quick_gelu=True)) == "QuickGELU"
    assert clip.context_length == 77 and clip.image_size == 224


def test_local_dir_model(tiny_testbed):
    clip = load_clip(f"local-dir:{tiny_testbed}", pretrained="openai")  # the tag is ignored for folders
    assert clip.context_length == 32 and clip.image_size == 16
    assert clip.tokenizer(["a photo of a one."]).shape == (1, 32)
    assert not clip.model.training


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model name 'ViT-Q-99'"):
        load_clip("ViT-Q-99")
    with pytest.raises(WeightsUnavailableError, match="neither a known open_clip tag"):
        load_clip("ViT-S-32", "no_such_tag")
    with pytest.raises(WeightsUnavailableError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")


def test_offline_download_says_how_to_supply_weights():
    code = (
        "from coft_fast.models import load_clip\n"
        "try:\n    load_clip('ViT-B-32', 'openai')\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "WeightsUnavailableError" in out.stdout, out.stdout + out.stderr
    assert "--pretrained" in out.stdout and "local-dir" in out.stdout
