"""InfoNCE against a FIFO queue of momentum keys (CoFT+ phase II), and the queue's in-place update.

loss = mean_i -log( exp(q_i.k_i / T) / (exp(q_i.k_i / T) + sum_j exp(q_i.queue_j / T)) ); the queue is a
constant. The reference and the Triton kernel read the queue in chunks with an online log-sum-exp that also
sums the softmax-weighted queue rows, so the backward is elementwise and memory O(N * chunk), not O(N * K)
as in MoCo's formulation (``queue_info_nce_eager``); both run as the custom op ``coft_fast::queue_info_nce``.
"""
from __future__ import annotations

import logging
from typing import Tuple

import torch
import torch.nn.functional as F

from coft_fast.ops._checks import (check_matrix, check_op_inputs, check_same_device, check_same_dtype, check_temperature,
                                   no_autocast, use_triton)

# elements the chunked reference holds at once: chunk = clamp(budget // (N [+ d]), 256, 16384)
_CHUNK_ELEMENTS = 1 << 22
log = logging.getLogger(__name__)


def queue_info_nce_eager(q, k, queue, temperature) -> torch.Tensor:
    """MoCo's formulation: cross-entropy towards column 0 of [positive, queue] logits (O(N * K) memory)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    with no_autocast(q):
        q, k, queue = q.to(compute), k.to(compute), queue.to(compute).detach()
        positive = (q * k).sum(-1, keepdim=True)
        logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def _chunked_statistics(q, k, queue, temperature, with_o, chunk):
    """(loss, w0 - 1, R), the queue read ``chunk`` rows at a time; R_i = sum_j w_ij queue_j + (w_i0 - 1) k_i
    (dloss/dq_i = R_i / (N T)), or an empty tensor without ``with_o``."""
    compute = torch.promote_types(q.dtype, torch.float32)
    with no_autocast(q):
        qc, kc = q.to(compute), k.to(compute)
        inv_t = 1.0 / temperature
        pos = (qc * kc).sum(-1).mul_(inv_t)  # (N,)
        m, total = pos.clone(), torch.ones_like(pos)  # running max and sum of exp(logit - m)
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
        w0m1 = torch.exp(pos - lse) - 1.0  # softmax weight of the positive key, minus its target 1
        r = weighted.div_(total[:, None]).add_(w0m1[:, None] * kc) if with_o else qc.new_empty(0)
        return loss, w0m1, r


_fallbacks_logged = set()  # (device, d, dtypes) the Triton path fell back for: one log line each


@torch.library.custom_op("coft_fast::queue_info_nce", mutates_args=())
def _queue_info_nce_op(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float, with_o: bool,
                       backend: str, splits: int, chunk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, w0 - 1, R) of the Triton kernel or of the chunked reference (its fallback on OutOfResources)."""
    if backend == "triton":
        from coft_fast.kernels import queue_loss as kernel

        try:
            loss, w0m1, r = kernel.queue_statistics_triton(q, k, queue, temperature, with_o, splits or None)
            return loss, w0m1, (r if r is not None else q.new_empty(0, dtype=torch.float32))
        except kernel.OutOfResources as error:
            key = (str(q.device), q.shape[1], q.dtype, queue.dtype)
            if key not in _fallbacks_logged:
                _fallbacks_logged.add(key)
                log.warning("queue_info_nce: no Triton config fits %s for d=%d, q %s, queue %s (%s); using the "
                            "chunked reference for these shapes", q.device, q.shape[1], q.dtype, queue.dtype, error)
    if not chunk:
        converts = queue.dtype != torch.promote_types(q.dtype, torch.float32)
        chunk = max(256, min(16384, _CHUNK_ELEMENTS // (q.shape[0] + (q.shape[1] if converts else 0))))
    return _chunked_statistics(q, k, queue, temperature, with_o, chunk)


@_queue_info_nce_op.register_fake
def _(q, k, queue, temperature, with_o, backend, splits, chunk):
    compute = torch.promote_types(q.dtype, torch.float32)
    n, d = q.shape
    return (q.new_empty((), dtype=compute), q.new_empty((n,), dtype=compute),
            q.new_empty((n, d) if with_o else (0,), dtype=compute))


def _setup_context(ctx, inputs, output):
    q, k, _, temperature, _, _, _, _ = inputs
    _, w0m1, r = output
    ctx.save_for_backward(q, r, w0m1)  # per-row statistics only: nothing of size N x K
    ctx.inv_t = 1.0 / temperature
    ctx.k_dtype = k.dtype


def _backward(ctx, grad, _grad_w0m1, _grad_r):
    q, r, w0m1 = ctx.saved_tensors
    coef = grad * (ctx.inv_t / q.shape[0])
    dq = dk = None
    if ctx.needs_input_grad[0]:
        if r.numel() == 0:
            raise RuntimeError("queue_info_nce: q needs a gradient but the forward pass ran without it "
                               "(q.requires_grad was False or grad mode was off)")
        dq = (r * coef).to(q.dtype)
    if ctx.needs_input_grad[1]:
        dk = (q.to(w0m1.dtype) * (w0m1 * coef)[:, None]).to(ctx.k_dtype)
    return dq, dk, None, None, None, None, None, None


_queue_info_nce_op.register_autograd(_backward, setup_context=_setup_context)


def _fused(q, k, queue, temperature, backend, splits=0, chunk=0) -> torch.Tensor:
    # the weighted queue sum serves dq only: skipped in evaluation
    with_o = torch.is_grad_enabled() and q.requires_grad
    loss, _, _ = _queue_info_nce_op(q, k, queue.detach(), float(temperature), with_o, backend, int(splits or 0),
                                    int(chunk or 0))
    return loss


def queue_info_nce_reference(q, k, queue, temperature, chunk: int | None = None) -> torch.Tensor:
    """Plain-torch InfoNCE chunked over the queue (float32 or wider); peak memory O(N * chunk)."""
    if chunk is not None and int(chunk) < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _fused(q, k, queue, temperature, "reference", chunk=chunk)


def queue_info_nce_triton(q, k, queue, temperature, splits: int | None = None) -> torch.Tensor:
    """The Triton kernel (``splits``, tests only, fixes the number of queue slices)."""
    from coft_fast.kernels.queue_loss import check_triton_inputs

    check_triton_inputs(q, k, queue)
    return _fused(q, k, queue, temperature, "triton", splits=splits)


def queue_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                   backend: str = "auto") -> torch.Tensor:
    """0-dim float32 (float64 inputs: float64) mean InfoNCE of queries ``q`` (N, d), positives ``k`` (N, d),
    against ``queue`` (K, d). ``backend``: "auto" (Triton on CUDA tensors), "triton", "reference" or "eager"."""
    check_op_inputs(backend, q=q, k=k, queue=queue)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    check_same_dtype(q=q, k=k)
    check_same_device(q=q, k=k, queue=queue)
    if queue.shape[0] == 0:
        raise ValueError("queue is empty (K = 0): InfoNCE needs at least one negative key")
    check_temperature(temperature)
    if backend == "eager":
        return queue_info_nce_eager(q, k, queue, temperature)
    if use_triton(backend, q, q.dtype, queue.dtype):
        return queue_info_nce_triton(q, k, queue, temperature)
    return queue_info_nce_reference(q, k, queue, temperature)


def _check_keys(queue, keys) -> tuple:
    """(K, rows of ``keys``) after checking that ``keys`` fit ``queue``."""
    check_matrix("queue", queue)
    check_matrix("keys", keys, columns=queue.shape[1])
    check_same_device(queue=queue, keys=keys)
    if keys.shape[0] > queue.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} rows, more than the queue's {queue.shape[0]}")
    return queue.shape[0], keys.shape[0]


@torch.no_grad()
def enqueue(queue: torch.Tensor, keys: torch.Tensor, ptr) -> int:
    """Write ``keys`` into ``queue`` in place from row ``ptr``, wrapping around; returns the new pointer."""
    size, count = _check_keys(queue, keys)
    if isinstance(ptr, torch.Tensor):
        if ptr.numel() != 1 or ptr.ndim != 0 or ptr.dtype != torch.int64:
            raise ValueError(f"ptr must be an int or a 0-dim int64 tensor, got {ptr.dtype} of shape {tuple(ptr.shape)}")
        ptr = int(ptr)
    if isinstance(ptr, bool) or not isinstance(ptr, int) or not 0 <= ptr < size:
        raise ValueError(f"ptr must be an int in [0, {size - 1}], got {ptr!r}")
    enqueue_(queue, keys, torch.tensor(ptr, device=queue.device))
    return (ptr + count) % size


@torch.no_grad()
def enqueue_(queue: torch.Tensor, keys: torch.Tensor, ptr: torch.Tensor) -> None:
    """``enqueue`` with ``ptr`` a 0-dim int64 tensor on the queue's device, advanced there (no sync; taken mod K)."""
    size, count = _check_keys(queue, keys)
    if not isinstance(ptr, torch.Tensor) or ptr.ndim != 0 or ptr.dtype != torch.int64:
        raise ValueError(f"ptr must be a 0-dim int64 tensor, got {getattr(ptr, 'dtype', type(ptr).__name__)} "
                         f"of shape {tuple(getattr(ptr, 'shape', ()))}")
    check_same_device(queue=queue, ptr=ptr)
    rows = (ptr + torch.arange(count, device=queue.device)) % size
    queue.index_copy_(0, rows, keys.to(queue.dtype))
    ptr.copy_((ptr + count) % size)
