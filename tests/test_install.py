"""The installed package, seen from outside the checkout."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_outside(code, tmp_path):
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_kernels_are_installed_as_coft_fast_kernels(tmp_path):
    out = run_outside(
        "import coft_fast.kernels as k, importlib.util as u\n"
        "print(k.__file__)\nprint(u.find_spec('kernels') is None)\nprint(k.triton_installed())",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    path, no_top_level, triton = out.stdout.split()
    assert Path(path).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert no_top_level == "True", "a top-level `kernels` package must not be installed"
    assert triton == "True"


def test_triton_runnable_on_cpu_only_when_interpreting(monkeypatch):
    import torch

    import coft_fast.kernels as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.triton_runnable(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not kernels.triton_runnable(torch.device("cpu"))


def test_public_api(tmp_path):
    out = run_outside("import coft_fast; print(coft_fast.__version__, callable(coft_fast.zeroshot))", tmp_path)
    assert out.returncode == 0 and out.stdout.split()[1] == "True", out.stderr


def test_console_script_and_module_entry(tmp_path):
    for command in (["coft-fast", "--help"], [sys.executable, "-m", "coft_fast", "--help"]):
        out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for sub in ("zeroshot", "testbed", "demo"):
            assert sub in out.stdout
