"""Argument checks shared by the ops: every error names the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "reference", "eager")


def check_matrix(name: str, tensor, columns: Optional[int] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if columns is not None and tensor.shape[1] != columns:
        raise ValueError(f"{name} must have {columns} columns (the feature size), got shape {tuple(tensor.shape)}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {tensor.dtype}")


def check_labels(name: str, labels, rows: Optional[int] = None, num_classes: Optional[int] = None,
                 check_range: bool = True) -> None:
    """An int64 tensor of shape (``rows``,); with ``num_classes`` and ``check_range``, in range (a host sync)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {labels.dtype}")
    if labels.ndim != 1 or (rows is not None and labels.shape[0] != rows):
        raise ValueError(f"{name} must have shape ({'N' if rows is None else rows},), got {tuple(labels.shape)}")
    if num_classes is None or not check_range or torch.compiler.is_compiling() or not labels.numel():
        return
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got values in [{int(labels.min())}, {int(labels.max())}]")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def check_same_dtype(**tensors) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError("tensors must share one dtype, got " + ", ".join(f"{k} {v}" for k, v in dtypes.items()))


def check_op_inputs(backend: str, **matrices) -> None:
    """``backend``, then 2-D float ``matrices`` with the first one's columns, the first not empty."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    (batch, first), *others = matrices.items()
    check_matrix(batch, first)
    for name, tensor in others:
        check_matrix(name, tensor, columns=first.shape[1])
    if first.shape[0] == 0:
        raise ValueError(f"{batch} is empty (N = 0): there is nothing to compute a loss over")


def scale_value(logit_scale) -> torch.Tensor | float:
    """The multiplier exp(model.logit_scale) as a float or 0-dim tensor."""
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a float or a 0-dim tensor, got shape {tuple(logit_scale.shape)}")
        return logit_scale.reshape(())
    if isinstance(logit_scale, (int, float)):
        return float(logit_scale)
    raise TypeError(f"logit_scale must be a float or a 0-dim tensor, got {type(logit_scale).__name__}")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(backend: str, tensor: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """"triton" always, "auto" on CUDA tensors of the dtypes the kernels take, else never."""
    if backend in ("reference", "eager"):
        return False
    if backend == "triton":
        return True
    if not tensor.is_cuda or any(d not in TRITON_DTYPES for d in dtypes):
        return False
    from coft_fast.kernels import triton_runnable

    return triton_runnable(tensor.device)


def no_autocast(tensor: torch.Tensor):
    """Autocast off: the references compute in float32 or wider."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)
