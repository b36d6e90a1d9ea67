import subprocess
import sys

import pytest
import yaml

from coft_fast.cli import run


def test_config_command_applies_overrides(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  batch_size: 32\n")
    assert run(["config", "--config", str(tmp_path / "c.yaml"), "--set", "seed=5", "--set", "model.name=RN50"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 5 and printed["data"]["batch_size"] == 32 and printed["model"]["name"] == "RN50"


def test_bad_key_is_one_clear_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "coft_fast", "config", "--set", "data.batchsize=3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 2
    assert "error: unknown config key 'data.batchsize'" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_images_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "coft_fast", "zeroshot", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 2 and "images not found" in out.stderr


def test_testbed_command(digits, tmp_path, capsys):
    out = tmp_path / "tb"
    code = run(["testbed", "--images", str(digits["pretrain"]), "--per-class", "10", "--seed", "1", "--out", str(out),
                "--no-progress", "--set", "testbed.image_epochs=1", "--set", "testbed.text_steps=5",
                "--set", "testbed.vision_width=32", "--set", "testbed.image_size=16"])
    assert code == 0
    assert "local-dir:" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seed"] == 1 and saved["testbed"]["per_class"] == 10
    import json

    assert json.loads((out / "testbed_report.json").read_text())["num_images"] == 100


@pytest.mark.slow
def test_demo_runs_offline(tmp_path):
    out = subprocess.run(
        ["coft-fast", "demo", "--out", str(tmp_path / "demo"), "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "zero-shot" in out.stdout and "CoFT" in out.stdout and "recipe testbed" in out.stdout
    saved = yaml.safe_load((tmp_path / "demo" / "coft" / "config.yaml").read_text())
    assert saved["phase2"]["logit_adjust"] == 1.0 and saved["zeroshot"]["templates"] == "ensemble"  # the testbed recipe
    metrics = __import__("json").loads((tmp_path / "demo" / "coft" / "metrics.json").read_text())
    assert 0 <= metrics["final"]["acc1"] <= 1
