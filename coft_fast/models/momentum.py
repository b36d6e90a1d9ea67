"""CoFT+'s momentum contrast: an EMA copy of the visual encoder, an optional projection, a key queue."""
from __future__ import annotations

import copy
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from coft_fast import ops


@torch.no_grad()
def ema_update_(targets: List[torch.Tensor], sources: List[torch.Tensor], momentum: float) -> None:
    """targets <- momentum * targets + (1 - momentum) * sources, in place, as one foreach op."""
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: {len(targets)} target tensors but {len(sources)} source tensors")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update_: momentum must be in [0, 1], got {momentum}")
    if targets:
        torch._foreach_lerp_(targets, [s.detach() for s in sources], 1.0 - momentum)


class MomentumContrast(nn.Module):
    """The momentum key encoder (+ projection) of ``encoder`` and a FIFO queue of every rank's (``gather``) keys."""

    def __init__(self, encoder: nn.Module, dim: int, queue_size: int, momentum: float, projection_dim: int = 0,
                 seed: int = 0, gather: Callable[[torch.Tensor], torch.Tensor] = lambda keys: keys):
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.momentum = float(momentum)
        self.gather = gather
        self.projection = nn.Identity() if projection_dim <= 0 else nn.Sequential(  # MoCo v2's MLP
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, projection_dim))
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.key_projection = copy.deepcopy(self.projection).requires_grad_(False)
        out_dim = projection_dim if projection_dim > 0 else dim
        generator = torch.Generator().manual_seed(seed)
        queue = F.normalize(torch.randn(queue_size, out_dim, generator=generator), dim=1)  # MoCo: random unit keys
        device = next(encoder.parameters()).device
        self.register_buffer("queue", queue.to(device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self._pairs = (None, None)  # (encoder, its online_pairs), listed once rather than on every step

    def online_pairs(self, encoder: nn.Module):
        """(momentum tensors, trained tensors) in matching order."""
        targets = list(self.key_encoder.parameters()) + list(self.key_projection.parameters())
        sources = list(encoder.parameters()) + list(self.projection.parameters())
        return targets, sources

    @torch.no_grad()
    def update_(self, encoder: nn.Module) -> None:
        """One EMA step of the key encoder and key projection towards the trained ones."""
        if self._pairs[0] is not encoder:
            self._pairs = (encoder, self.online_pairs(encoder))
        ema_update_(*self._pairs[1], self.momentum)

    def queries(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(features.float()), dim=-1)

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        self.key_encoder.eval()
        return F.normalize(self.key_projection(self.key_encoder(images).float()), dim=-1)

    def loss(self, queries: torch.Tensor, keys: torch.Tensor, temperature: float, backend: str = "auto") -> torch.Tensor:
        return ops.queue_info_nce(queries, keys, self.queue, temperature, backend)

    @torch.no_grad()
    def push_(self, keys: torch.Tensor) -> None:
        """Queue the keys of this step (from every rank), overwriting the oldest."""
        ops.enqueue_(self.queue, self.gather(keys), self.ptr)  # the pointer stays on the device: no sync
