"""torch.distributed helpers that are no-ops in a single-process run."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` from every rank, concatenated in rank order (no gradient).

    Every rank must pass the same shape (phase II batches are fixed-size). One process: ``tensor``.
    """
    size = world_size()
    if size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)
