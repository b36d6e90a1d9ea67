"""Fused InfoNCE against a FIFO queue (MoCo / CoFT+ phase II) in Triton, flash-decoding style.

Per row i, with t = 1 / temperature:
    pos_i = t * q_i . k_i,   neg_ij = t * q_i . queue_j,   lse_i = log(exp(pos_i) + sum_j exp(neg_ij))
    loss  = mean_i (lse_i - pos_i)
    dloss/dq_i = (t / N) * (sum_j w_ij queue_j + (w_i0 - 1) k_i),   dloss/dk_i = (t / N) * (w_i0 - 1) q_i
where w_ij = exp(neg_ij - lse_i) and w_i0 = exp(pos_i - lse_i).

N (the batch) is small and K (the queue) is large, so the work is split over the queue:
  1. ``_queue_partial_kernel``: grid (row blocks, queue slices). Each program streams its slice of
     the queue once, in the queue's storage dtype, with fp32 accumulation, and keeps an online
     max / sum of exp per row. When a gradient is needed it also accumulates, with the same
     online rescaling, sum_j exp(neg_ij - m) queue_j (the "output" of an attention whose keys and
     values are both the queue), so the backward pass never has to stream the queue again.
  2. ``_queue_merge_kernel``: merges the per-slice statistics (log-sum-exp of the partials, as in
     flash-decoding), writes the per-row losses, and folds the weighted queue sum and the positive
     key into one (N, d) fp32 row statistic R_i = sum_j w_ij queue_j + (w_i0 - 1) k_i.
  3. ``_queue_backward_kernel``: dq = g t / N * R, dk = g t / N * (w0 - 1) q (one elementwise pass).
No N x K tensor is ever written; the extra memory is O(slices * N * d) for the partial sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from coft_fast.kernels import dot_precision, interpreting, next_power_of_2, require_runnable, sm_count

_TL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# partial weighted sums (slices x N x d fp32) are kept under this many bytes when choosing slices
_PARTIAL_BYTES = 16 * 1024 * 1024


def _partial_configs():
    if interpreting():  # one config: the interpreter would otherwise "benchmark" every one of them
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    shapes = [(16, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3),
              (64, 128, 8, 2), (128, 64, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, k, w, s in shapes]


def _prune_partial(configs, named_args, **kwargs):
    """Keep configs whose accumulators fit in registers and whose queue tiles fit in shared memory."""
    d_pad = kwargs["D_PAD"]
    with_o = kwargs["WITH_O"]
    item = named_args["queue_ptr"].element_size()
    kept = []
    for config in configs:
        m, k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
        registers = m * d_pad * (1 if with_o else 0) + m * k  # fp32 accumulators per program
        smem = (k * max(1, config.num_stages) + m) * d_pad * item  # queue tiles in flight + the q block
        if registers <= 160 * 32 * config.num_warps and smem <= 200 * 1024:
            kept.append(config)
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"])]
    return kept


@triton.autotune(configs=_partial_configs(), key=["N", "K", "D", "SPLITS", "WITH_O"],
                 prune_configs_by={"early_config_prune": _prune_partial})
@triton.jit
def _queue_partial_kernel(
    q_ptr, k_ptr, queue_ptr, part_m_ptr, part_l_ptr, part_o_ptr, pos_ptr,
    N, K, D, SPLITS, stride_q, stride_k, stride_queue, rows_per_split, inv_t,
    D_PAD: tl.constexpr, WITH_O: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    cols = tl.arange(0, D_PAD)
    col_mask = cols < D
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # the positive logit is computed once, by the programs of the first slice
    if pid_s == 0:
        kk = tl.load(k_ptr + rows[:, None] * stride_k + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=0.0).to(tl.float32)
        pos = tl.sum(q.to(tl.float32) * kk, axis=1) * inv_t
        tl.store(pos_ptr + rows, pos, mask=row_mask)

    lo = pid_s * rows_per_split
    hi = tl.minimum(lo + rows_per_split, K)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        key_mask = keys < hi
        tile = tl.load(queue_ptr + keys.to(tl.int64)[:, None] * stride_queue + cols[None, :],  # K * d may pass 2**31
                       mask=key_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            tile = tile.to(tl.float32)
        s = tl.dot(q, tl.trans(tile), input_precision=PRECISION) * inv_t
        s = tl.where(key_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WITH_O:
            acc = acc * alpha[:, None] + tl.dot(p.to(tile.dtype), tile, input_precision=PRECISION)
        m_i = m_new

    offs = pid_s * N + rows
    tl.store(part_m_ptr + offs, m_i, mask=row_mask)
    tl.store(part_l_ptr + offs, l_i, mask=row_mask)
    if WITH_O:
        tl.store(part_o_ptr + offs[:, None] * D + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _queue_merge_kernel(
    part_m_ptr, part_l_ptr, part_o_ptr, pos_ptr, k_ptr, loss_rows_ptr, w0m1_ptr, r_ptr,
    N, D, SPLITS, stride_k,
    S_PAD: tl.constexpr, WITH_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    splits = tl.arange(0, S_PAD)
    part_mask = (splits[:, None] < SPLITS) & row_mask[None, :]
    part_offs = splits[:, None] * N + rows[None, :]
    pm = tl.load(part_m_ptr + part_offs, mask=part_mask, other=float("-inf"))
    pl = tl.load(part_l_ptr + part_offs, mask=part_mask, other=0.0)
    pos = tl.load(pos_ptr + rows, mask=row_mask, other=0.0)
    big = tl.maximum(tl.max(pm, axis=0), pos)
    total = tl.sum(pl * tl.exp(pm - big[None, :]), axis=0) + tl.exp(pos - big)
    lse = big + tl.log(total)
    w0m1 = tl.exp(pos - lse) - 1.0
    if pid_d == 0:
        tl.store(loss_rows_ptr + rows, lse - pos, mask=row_mask)
        tl.store(w0m1_ptr + rows, w0m1, mask=row_mask)
    if WITH_O:
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for s in range(0, SPLITS):
            ms = tl.load(part_m_ptr + s * N + rows, mask=row_mask, other=float("-inf"))
            part = tl.load(part_o_ptr + (s * N + rows)[:, None] * D + cols[None, :], mask=mask, other=0.0)
            out += tl.exp(ms - lse)[:, None] * part
        kk = tl.load(k_ptr + rows[:, None] * stride_k + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out += w0m1[:, None] * kk
        tl.store(r_ptr + rows[:, None] * D + cols[None, :], out, mask=mask)


@triton.jit
def _queue_backward_kernel(
    grad_ptr, r_ptr, w0m1_ptr, q_ptr, dq_ptr, dk_ptr, N, D, stride_q, coef,
    NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    g = tl.load(grad_ptr).to(tl.float32) * coef
    if NEED_DQ:
        r = tl.load(r_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        tl.store(dq_ptr + rows[:, None] * D + cols[None, :], (g * r).to(dq_ptr.dtype.element_ty), mask=mask)
    if NEED_DK:
        w = tl.load(w0m1_ptr + rows, mask=rows < N, other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dk_ptr + rows[:, None] * D + cols[None, :], (g * w[:, None] * q).to(dk_ptr.dtype.element_ty),
                 mask=mask)


def choose_splits(n: int, k: int, d: int, device: torch.device, with_o: bool) -> int:
    """Queue slices: enough programs to fill the GPU twice over, within the partial-sum budget."""
    row_blocks = triton.cdiv(n, 64)
    splits = triton.cdiv(2 * sm_count(device), row_blocks)
    if with_o:
        splits = min(splits, max(1, _PARTIAL_BYTES // (n * d * 4)))
    return max(1, min(splits, triton.cdiv(k, 256)))


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _queue_forward(q, k, queue, temperature, with_o, splits=None):
    n, d = q.shape
    size = queue.shape[0]
    device = q.device
    if splits is None:
        splits = choose_splits(n, size, d, device, with_o)
    splits = max(1, min(int(splits), size))
    rows_per_split = triton.cdiv(size, splits)
    if rows_per_split > 128:  # slice starts aligned to the largest queue tile
        rows_per_split = triton.cdiv(rows_per_split, 128) * 128
    f32 = dict(device=device, dtype=torch.float32)
    part_m = torch.empty(splits, n, **f32)
    part_l = torch.empty(splits, n, **f32)
    part_o = torch.empty(splits, n, d, **f32) if with_o else part_m  # placeholder pointer when unused
    pos = torch.empty(n, **f32)
    upcast = interpreting() or q.dtype != queue.dtype
    precision = dot_precision(torch.float32) if upcast else dot_precision(q.dtype)
    inv_t = 1.0 / float(temperature)
    d_pad = max(16, next_power_of_2(d))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits)  # noqa: E731
    _queue_partial_kernel[grid](
        q, k, queue, part_m, part_l, part_o, pos,
        n, size, d, splits, q.stride(0), k.stride(0), queue.stride(0), rows_per_split, inv_t,
        D_PAD=d_pad, WITH_O=with_o, UPCAST=upcast, PRECISION=precision,
    )
    loss_rows = torch.empty(n, **f32)
    w0m1 = torch.empty(n, **f32)
    r = torch.empty(n, d, **f32) if with_o else w0m1
    block_m = 16 if interpreting() else 32
    block_d = min(d_pad, 128) if with_o else d_pad
    merge_grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d) if with_o else 1)
    _queue_merge_kernel[merge_grid](
        part_m, part_l, part_o, pos, k, loss_rows, w0m1, r, n, d, splits, k.stride(0),
        S_PAD=max(2, next_power_of_2(splits)), WITH_O=with_o, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return loss_rows, w0m1, (r if with_o else None)


class _QueueInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, queue, temperature, splits, grad_enabled):
        # (needs_input_grad says True under torch.no_grad() too, hence the caller's grad mode)
        with_o = grad_enabled and bool(ctx.needs_input_grad[0])  # the weighted queue sum serves dq only
        loss_rows, w0m1, r = _queue_forward(q, k, queue, temperature, with_o, splits)
        if with_o or (grad_enabled and ctx.needs_input_grad[1]):
            ctx.save_for_backward(q, r, w0m1)
        ctx.temperature = float(temperature)
        ctx.k_dtype = k.dtype
        return loss_rows.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, r, w0m1 = ctx.saved_tensors
        n, d = q.shape
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq = torch.empty(n, d, device=q.device, dtype=q.dtype) if need_dq else None
        dk = torch.empty(n, d, device=q.device, dtype=ctx.k_dtype) if need_dk else None
        block_m, block_d = 32, min(128, max(16, next_power_of_2(d)))
        grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
        _queue_backward_kernel[grid](
            grad.contiguous(), r if need_dq else w0m1, w0m1, q, dq if need_dq else q, dk if need_dk else q, n, d,
            q.stride(0),
            1.0 / (ctx.temperature * n), NEED_DQ=need_dq, NEED_DK=need_dk, BLOCK_M=block_m, BLOCK_D=block_d,
        )
        return dq, dk, None, None, None, None


def queue_info_nce_triton(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                          splits: int | None = None) -> torch.Tensor:
    """Fused InfoNCE (0-dim fp32 loss) with gradients to q and k; ``queue`` is a constant.

    ``splits`` (tests only) fixes the number of queue slices; by default it is chosen from the
    device's multiprocessor count and the partial-sum memory budget.
    """
    require_runnable(q)
    for name, t in (("q", q), ("k", k), ("queue", queue)):
        if t.dtype not in _TL_FLOATS:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 {name}, got {t.dtype} "
                            "(use backend='reference' for float64)")
    q, k, queue = _contiguous_rows(q), _contiguous_rows(k), _contiguous_rows(queue.detach())
    return _QueueInfoNCE.apply(q, k, queue, float(temperature), splits, torch.is_grad_enabled())
