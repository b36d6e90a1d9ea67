"""Fused InfoNCE against a FIFO queue (MoCo / CoFT+ phase II) in Triton, flash-decoding style.

Per row i, with t = 1 / temperature:
    pos_i = t * q_i . k_i,   neg_ij = t * q_i . queue_j,   lse_i = log(exp(pos_i) + sum_j exp(neg_ij))
    loss  = mean_i (lse_i - pos_i)
    dloss/dq_i = (t / N) * (sum_j w_ij queue_j + (w_i0 - 1) k_i),   dloss/dk_i = (t / N) * (w_i0 - 1) q_i
where w_ij = exp(neg_ij - lse_i) and w_i0 = exp(pos_i - lse_i).

N (the batch) is small and K (the queue) is large, so the work is split over the queue:
  1. ``_queue_partial_kernel``: grid (row blocks, queue slices, d-chunks). Each program streams its
     slice of the queue in its storage dtype, computing the logits tile by tile over d (so shared
     memory is bounded whatever d is), with fp32 accumulation and an online max / sum of exp per
     row. When a gradient to q is needed it also accumulates, with the same online rescaling, its
     d-chunk of sum_j exp(neg_ij - m) queue_j (the "output" of an attention whose keys and values
     are both the queue), so the backward pass never streams the queue again. The logits are
     recomputed per d-chunk (d / BLOCK_DO times, 1-4 for d <= 1024): the price of an accumulator
     that fits in registers at d = 512 / 768 / 1024.
  2. ``_queue_merge_kernel``: merges the per-slice statistics in a fixed order (log-sum-exp of the
     partials, as in flash-decoding), writes the per-row losses, and folds the weighted queue sum and
     the positive key into one (N, d) fp32 row statistic R_i = sum_j w_ij queue_j + (w_i0 - 1) k_i.
The backward pass is elementwise (dq = g t / N * R, dk = g t / N * (w0 - 1) q) and lives in the op
(coft_fast.ops.queue_loss, a torch.library custom op). No N x K tensor is ever written; the extra
memory is O(slices * N * d) for the partial sums. Offsets that multiply two sizes are int64.
Configs are pruned per GPU by ``keep_partial_configs`` (shared memory per target, registers), which
tests/test_kernels_aot.py checks by compiling every kept config for sm_80 and sm_90.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from coft_fast.kernels import (
    bucket,
    deterministic,
    device_shared_memory,
    dot_precision,
    interpreting,
    next_power_of_2,
    require_runnable,
    sm_count,
)

_TL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# partial weighted sums (slices x N x d fp32) are kept under this many bytes when choosing slices
_PARTIAL_BYTES = 16 * 1024 * 1024
# the merge holds (slices x BLOCK_M) statistics in registers: at most 128 slices (checked by the AOT test)
MAX_SPLITS = 128
# fp32 accumulator elements one thread may hold (the logit tile, and the output chunk with a gradient)
_ACCUMULATORS_PER_THREAD = 96

# (BLOCK_M, BLOCK_K, BLOCK_D, BLOCK_DO, num_warps, num_stages): BLOCK_D tiles d in the logits,
# BLOCK_DO is the d-chunk of the weighted queue sum one program owns
# ((32, 64, 64, 256, 4, 3) and (32, 128, 64, 128, 4, 2) spilled 20-60 B on sm_100 / sm_120: dropped)
_SHAPES = [(64, 64, 64, 128, 4, 3), (64, 64, 64, 256, 8, 3), (128, 64, 64, 128, 8, 3), (64, 128, 32, 128, 8, 3),
           (128, 128, 32, 128, 8, 2), (16, 64, 64, 256, 4, 3),
           (16, 32, 32, 128, 4, 2)]  # the last fits every target's shared memory


def _partial_configs():
    if interpreting():  # one config: the interpreter would otherwise "benchmark" every one of them
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_D": 32, "BLOCK_DO": 32}, num_warps=4,
                              num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_K": k, "BLOCK_D": bd, "BLOCK_DO": do}, num_warps=w, num_stages=s)
            for m, k, bd, do, w, s in _SHAPES]


def partial_shared_memory(config, q_item: int, queue_item: int, with_o: bool) -> int:
    """Upper bound of the shared memory of ``_queue_partial_kernel`` under ``config`` (bytes).

    The logit loop over d keeps ``num_stages`` (q chunk, queue chunk) pairs in flight in their
    storage dtypes, plus an fp32 copy of each when a half-precision operand is upcast, and Triton may
    stage a transposed copy of the queue chunk; with a gradient, the value tile (BLOCK_K x BLOCK_DO)
    and the probabilities (BLOCK_M x BLOCK_K) are staged for the second dot in the compute dtype.
    (The old kernel's estimate left out the copies and held all of d in one tile.) Checked to bound
    the compiler's own figure by tests/test_kernels_aot.py."""
    m, k, bd, do = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_K", "BLOCK_D", "BLOCK_DO"))
    stages = max(1, config.num_stages)
    upcast = q_item != queue_item
    compute_item = 4 if upcast else queue_item
    total = stages * (m * bd * q_item + k * bd * queue_item) + k * bd * compute_item
    if upcast:
        total += (m + k) * bd * 4
    if with_o:
        total += (k * do + m * k) * compute_item
    return total


def keep_partial_configs(configs, d: int, q_item: int, queue_item: int, with_o: bool, shared_memory: int):
    """The configs the op may launch for feature size ``d`` on a GPU with ``shared_memory`` bytes per block:
    shared memory within the limit and accumulators within the register budget (no spills)."""
    d_pad = max(16, next_power_of_2(d))
    kept, seen = [], set()
    for config in configs:
        m, k, bd, do = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_K", "BLOCK_D", "BLOCK_DO"))
        if bd > max(64, d_pad):  # (tiles past d are masked, only wasted)
            continue
        if not with_o:  # BLOCK_DO unused: one config per remaining shape
            config = triton.Config({**config.kwargs, "BLOCK_DO": 16}, num_warps=config.num_warps,
                                   num_stages=config.num_stages)
        shape = (m, k, bd, config.kwargs["BLOCK_DO"], config.num_warps, config.num_stages)
        if shape in seen:
            continue
        accumulators = m * k + (m * do if with_o else 0)
        if accumulators > _ACCUMULATORS_PER_THREAD * 32 * config.num_warps:
            continue
        if partial_shared_memory(config, q_item, queue_item, with_o) > shared_memory:
            continue
        seen.add(shape)
        kept.append(config)
    return kept


def _prune_partial(configs, named_args, **kwargs):
    if interpreting():
        return configs
    q, queue = named_args["q_ptr"], named_args["queue_ptr"]
    kept = keep_partial_configs(configs, named_args["D"], q.element_size(), queue.element_size(), kwargs["WITH_O"],
                                device_shared_memory(q.device))
    if not kept:  # every shape is within every listed target's limit; keep_partial_configs is tested for it
        raise OutOfResources(0, device_shared_memory(q.device), "shared memory")
    return kept


@triton.autotune(configs=_partial_configs(), key=["N_KEY", "K_KEY", "D", "WITH_O"],
                 prune_configs_by={"early_config_prune": _prune_partial})
@triton.jit
def _queue_partial_kernel(
    q_ptr, k_ptr, queue_ptr, part_m_ptr, part_l_ptr, part_o_ptr, pos_ptr,
    N, K, D, stride_q, stride_k, stride_queue, rows_per_split, inv_t, N_KEY, K_KEY,
    WITH_O: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """Grid (row blocks, queue slices, d-chunks of the weighted sum). Every program computes the
    logits of its rows against its slice over the whole of d, tile by tile; the weighted queue sum
    (WITH_O) is split over d so that its accumulator stays small for any d."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q

    # the positive logit is computed once, by the first program of each row block
    if (pid_s == 0) & (pid_d == 0):
        pos = tl.zeros([BLOCK_M], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims[None, :] < D)
            qq = tl.load(q_rows + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            kk = tl.load(k_ptr + rows.to(tl.int64)[:, None] * stride_k + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            pos += tl.sum(qq * kk, axis=1)
        tl.store(pos_ptr + rows, pos * inv_t, mask=row_mask)

    lo = pid_s * rows_per_split
    hi = tl.minimum(lo + rows_per_split, K)
    out_cols = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for start in range(lo, hi, BLOCK_K):
        keys = start + tl.arange(0, BLOCK_K)
        key_mask = keys < hi
        key_rows = queue_ptr + keys.to(tl.int64)[:, None] * stride_queue  # K * d may pass 2**31
        s = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_mask = dims[None, :] < D
            qc = tl.load(q_rows + dims[None, :], mask=row_mask[:, None] & dim_mask, other=0.0)
            tile = tl.load(key_rows + dims[None, :], mask=key_mask[:, None] & dim_mask, other=0.0)
            if UPCAST:
                qc = qc.to(tl.float32)
                tile = tile.to(tl.float32)
            s = tl.dot(qc, tl.trans(tile), s, input_precision=PRECISION)
        s = tl.where(key_mask[None, :], s * inv_t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WITH_O:
            values = tl.load(key_rows + out_cols[None, :], mask=key_mask[:, None] & (out_cols[None, :] < D), other=0.0)
            if UPCAST:
                values = values.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        m_i = m_new

    offs = pid_s * N + rows
    if pid_d == 0:
        tl.store(part_m_ptr + offs, m_i, mask=row_mask)
        tl.store(part_l_ptr + offs, l_i, mask=row_mask)
    if WITH_O:
        tl.store(part_o_ptr + offs.to(tl.int64)[:, None] * D + out_cols[None, :], acc,
                 mask=row_mask[:, None] & (out_cols[None, :] < D))


@triton.jit
def _queue_merge_kernel(
    part_m_ptr, part_l_ptr, part_o_ptr, pos_ptr, k_ptr, loss_rows_ptr, w0m1_ptr, r_ptr,
    N, D, SPLITS, stride_k,
    S_PAD: tl.constexpr, WITH_O: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merges the slices in a fixed order (deterministic): per-row loss, w0 - 1 and, WITH_O, R."""
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
            part = tl.load(part_o_ptr + (s * N + rows).to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
            out += tl.exp(ms - lse)[:, None] * part
        kk = tl.load(k_ptr + rows.to(tl.int64)[:, None] * stride_k + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out += w0m1[:, None] * kk
        tl.store(r_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], out, mask=mask)


def choose_splits(n: int, k: int, d: int, device: torch.device, with_o: bool) -> int:
    """Queue slices: enough programs to fill the GPU twice over, within the partial-sum budget."""
    row_blocks = triton.cdiv(n, 64)
    splits = triton.cdiv(2 * sm_count(device), row_blocks)
    if with_o:
        splits = min(splits, max(1, _PARTIAL_BYTES // (n * d * 4)))
    return max(1, min(splits, triton.cdiv(k, 256), MAX_SPLITS))


def fixed_partial_config(d: int, q_item: int, queue_item: int, with_o: bool, shared_memory: int):
    """The one config used under deterministic algorithms (the same on every run of one GPU model)."""
    if interpreting():
        return _partial_configs()[0]
    kept = keep_partial_configs(_partial_configs(), d, q_item, queue_item, with_o, shared_memory)
    if not kept:
        raise OutOfResources(0, shared_memory, "shared memory")
    return kept[0]


def _launch_partial(grid, args, constexprs, d, q, queue, with_o):
    if not deterministic():
        _queue_partial_kernel[grid](*args, **constexprs)
        return
    config = fixed_partial_config(d, q.element_size(), queue.element_size(), with_o, device_shared_memory(q.device))
    _queue_partial_kernel.fn[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                                   num_stages=config.num_stages)


def queue_statistics_triton(q, k, queue, temperature, with_o, splits=None):
    """(mean loss (0-dim fp32), w0 - 1 (N,) fp32, R (N, d) fp32 or None without ``with_o``).

    R_i = sum_j w_ij queue_j + (w_i0 - 1) k_i, so that dloss/dq_i = R_i / (N T) and
    dloss/dk_i = (w_i0 - 1) q_i / (N T). ``splits`` (tests only) fixes the number of queue slices.
    Raises triton's OutOfResources when no config fits the GPU (the op then falls back)."""
    check_triton_inputs(q, k, queue)
    q, k, queue = _contiguous_rows(q), _contiguous_rows(k), _contiguous_rows(queue.detach())
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        loss_rows, w0m1, r = _queue_forward(q, k, queue, temperature, with_o, splits)
    return loss_rows.mean(), w0m1, r


def check_triton_inputs(q, k, queue) -> None:
    require_runnable(q)
    for name, t in (("q", q), ("k", k), ("queue", queue)):
        if t.dtype not in _TL_FLOATS:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 {name}, got {t.dtype} "
                            "(use backend='reference' for float64)")


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _queue_forward(q, k, queue, temperature, with_o, splits=None):
    n, d = q.shape
    size = queue.shape[0]
    device = q.device
    if splits is None:
        splits = choose_splits(n, size, d, device, with_o)
    splits = max(1, min(int(splits), size, MAX_SPLITS))
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
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), splits,  # noqa: E731
                         triton.cdiv(d, meta["BLOCK_DO"]) if with_o else 1)
    _launch_partial(grid, (q, k, queue, part_m, part_l, part_o, pos, n, size, d, q.stride(0), k.stride(0),
                           queue.stride(0), rows_per_split, inv_t, bucket(n), bucket(size)),
                    dict(WITH_O=with_o, UPCAST=upcast, PRECISION=precision), d, q, queue, with_o)
    loss_rows = torch.empty(n, **f32)
    w0m1 = torch.empty(n, **f32)
    r = torch.empty(n, d, **f32) if with_o else w0m1
    d_pad = max(16, next_power_of_2(d))
    block_m = 16 if interpreting() else 32
    block_d = min(d_pad, 128) if with_o else 16
    merge_grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d) if with_o else 1)
    _queue_merge_kernel[merge_grid](
        part_m, part_l, part_o, pos, k, loss_rows, w0m1, r, n, d, splits, k.stride(0),
        S_PAD=max(2, next_power_of_2(splits)), WITH_O=with_o, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return loss_rows, w0m1, (r if with_o else None)
