"""``run.tf32`` (torch's float32 matmuls and convolutions, the Triton kernels' float32 dots) and
``run.deterministic`` (the kernels use one fixed config and a GEMM instead of atomic adds, so a resumed
run repeats bitwise on the same GPU model)."""
from __future__ import annotations

import os

import torch


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32; nothing is touched when the setting is already in force (legacy flags stay)."""
    from coft_fast.kernels import tf32_enabled

    if tf32_enabled() == enabled:
        return
    precision = "tf32" if enabled else "ieee"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the legacy flags must not be mixed in
        matmul.fp32_precision = precision
    else:  # pragma: no cover - older torch
        matmul.allow_tf32 = enabled
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = precision
    else:  # pragma: no cover - older torch
        torch.backends.cudnn.allow_tf32 = enabled


def set_numerics(tf32: bool, deterministic: bool) -> None:
    """Apply ``run.tf32`` and ``run.deterministic`` (False leaves a caller's deterministic mode on)."""
    set_tf32(tf32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to repeat itself
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
