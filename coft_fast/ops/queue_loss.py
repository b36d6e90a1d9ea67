"""InfoNCE against a FIFO queue of momentum keys (CoFT+ phase II), and the queue's in-place update.

loss = mean_i -log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.queue_j / T)) ).
Gradients reach q and k; the queue is a constant.

Three implementations:
- ``queue_info_nce_eager``: MoCo's einsum + cat + cross-entropy, plain autograd. It holds several
  N x (K + 1) tensors at once; kept as the ground truth of the tests and the baseline of the benchmark.
- ``queue_info_nce_reference`` (the CPU path): chunked over the queue with an online log-sum-exp
  inside a ``torch.autograd.Function``. When a gradient is needed the same pass accumulates the
  softmax-weighted sum of the queue rows, so the backward pass is elementwise; only per-row
  statistics (N and N x d) are saved. Peak memory O(N * chunk) instead of O(N * K).
- ``coft_fast.kernels.queue_loss.queue_info_nce_triton``: the same algorithm as a fused Triton kernel,
  split over the queue (flash-decoding style).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from coft_fast.ops._checks import (
    check_backend,
    check_matrix,
    check_nonempty,
    check_same_device,
    check_same_dtype,
    check_temperature,
    no_autocast,
    use_triton,
)

# elements the chunked reference holds at once: N x chunk logits, plus chunk x d for the float32 copy of
# a half-precision queue chunk; chunk = clamp(budget // (N [+ d]), 256, 16384), so at most ~16 MiB of
# fp32 whatever the queue size (larger chunks keep the CPU GEMMs efficient)
_CHUNK_ELEMENTS = 1 << 22


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
    if queue.shape[0] == 0:
        raise ValueError("queue is empty (K = 0): InfoNCE needs at least one negative key")
    check_temperature(temperature)


def queue_info_nce_eager(q, k, queue, temperature) -> torch.Tensor:
    """MoCo's formulation: positive logit in column 0, then the queue, cross-entropy towards 0.

    Plain autograd over N x (K + 1) logits (O(N * K) memory): the tests' ground truth and the
    benchmarks' baseline."""
    compute = torch.promote_types(q.dtype, torch.float32)
    with no_autocast(q):
        q, k, queue = q.to(compute), k.to(compute), queue.to(compute).detach()
        positive = (q * k).sum(-1, keepdim=True)
        logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def _chunk_rows(n: int, d: int, converts: bool) -> int:
    return max(256, min(16384, _CHUNK_ELEMENTS // (n + (d if converts else 0))))


def no_autocast_method(forward):
    """Run a Function's forward with autocast off (its matmuls stay in float32 or wider)."""

    def wrapped(ctx, q, *args):
        with no_autocast(q):
            return forward(ctx, q, *args)

    return wrapped


class _ChunkedQueueInfoNCE(torch.autograd.Function):
    """Online log-sum-exp over queue chunks; saves only per-row statistics for backward."""

    @staticmethod
    @no_autocast_method
    def forward(ctx, q, k, queue, temperature, chunk, grad_enabled):
        compute = torch.promote_types(q.dtype, torch.float32)
        qc, kc = q.to(compute), k.to(compute)
        inv_t = 1.0 / temperature
        # (needs_input_grad says True under torch.no_grad() too, hence the caller's grad mode)
        with_o = grad_enabled and bool(ctx.needs_input_grad[0])  # the weighted queue sum serves dq only
        need_grad = with_o or (grad_enabled and bool(ctx.needs_input_grad[1]))
        pos = (qc * kc).sum(-1).mul_(inv_t)  # (N,)
        m = pos.clone()  # running max, started at the positive logit
        total = torch.ones_like(pos)  # running sum of exp(logit - m); exp(pos - m) = 1
        weighted = torch.zeros_like(qc) if with_o else None  # running sum of exp(logit - m) * queue_j
        logits = None
        for start in range(0, queue.shape[0], chunk):
            block = queue[start:start + chunk].to(compute)
            if logits is None or logits.shape[1] != block.shape[0]:
                logits = qc.new_empty(qc.shape[0], block.shape[0])  # (N, chunk): the one O(N * chunk) buffer
            logits.addmm_(qc, block.T, beta=0, alpha=inv_t)  # q . queue_j / T, reusing the buffer
            m_new = torch.maximum(m, logits.amax(dim=1))
            alpha = torch.exp(m - m_new)
            logits.sub_(m_new[:, None]).exp_()
            total.mul_(alpha).add_(logits.sum(dim=1))
            if with_o:
                weighted.mul_(alpha[:, None]).addmm_(logits, block)
            m = m_new
            del block  # (a converted copy must go before the next one is made)
        del logits
        lse = m + torch.log(total)
        loss = (lse - pos).mean()
        if need_grad:
            w0m1 = torch.exp(pos - lse) - 1.0  # softmax weight of the positive key, minus its target 1
            # R_i = sum_j w_ij queue_j + (w_i0 - 1) k_i, so that dloss/dq_i = R_i / (N T)
            r = weighted.div_(total[:, None]).add_(w0m1[:, None] * kc) if with_o else None
            ctx.save_for_backward(qc, r, w0m1)
        ctx.inv_t = inv_t
        ctx.dtypes = (q.dtype, k.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qc, r, w0m1 = ctx.saved_tensors
        coef = grad * (ctx.inv_t / qc.shape[0])
        dq = (r * coef).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dk = (qc * (w0m1 * coef)[:, None]).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None, None, None


def queue_info_nce_reference(q, k, queue, temperature, chunk: int | None = None) -> torch.Tensor:
    """Plain-torch InfoNCE chunked over the queue (float32 or wider); peak memory O(N * chunk)."""
    if chunk is None:
        compute = torch.promote_types(q.dtype, torch.float32)
        chunk = _chunk_rows(q.shape[0], q.shape[1], queue.dtype != compute)
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _ChunkedQueueInfoNCE.apply(q, k, queue.detach(), float(temperature), chunk, torch.is_grad_enabled())


def queue_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                   backend: str = "auto") -> torch.Tensor:
    """0-dim mean InfoNCE of queries ``q`` (N, d) with positives ``k`` (N, d) against ``queue`` (K, d).

    ``backend``: "auto" (Triton on CUDA tensors, the chunked reference elsewhere), "triton" (also on
    CPU tensors under TRITON_INTERPRET=1), "reference" or "eager" (MoCo's N x (K + 1) logits). The loss is float32 (float64 for float64
    inputs); gradients reach q and k in their own dtypes.
    """
    _check_queue_args(q, k, queue, temperature, backend)
    if backend == "eager":
        return queue_info_nce_eager(q, k, queue, temperature)
    if use_triton(backend, q, q.dtype, queue.dtype):
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
        if ptr.numel() != 1 or ptr.ndim != 0 or ptr.dtype != torch.int64:
            raise ValueError(f"ptr must be an int or a 0-dim int64 tensor, got {ptr.dtype} of shape {tuple(ptr.shape)}")
        ptr = int(ptr)
    if isinstance(ptr, bool) or not isinstance(ptr, int) or not 0 <= ptr < size:
        raise ValueError(f"ptr must be an int in [0, {size - 1}], got {ptr!r}")
    if count == 0:
        return ptr
    first = min(count, size - ptr)  # rows up to the end of the queue, then the rest from row 0
    queue[ptr:ptr + first].copy_(keys[:first])
    if first < count:
        queue[:count - first].copy_(keys[first:])
    return (ptr + count) % size
