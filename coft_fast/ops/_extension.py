"""Loads ``coft_fast._C`` (``torch.ops.coft_fast.*``); without it, its ops raise an error saying how to build it."""
from __future__ import annotations

from typing import Optional

import torch

BUILD_HINT = (
    "the coft_fast C++ extension (coft_fast._C) is not available: {error}. Build it with "
    "`pip install --no-build-isolation -e .` in the repository root (after torch), or "
    "`python setup.py build_ext --inplace`; add COFT_BUILD_CUDA=1 for the CUDA kernels."
)

_load_error: Optional[BaseException] = None
try:
    from coft_fast import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)
except ImportError as error:  # pragma: no cover - exercised only in unbuilt checkouts
    _C = None
    _load_error = error


def available() -> bool:
    """Whether ``coft_fast._C`` is loaded (and ``torch.ops.coft_fast.*`` exist)."""
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``coft_fast::<op>`` has a kernel for a dispatch key ("CPU", "CUDA")."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"coft_fast::{op}", dispatch_key)


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels (COFT_BUILD_CUDA)."""
    return has_kernel("pseudo_label_stats", "CUDA")


def require(op: str, device: torch.device) -> None:
    """Raise a clear error when ``op`` cannot run on ``device`` with this build."""
    if torch.compiler.is_compiling():
        return
    if not available():
        raise ImportError(BUILD_HINT.format(error=_load_error)) from _load_error
    if device.type == "cuda" and not has_kernel(op, "CUDA"):
        raise RuntimeError(
            f"coft_fast._C was built without CUDA kernels, so {op} cannot run on {device}: rebuild with "
            "`COFT_BUILD_CUDA=1 pip install --no-build-isolation -e .` (needs a CUDA toolkit, see README)")
