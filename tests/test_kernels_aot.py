"""Ahead-of-time compilation of every Triton kernel for real GPU targets, without a GPU.

``python -m coft_fast.kernels.aot`` compiles each kernel with every config the op keeps on the target
(the ops' own pruning), each accepted dtype and d in 256 / 512 / 768 / 1024 (C = 1000, K = 65536), and
reports Triton's shared memory and ptxas's spills. A kept config must fit the target's shared memory,
stay within the op's own estimate (so the pruning is right) and spill at most a few bytes. The old
queue kernel (one tile over the whole of d) fails here with 51 violations at sm_80 / sm_90 (up to
590,080 B of shared memory, 24 KB of spills per thread): ``python -m coft_fast.kernels.aot
--queue-kernel OLD_FILE``. CI runs sm_80 and sm_90 (3-4 min on 2 shared cores); the slow test adds
sm_86, sm_89 (99 KB of shared memory), sm_100 and sm_120.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from coft_fast.kernels import SHARED_MEMORY_BY_CAPABILITY, shared_memory_limit  # noqa: E402


def _ptxas_present() -> bool:
    from pathlib import Path

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


needs_ptxas = pytest.mark.skipif(not _ptxas_present(), reason="triton's bundled ptxas is missing")


def compile_report(tmp_path, targets):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter does not compile
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "coft_fast.kernels.aot", "--targets", *map(str, targets),
                           "--jobs", "2", "--out", str(out)], env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), done.stdout + done.stderr
    report = json.loads(out.read_text())
    print(done.stdout)  # the summary line: how many specialisations, how long
    return done, report


def check_report(done, report, targets):
    assert not report["violations"], "\n".join(report["violations"])
    assert done.returncode == 0, done.stdout + done.stderr
    cases = report["cases"]
    kernels = {case["kernel"] for case in cases}
    assert kernels == {"queue._queue_partial_kernel", "queue._queue_merge_kernel", "dual._dual_partial_kernel",
                       "dual._dual_logit_grad_kernel", "dual._dual_rows_kernel", "dual._clean_probability_kernel",
                       "dual._dual_finalize_kernel"}
    for target in targets:
        whats = " | ".join(case["what"] for case in cases if case["capability"] == target)
        # every (dtype, d, gradient) combination the op accepts has a kept, compiled config on the target
        for pair in ("fp32/fp32", "bf16/bf16", "fp16/fp16", "fp32/bf16"):
            for d in (256, 512, 768, 1024):
                for grad in (False, True):
                    assert f"{pair} d={d} grad={grad} " in whats, (target, pair, d, grad)
        for dtype in ("fp32", "bf16", "fp16"):
            for d in (256, 512, 768, 1024):
                assert f"_dual_partial_kernel {dtype} d={d} " in whats, (target, dtype, d)


@needs_ptxas
def test_aot_every_kept_config_fits_sm80_and_sm90(tmp_path):
    targets = (80, 90)
    done, report = compile_report(tmp_path, targets)
    check_report(done, report, targets)


@pytest.mark.slow
@needs_ptxas
def test_aot_every_kept_config_fits_the_other_targets(tmp_path):
    from coft_fast.kernels.aot import CI_TARGETS, WIDE_TARGETS

    targets = tuple(t for t in WIDE_TARGETS if t not in CI_TARGETS)  # sm_86 / sm_89 / sm_100 / sm_120
    done, report = compile_report(tmp_path, targets)
    check_report(done, report, targets)


# ------------------------------------------------------------------- the pruning alone (no compiler)

@pytest.mark.parametrize("capability", sorted(SHARED_MEMORY_BY_CAPABILITY))
def test_aot_queue_pruning_keeps_a_config_for_every_size(capability, monkeypatch):
    """Whatever d (odd ones too) and dtypes the op accepts, some config fits the target, so the op never
    has to launch one that does not (the old kernel fell back to an untuned one that needed 458,752 B)."""
    # imported before TRITON_INTERPRET is dropped: a first import without it would build the module's
    # kernels for a real GPU, and every later test in this process that launches them would fail
    from coft_fast.kernels.queue_loss import _SHAPES, keep_partial_configs

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_D": bd, "BLOCK_DO": do}, num_warps=w, num_stages=s)
               for m, k, bd, do, w, s in _SHAPES]
    limit = shared_memory_limit(capability)
    for q_item, queue_item in ((4, 4), (2, 2), (4, 2), (2, 4)):
        for d in (1, 16, 48, 100, 256, 512, 768, 1000, 1024, 2048, 4096):
            for with_o in (False, True):
                assert keep_partial_configs(configs, d, q_item, queue_item, with_o, limit), (q_item, queue_item, d)


@pytest.mark.parametrize("capability", sorted(SHARED_MEMORY_BY_CAPABILITY))
def test_aot_dual_pruning_keeps_a_config_for_every_size(capability):
    from coft_fast.kernels.dual_prompt import _tile_config_list, keep_tile_configs

    for item in (4, 2):
        for d in (1, 16, 48, 256, 512, 768, 1024, 4096):
            assert keep_tile_configs(_tile_config_list(), d, item, shared_memory_limit(capability)), (item, d)


def test_aot_shared_memory_limits():
    assert shared_memory_limit(90) == shared_memory_limit((9, 0)) == 232_448  # H100 / H200
    assert shared_memory_limit(80) == 166_912  # A100
    assert shared_memory_limit((7, 5)) == 101_376  # unlisted: the smallest listed
