"""Shared helpers of the benchmark scripts: where the shared data is, and writing results."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def data_root() -> Path:
    """``$COFT_DATA`` when set, else ``../shared/data`` beside the repository."""
    root = Path(os.environ.get("COFT_DATA", REPO.parent / "shared" / "data"))
    if not (root / "cifar10").is_dir():
        sys.exit(f"shared data not found at {root} (set COFT_DATA to the folder holding cifar10/)")
    return root


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"
