"""The run-wide numerics switches behind ``run.tf32`` and ``run.deterministic``, for torch and the kernels.

TF32 applies to torch's float32 matmuls and convolutions and to the Triton kernels' float32 dots
("tf32" against "tf32x3"); under autocast (the default on CUDA) matmuls are bf16 anyway.
Deterministic algorithms (also on when the caller switched them on) make the kernels use one fixed
config instead of autotuning and a GEMM instead of atomic adds, so a resumed run repeats bitwise on
the same GPU model.
"""
from __future__ import annotations

import os

import torch


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for float32 matmuls and cuDNN convolutions; nothing is touched when the
    setting is already in force (torch's default: no TF32), so code reading the legacy flags still works."""
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
    """Apply ``run.tf32`` and ``run.deterministic``. ``deterministic=False`` leaves a deterministic mode
    the caller switched on as it is."""
    set_tf32(tf32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to repeat itself
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
