"""Triton kernels of coft_fast, installed as ``coft_fast.kernels`` (sources live in ``kernels/``).

Kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how CI checks them against the plain-torch references.

Modules: ``dual_prompt`` (the phase-I head: loss and p_clean), ``queue_loss`` (InfoNCE against a
momentum queue), ``aot`` (compiles them ahead of time for sm_80 / sm_90 without a GPU and reports
shared memory and spills; tests/test_kernels_aot.py). Configs are pruned per GPU with
``shared_memory_limit`` / ``device_shared_memory``. Kernels upcast to fp32 when interpreting (the interpreter mishandles bf16
arithmetic) and then use one autotune config; on a GPU they keep half-precision operands for
``tl.dot`` with fp32 accumulation, and fp32 operands follow torch's TF32 setting (``dot_precision``).
"""
from __future__ import annotations

import importlib.util
import os

import torch


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # once: torch.compile traces a constant


def triton_installed() -> bool:
    return _TRITON_INSTALLED


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

    Follows torch's matmul setting (``run.tf32``, see ``tf32_enabled``): "tf32" when TF32 is allowed,
    otherwise "tf32x3" (three TF32 tensor-core products, about fp32 accuracy at a fraction of the
    cost of "ieee" FMA). The interpreter computes in numpy and gets "ieee"."""
    if interpreting() or torch.float32 not in dtypes:
        return "ieee"
    return "tf32" if tf32_enabled() else "tf32x3"


def tf32_enabled() -> bool:
    """Whether torch's float32 matmuls may use TF32 (``run.tf32``), read through the API that set it:
    torch >= 2.9 raises when the legacy ``allow_tf32`` flag is read after the new ``fp32_precision``
    was set."""
    matmul = torch.backends.cuda.matmul
    for precision in (getattr(matmul, "fp32_precision", "none"), getattr(torch.backends, "fp32_precision", "none")):
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # the two APIs mixed: torch's own state is ambiguous, take full precision
        return False


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Shared memory one block may use (opt-in maximum), by compute capability (CUDA programming guide,
# "Technical specifications per compute capability"): A100 / H100 / H200 / B200 and the consumer parts.
SHARED_MEMORY_BY_CAPABILITY = {
    (8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
    (9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448, (11, 0): 232_448, (12, 0): 101_376, (12, 1): 101_376,
}
UNKNOWN_TARGET_SHARED_MEMORY = 101_376  # the smallest of the table, for a capability it does not list
INTERPRETER_SHARED_MEMORY = 232_448  # the interpreter has no limit; prune as for sm_90


def shared_memory_limit(capability) -> int:
    """Bytes of shared memory a block may use on a GPU of ``capability`` ((major, minor) or e.g. 90)."""
    if isinstance(capability, int):
        capability = divmod(capability, 10)
    return SHARED_MEMORY_BY_CAPABILITY.get(tuple(capability), UNKNOWN_TARGET_SHARED_MEMORY)


def device_shared_memory(device: torch.device) -> int:
    """Shared memory per block on ``device`` (the driver's figure where torch reports it)."""
    if device.type != "cuda":
        return INTERPRETER_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device)
    reported = getattr(props, "shared_memory_per_block_optin", 0)
    return int(reported) if reported else shared_memory_limit((props.major, props.minor))


def deterministic() -> bool:
    """Whether kernels must use one fixed reduction order: ``torch.use_deterministic_algorithms(True)``
    (which ``run.deterministic`` sets). Then the autotuners are bypassed for one fixed config and the
    dual-prompt backward replaces its atomic adds by a GEMM."""
    return torch.are_deterministic_algorithms_enabled()


def bucket(n: int) -> int:
    """Autotune key of a size: its next power of two, so a new batch size rarely re-tunes."""
    return next_power_of_2(max(1, int(n)))
