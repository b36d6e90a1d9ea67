"""Triton kernels of coft_fast, installed as ``coft_fast.kernels`` (sources live in ``kernels/``).

Kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how CI checks them against the plain-torch references.
"""
from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runnable(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device``."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting()
