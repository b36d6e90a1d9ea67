"""Triton kernels of coft_fast, installed as ``coft_fast.kernels`` (sources live in ``kernels/``).

Kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how CI checks them against the plain-torch references.

Modules: ``dual_prompt`` (the phase-I head: loss and p_clean), ``queue_loss`` (InfoNCE against a
momentum queue). Kernels upcast to fp32 when interpreting (the interpreter mishandles bf16
arithmetic) and then use one autotune config; on a GPU they keep half-precision operands for
``tl.dot`` with fp32 accumulation, and fp32 operands follow torch's TF32 setting (``dot_precision``).
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


def require_runnable(tensor: torch.Tensor) -> None:
    """Raise a clear error when a Triton kernel cannot run on ``tensor``'s device."""
    if not triton_installed():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not triton_runnable(tensor.device):
        raise RuntimeError(
            f"backend='triton' cannot run on {tensor.device} tensors: it needs CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before coft_fast.kernels is imported"
        )


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in under the interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(*dtypes: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands (half-precision operands ignore it).

    Follows torch's matmul setting: "tf32" when ``torch.backends.cuda.matmul.allow_tf32`` is on,
    otherwise "tf32x3" (three TF32 tensor-core products, about fp32 accuracy at a fraction of the
    cost of "ieee" FMA). The interpreter computes in numpy and gets "ieee"."""
    if interpreting() or torch.float32 not in dtypes:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
