"""Checkpoints: atomic torch/safetensors writes and a run's stage store for resuming."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from coft_fast.runtime.distributed import broadcast_object, is_main
from coft_fast.runtime.io import atomic_write

log = logging.getLogger(__name__)


def save_state(path: Path, state: Dict[str, Any]) -> None:
    """torch.save by rank 0 through a temporary file and a rename (no collective runs)."""
    if is_main():
        atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> Optional[Dict[str, Any]]:
    """The state saved at ``path`` (None: none), read by rank 0 and sent to every rank (all must call it)."""
    state = None
    if is_main() and Path(path).is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
    return broadcast_object(state)


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file of CPU, contiguous copies of ``tensors``, written atomically (by rank 0)."""
    from safetensors.torch import save_file

    if is_main():
        cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


class StageStore:
    """Finished stages of a run, one file each under ``folder``; a resumed run skips them."""

    def __init__(self, folder: Optional[Path]):
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Optional[Path]:
        return None if self.folder is None else self.folder / f"{name}.pt"

    def load(self, name: str) -> Optional[Dict[str, Any]]:
        path = self.path(name)
        state = load_state(path) if path is not None else None
        if state is not None:
            log.info("resuming: stage %s loaded from %s", name, path)
        return state

    def save(self, name: str, state: Dict[str, Any]) -> None:
        if self.folder is not None:
            save_state(self.path(name), state)


def restore_training(path: Optional[Path], model, optimizer, scheduler):
    """Load a training checkpoint into ``model``, ``optimizer`` and ``scheduler``: (next epoch, steps, history)."""
    state = load_state(path) if path is not None else None
    if state is None:
        return 0, 0, []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1, state["step"], state["history"]


def save_training(path: Path, model_state, optimizer, scheduler, epoch: int, step: int, history) -> None:
    """The state after ``epoch``: enough for :func:`restore_training` to continue exactly."""
    save_state(path, {
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "step": step, "history": history,
    })
