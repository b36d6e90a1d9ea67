"""torch.distributed helpers, each a no-op in one process."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the only process that writes outputs and checkpoints."""
    return rank() == 0


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without), also outside the process group."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(device_name: str = "auto") -> torch.device:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) once; returns this process's device."""
    from coft_fast.runtime.device import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not started by torchrun
        return resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        log.info("joined the process group: rank %d of %d (%s, %s)", rank(), world_size(), backend, device)
    return device


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _communication_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_range(count: int, shard_id: int, num_shards: int) -> tuple:
    """(start, stop) of shard ``shard_id``'s share of ``count`` items; the first shards get one more."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards - 1}], got {shard_id}")
    per, extra = divmod(count, num_shards)
    start = shard_id * per + min(shard_id, extra)
    return start, start + per + (1 if shard_id < extra else 0)


def shard(items: Sequence[Any], shard_id: Optional[int] = None, num_shards: Optional[int] = None) -> List[Any]:
    """Shard ``shard_id``'s (default: this rank's) contiguous share of ``items``."""
    shard_id = rank() if shard_id is None else shard_id
    num_shards = world_size() if num_shards is None else num_shards
    start, stop = shard_range(len(items), shard_id, num_shards)
    return list(items[start:stop])


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` from every rank (any number each) in rank order, on ``tensor``'s device."""
    if world_size() == 1:
        return tensor
    local = tensor.to(_communication_device()).contiguous()
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([local.shape[0]], device=local.device))
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)]).to(tensor.device)


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_rows` on the CPU."""
    return all_gather_rows(tensor).cpu()


def gather_objects(values: List[Any]) -> List[Any]:
    """Every rank's list concatenated in rank order (picklable items)."""
    if world_size() == 1:
        return list(values)
    gathered: List[Optional[List[Any]]] = [None] * world_size()
    dist.all_gather_object(gathered, list(values))
    return [item for part in gathered for item in part]


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (pickled)."""
    if world_size() == 1:
        return value
    holder = [value if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device)."""
    if world_size() == 1:
        return tensor
    summed = tensor.detach().to(_communication_device()).clone()
    dist.all_reduce(summed)
    return summed.to(tensor.device)


@dataclass(frozen=True)
class BatchPart:
    """This rank's rows ``start:stop`` of a global batch, ``real`` of them counting, and its loss ``weight``."""
    start: int
    stop: int
    real: int
    weight: float

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


def batch_part(count: int, shard_id: Optional[int] = None, num_shards: Optional[int] = None) -> BatchPart:
    """This rank's part of a global batch of ``count`` rows; its mean loss weighs ``real * W / count``, so DDP's
    average over W ranks is the gradient of the batch mean."""
    shard_id = rank() if shard_id is None else shard_id
    num_shards = world_size() if num_shards is None else num_shards
    if num_shards == 1:
        return BatchPart(0, count, count, 1.0)
    start, stop = shard_range(count, shard_id, num_shards)
    real = stop - start
    if real == 0:  # a forward pass over one row, weighted 0, keeps every rank in DDP's step
        return BatchPart(0, 1, 0, 0.0)
    return BatchPart(start, stop, real, real * num_shards / count)


def data_parallel(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` in DistributedDataParallel in a distributed run (buffers synced once, at the start)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, gradient_as_bucket_view=True,
                                   find_unused_parameters=find_unused_parameters)


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if is_initialized():
        dist.destroy_process_group()
