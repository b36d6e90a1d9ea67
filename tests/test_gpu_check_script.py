"""bench/gpu_check.sh --dry-run (no GPU, no wheels, no environment variables) lists every step of the
prepared device check with its timeout, within the 8-minute budget."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_lists_every_step(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # nothing else: no OUT, no CUDA, no Python env
    existed = (REPO / "gpu_check_out").exists()
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "OUT=./gpu_check_out" in out
    steps = dict(re.findall(r"^step (\S+)\s+timeout\s+(\d+)s: ", out, flags=re.M))
    for name in ("build", "gpu_tests", "bench_queue_loss", "bench_dual_prompt", "bench_pseudo_label_stats",
                 "bench_transductive", "e2e_speed"):
        assert name in steps, out
    assert sum(int(t) for t in steps.values()) <= 480
    lines = {name: next(line for line in out.splitlines() if line.startswith(f"step {name} "))
             for name in steps}
    assert "COFT_BUILD_CUDA=1" in lines["build"] and "pip install --no-deps --no-build-isolation -e ." in lines["build"]
    assert "tests/test_gpu_realistic.py" in lines["gpu_tests"]
    assert "65536,512" in lines["bench_queue_loss"] and "1000,512" in lines["bench_dual_prompt"]
    assert "1281167x1000" in lines["bench_pseudo_label_stats"]
    assert "1281167:1000" in lines["bench_transductive"] and "--device cuda" in lines["bench_transductive"]
    assert "ViT-B-16" in lines["e2e_speed"] and "gpu_check_images.py" in lines["e2e_speed"]
    assert (REPO / "gpu_check_out").exists() == existed  # a dry run writes nothing


def test_gpu_check_rejects_unknown_arguments():
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--now"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--dry-run" in done.stderr


def test_gpu_check_images_are_class_folders(tmp_path):
    import sys

    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check_images.py"), str(tmp_path), "--classes", "3",
                    "--pool", "2", "--test", "1", "--size", "8"], check=True, capture_output=True)
    assert len(list((tmp_path / "pool").glob("class*/*.png"))) == 6
    assert len(list((tmp_path / "test").glob("class*/*.png"))) == 3
