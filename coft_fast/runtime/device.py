"""Device, precision and seeding choices shared by every phase."""
from __future__ import annotations

import contextlib
import platform
import random
from pathlib import Path

import numpy as np
import torch


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows ("x86_64" at worst)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return device


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype for a precision setting, or None for plain fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device):
    dtype = autocast_dtype(precision, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def run_padded(function, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``function`` on ``images`` padded to ``batch_size`` rows (a compiled function sees one shape), unpadded."""
    count = images.shape[0]
    if count == batch_size:
        return function(images)
    padding = images.new_zeros((batch_size - count,) + tuple(images.shape[1:]))
    return function(torch.cat([images, padding]))[:count]
