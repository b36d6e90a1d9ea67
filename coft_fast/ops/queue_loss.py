"""InfoNCE against a FIFO queue of momentum keys (CoFT+ phase II), and the queue's in-place update.

loss = mean_i -log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.queue_j / T)) ).
Gradients reach q and k; the queue is a constant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from coft_fast.ops._checks import check_backend, check_matrix, check_nonempty, check_same_device, check_same_dtype


def _check_queue_args(q, k, queue, temperature, backend):
    check_backend(backend)
    check_matrix("q", q)
    check_matrix("k", k, columns=q.shape[1])
    check_matrix("queue", queue, columns=q.shape[1])
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    check_same_dtype(q=q, k=k)
    check_same_device(q=q, k=k, queue=queue)
    check_nonempty("q", q)
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def queue_info_nce_reference(q, k, queue, temperature) -> torch.Tensor:
    """MoCo's formulation: positive logit in column 0, then the queue, cross-entropy towards 0."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q, k, queue = q.to(compute), k.to(compute), queue.to(compute).detach()
    positive = (q * k).sum(-1, keepdim=True)
    logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def queue_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                   backend: str = "auto") -> torch.Tensor:
    """0-dim mean InfoNCE of queries ``q`` (N, d) with positives ``k`` (N, d) against ``queue`` (K, d)."""
    _check_queue_args(q, k, queue, temperature, backend)
    use_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
    if use_triton:
        from coft_fast.kernels.queue_loss import queue_info_nce_triton

        return queue_info_nce_triton(q, k, queue, temperature)
    return queue_info_nce_reference(q, k, queue, temperature)


@torch.no_grad()
def enqueue(queue: torch.Tensor, keys: torch.Tensor, ptr) -> int:
    """Write ``keys`` into ``queue`` in place from row ``ptr``, wrapping around; returns the new pointer."""
    check_matrix("queue", queue)
    check_matrix("keys", keys, columns=queue.shape[1])
    check_same_device(queue=queue, keys=keys)
    size, count = queue.shape[0], keys.shape[0]
    if count > size:
        raise ValueError(f"keys has {count} rows, more than the queue's {size}")
    if isinstance(ptr, torch.Tensor):
        if ptr.numel() != 1 or ptr.dtype != torch.int64:
            raise ValueError(f"ptr must be an int or a 0-dim int64 tensor, got {ptr.dtype} of shape {tuple(ptr.shape)}")
        ptr = int(ptr)
    if not isinstance(ptr, int) or not 0 <= ptr < size:
        raise ValueError(f"ptr must be an int in [0, {size - 1}], got {ptr!r}")
    rows = (torch.arange(count, device=queue.device) + ptr) % size
    queue.index_copy_(0, rows, keys.to(queue.dtype))
    return (ptr + count) % size
