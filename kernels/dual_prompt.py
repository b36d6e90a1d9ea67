"""The dual-prompt head of CoFT phase I in Triton: L1 + lambda * L2 and p_clean without N x C tensors.

Notation: x = image_feats (N, d), P = pos_text (C, d), Q = neg_text (C, d), s = logit_scale,
y / yc = labels / complement labels, S = s * x @ P.T (the positive logits).
    l1_i = logsumexp_k S_ik - S_iy
    m_y = S_iy - s * x_i . Q_y,  m_c = S_iyc - s * x_i . Q_yc          (p_clean = sigmoid(margin))
    l2_i = softplus(-m_y) + softplus(m_c)
Only two columns of the negative logits enter the loss, so the kernels read the two rows Q_y and
Q_yc per sample instead of computing the whole N x C negative logit matrix.

Forward (no N x C tensor is written):
  1. ``_dual_partial_kernel``, grid (row blocks, column slices): one pass over P per row block,
     tile by tile, with an online max / sum of exp per row (split over C, flash-decoding style, so
     that a small batch still fills the GPU), and picks S_iy and S_iyc out of the tiles. The
     programs of the first slice also compute the negative dot products x_i . Q_y and x_i . Q_yc.
  2. ``_dual_finalize_kernel`` (one program): merges the slices, writes the per-row log-sum-exp and
     clean probabilities p_clean(y), p_clean(yc) that backward needs, and the three mean losses.
Backward:
  3. ``_dual_logit_grad_kernel``, grid (row blocks, column blocks): recomputes the logit tiles and
     writes dS (N x C; backward is allowed that one intermediate), then cuBLAS does
     dx = dS @ P and dP = dS.T @ x.
  4. ``_dual_rows_kernel``: the two gathered negative rows: dQ by atomic adds (fp32; the summation
     order, like torch's index_add_ on CUDA, is not deterministic; under
     ``torch.use_deterministic_algorithms(True)`` dQ is instead one GEMM over an N x C one-hot
     coefficient matrix, and the autotuners give way to one fixed config) and the negative part of
     dx (unless ``detach_image_in_neg``), to which one addmm_ adds dS @ P.
The logit scale is read from device memory when it is a tensor (no host synchronisation) and gets
a gradient when it requires one, from the GEMM results: (sum(dP * P) + sum(dQ * Q)) / s.
Offsets that multiply two sizes are int64; launches enter the tensors' CUDA device. The autograd
wiring (torch.library custom ops) is in coft_fast.ops.dual_prompt.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

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


_TILE_SHAPES = [(16, 64, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
                (64, 128, 64, 8, 3), (32, 64, 128, 4, 2), (64, 64, 128, 8, 2)]
# fp32 logit-tile elements one thread may hold
_ACCUMULATORS_PER_THREAD = 64


def _tile_config_list():
    return [triton.Config({"BLOCK_N": n, "BLOCK_C": c, "BLOCK_D": d}, num_warps=w, num_stages=s)
            for n, c, d, w, s in _TILE_SHAPES]


def _tile_configs():
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_C": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1)]
    return _tile_config_list()


def tile_shared_memory(config, item: int, upcast: bool) -> int:
    """Upper bound of the shared memory of the logit-tile kernels under ``config`` (bytes): ``num_stages``
    (x, P) chunk pairs in flight, their fp32 copies when upcast, a transposed copy of the P chunk.
    Checked against the compiler's figure by tests/test_kernels_aot.py."""
    n, c, d = (config.kwargs[name] for name in ("BLOCK_N", "BLOCK_C", "BLOCK_D"))
    compute_item = 4 if upcast else item
    total = max(1, config.num_stages) * (n + c) * d * item + c * d * compute_item
    if upcast and item != 4:
        total += (n + c) * d * 4
    return total


def keep_tile_configs(configs, d: int, item: int, shared_memory: int, upcast: bool = None):
    """The configs the op may launch for feature size ``d`` with ``item``-byte features on a GPU with
    ``shared_memory`` bytes per block (fp32 features are upcast operands: tf32 dots)."""
    upcast = item == 4 if upcast is None else upcast
    kept = []
    for config in configs:
        n, c, block_d = (config.kwargs[name] for name in ("BLOCK_N", "BLOCK_C", "BLOCK_D"))
        if block_d > max(64, next_power_of_2(d)):
            continue
        if n * c > _ACCUMULATORS_PER_THREAD * 32 * config.num_warps:
            continue
        if tile_shared_memory(config, item, upcast) > shared_memory:
            continue
        kept.append(config)
    return kept


def _prune_tiles(configs, named_args, **kwargs):
    if interpreting():
        return configs
    x = named_args["x_ptr"]
    limit = device_shared_memory(x.device)
    kept = keep_tile_configs(configs, named_args["D"], x.element_size(), limit)
    if not kept:
        raise triton.runtime.errors.OutOfResources(0, limit, "shared memory")
    return kept


def _launch_tiles(kernel, grid, args, constexprs, d, x):
    """An autotuned launch, or under deterministic algorithms the first kept config (fixed order)."""
    if not deterministic() or interpreting():
        kernel[grid](*args, **constexprs)
        return
    limit = device_shared_memory(x.device)
    kept = keep_tile_configs(_tile_config_list(), d, x.element_size(), limit)
    if not kept:
        raise triton.runtime.errors.OutOfResources(0, limit, "shared memory")
    config = kept[0]
    kernel.fn[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@triton.jit
def _scale(scale_ptr, scale_val, SCALE_FROM_PTR: tl.constexpr):
    if SCALE_FROM_PTR:
        return tl.load(scale_ptr).to(tl.float32)
    else:
        return scale_val


@triton.jit
def _logit_tile(x_ptr, p_ptr, rows, row_mask, cols, col_mask, D, stride_x, stride_p,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x[rows] @ P[cols].T over the feature dimension, fp32 accumulation, (BLOCK_N, BLOCK_C)."""
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # N * d may pass 2**31
    p_rows = p_ptr + cols.to(tl.int64)[:, None] * stride_p
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        xt = tl.load(x_rows + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        pt = tl.load(p_rows + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            pt = pt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(pt), acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=_tile_configs(), key=["N_KEY", "C_KEY", "D"],
                 prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit
def _dual_partial_kernel(
    x_ptr, pos_ptr, neg_ptr, y_ptr, yc_ptr, scale_ptr, scale_val,
    part_m_ptr, part_l_ptr, part_sy_ptr, part_sc_ptr, neg_y_ptr, neg_c_ptr,
    N, C, D, stride_x, stride_p, stride_n, cols_per_split, N_KEY, C_KEY,
    SCALE_FROM_PTR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    s = _scale(scale_ptr, scale_val, SCALE_FROM_PTR)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=0)
    yc = tl.load(yc_ptr + rows, mask=row_mask, other=0)

    lo = pid_s * cols_per_split
    hi = tl.minimum(lo + cols_per_split, C)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    s_y = tl.zeros([BLOCK_N], tl.float32)
    s_c = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < hi
        logits = _logit_tile(x_ptr, pos_ptr, rows, row_mask, cols, col_mask, D, stride_x, stride_p,
                             BLOCK_N, BLOCK_C, BLOCK_D, UPCAST, PRECISION) * s
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        # (columns past this slice are -inf in the tile, and may be a label of the next slice)
        s_y += tl.sum(tl.where((cols[None, :] == y[:, None]) & col_mask[None, :], logits, 0.0), axis=1)
        s_c += tl.sum(tl.where((cols[None, :] == yc[:, None]) & col_mask[None, :], logits, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    offs = pid_s * N + rows
    tl.store(part_m_ptr + offs, m_i, mask=row_mask)
    tl.store(part_l_ptr + offs, l_i, mask=row_mask)
    tl.store(part_sy_ptr + offs, s_y, mask=row_mask)
    tl.store(part_sc_ptr + offs, s_c, mask=row_mask)

    if pid_s == 0:  # the two gathered negative logits (raw dot products, fp32)
        dot_y = tl.zeros([BLOCK_N], tl.float32)
        dot_c = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims[None, :] < D)
            xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            qy = tl.load(neg_ptr + y.to(tl.int64)[:, None] * stride_n + dims[None, :], mask=mask, other=0.0).to(tl.float32)
            qc = tl.load(neg_ptr + yc.to(tl.int64)[:, None] * stride_n + dims[None, :], mask=mask,
                         other=0.0).to(tl.float32)
            dot_y += tl.sum(xt * qy, axis=1)
            dot_c += tl.sum(xt * qc, axis=1)
        tl.store(neg_y_ptr + rows, dot_y, mask=row_mask)
        tl.store(neg_c_ptr + rows, dot_c, mask=row_mask)


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _dual_finalize_kernel(
    part_m_ptr, part_l_ptr, part_sy_ptr, part_sc_ptr, neg_y_ptr, neg_c_ptr, scale_ptr, scale_val, lam,
    lse_ptr, p_y_ptr, p_c_ptr, loss_ptr, l1_ptr, l2_ptr, N, SPLITS,
    SCALE_FROM_PTR: tl.constexpr, S_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    s = _scale(scale_ptr, scale_val, SCALE_FROM_PTR)
    splits = tl.arange(0, S_PAD)
    sum1 = tl.zeros([BLOCK_N], tl.float32)
    sum2 = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        mask = (splits[:, None] < SPLITS) & row_mask[None, :]
        offs = splits[:, None] * N + rows[None, :]
        pm = tl.load(part_m_ptr + offs, mask=mask, other=float("-inf"))
        pl = tl.load(part_l_ptr + offs, mask=mask, other=0.0)
        big = tl.max(pm, axis=0)
        big = tl.where(row_mask, big, 0.0)
        lse = big + tl.log(tl.where(row_mask, tl.sum(pl * tl.exp(pm - big[None, :]), axis=0), 1.0))
        s_y = tl.sum(tl.load(part_sy_ptr + offs, mask=mask, other=0.0), axis=0)
        s_c = tl.sum(tl.load(part_sc_ptr + offs, mask=mask, other=0.0), axis=0)
        margin_y = s_y - s * tl.load(neg_y_ptr + rows, mask=row_mask, other=0.0)
        margin_c = s_c - s * tl.load(neg_c_ptr + rows, mask=row_mask, other=0.0)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        tl.store(p_y_ptr + rows, _sigmoid(margin_y), mask=row_mask)
        tl.store(p_c_ptr + rows, _sigmoid(margin_c), mask=row_mask)
        sum1 += tl.where(row_mask, lse - s_y, 0.0)
        sum2 += tl.where(row_mask, _softplus(-margin_y) + _softplus(margin_c), 0.0)
    l1 = tl.sum(sum1, axis=0) / N
    l2 = tl.sum(sum2, axis=0) / N
    tl.store(l1_ptr, l1)
    tl.store(l2_ptr, l2)
    tl.store(loss_ptr, l1 + lam * l2)


@triton.jit
def _grad_coefficients(g_loss_ptr, g_l1_ptr, g_l2_ptr, lam, N):
    """a = dL/d(sum of l1_i), b = dL/d(sum of l2_i) for the three outputs' incoming gradients."""
    g_loss = tl.load(g_loss_ptr).to(tl.float32)
    a = (g_loss + tl.load(g_l1_ptr).to(tl.float32)) / N
    b = (lam * g_loss + tl.load(g_l2_ptr).to(tl.float32)) / N
    return a, b


@triton.autotune(configs=_tile_configs(), key=["N_KEY", "C_KEY", "D"],
                 prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit
def _dual_logit_grad_kernel(
    x_ptr, pos_ptr, y_ptr, yc_ptr, scale_ptr, scale_val, lse_ptr, p_y_ptr, p_c_ptr,
    g_loss_ptr, g_l1_ptr, g_l2_ptr, lam, grad_ptr,
    N, C, D, stride_x, stride_p, N_KEY, C_KEY,
    SCALE_FROM_PTR: tl.constexpr, DETACH_POS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = _scale(scale_ptr, scale_val, SCALE_FROM_PTR)
    a, b = _grad_coefficients(g_loss_ptr, g_l1_ptr, g_l2_ptr, lam, N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    raw = _logit_tile(x_ptr, pos_ptr, rows, row_mask, cols, col_mask, D, stride_x, stride_p,
                      BLOCK_N, BLOCK_C, BLOCK_D, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    is_y = cols[None, :] == y[:, None]
    softmax = tl.exp(raw * s - lse[:, None])
    dlogits = a * (softmax - tl.where(is_y, 1.0, 0.0))
    if not DETACH_POS:  # L2 through the positive logits at the label and complement columns
        yc = tl.load(yc_ptr + rows, mask=row_mask, other=-1)
        p_y = tl.load(p_y_ptr + rows, mask=row_mask, other=0.0)
        p_c = tl.load(p_c_ptr + rows, mask=row_mask, other=0.0)
        dlogits += tl.where(is_y, b * (p_y - 1.0)[:, None], 0.0)
        dlogits += tl.where(cols[None, :] == yc[:, None], b * p_c[:, None], 0.0)
    mask = row_mask[:, None] & col_mask[None, :]
    dlogits = tl.where(mask, dlogits, 0.0)
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], (dlogits * s).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dual_rows_kernel(
    x_ptr, neg_ptr, y_ptr, yc_ptr, scale_ptr, scale_val, p_y_ptr, p_c_ptr,
    g_loss_ptr, g_l1_ptr, g_l2_ptr, lam, dx_ptr, dneg_ptr,
    N, D, stride_x, stride_n,
    SCALE_FROM_PTR: tl.constexpr, NEED_DX: tl.constexpr, NEED_DNEG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = _scale(scale_ptr, scale_val, SCALE_FROM_PTR)
    a, b = _grad_coefficients(g_loss_ptr, g_l1_ptr, g_l2_ptr, lam, N)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=0)
    yc = tl.load(yc_ptr + rows, mask=row_mask, other=0)
    # dL/d(negative logit): -dL/dm, with dL/dm_y = b (p_y - 1) and dL/dm_c = b p_c
    c_y = tl.where(row_mask, b * (1.0 - tl.load(p_y_ptr + rows, mask=row_mask, other=0.0)), 0.0)
    c_c = tl.where(row_mask, -b * tl.load(p_c_ptr + rows, mask=row_mask, other=0.0), 0.0)
    rows64, y64, yc64 = rows.to(tl.int64), y.to(tl.int64), yc.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims[None, :] < D)
        xt = tl.load(x_ptr + rows64[:, None] * stride_x + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        qy = tl.load(neg_ptr + y64[:, None] * stride_n + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        qc = tl.load(neg_ptr + yc64[:, None] * stride_n + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DX:
            dx = s * (c_y[:, None] * qy + c_c[:, None] * qc)
            tl.store(dx_ptr + rows64[:, None] * D + dims[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DNEG:
            tl.atomic_add(dneg_ptr + y64[:, None] * D + dims[None, :], (s * c_y)[:, None] * xt, mask=mask)
            tl.atomic_add(dneg_ptr + yc64[:, None] * D + dims[None, :], (s * c_c)[:, None] * xt, mask=mask)


@triton.jit
def _clean_probability_kernel(
    x_ptr, pos_ptr, neg_ptr, y_ptr, scale_ptr, scale_val, out_ptr, N, D, stride_x, stride_p, stride_n,
    SCALE_FROM_PTR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = _scale(scale_ptr, scale_val, SCALE_FROM_PTR)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=0)
    margin = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (dims[None, :] < D)
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + dims[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        py = tl.load(pos_ptr + y.to(tl.int64)[:, None] * stride_p + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        qy = tl.load(neg_ptr + y.to(tl.int64)[:, None] * stride_n + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        margin += tl.sum(xt * (py - qy), axis=1)
    tl.store(out_ptr + rows, _sigmoid(s * margin), mask=row_mask)


# ----------------------------------------------------------------------------------------------- host side

def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale_args(scale, device):
    """(pointer tensor, float, from_pointer): a tensor scale is read on the device, never synchronised."""
    if isinstance(scale, torch.Tensor):
        return scale, 0.0, True
    return torch.empty(0, device=device), float(scale), False


def _check_inputs(image_feats, pos_text, neg_text):
    require_runnable(image_feats)
    for name, t in (("image_feats", image_feats), ("pos_text", pos_text), ("neg_text", neg_text)):
        if t.dtype not in _TL_FLOATS:
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32 {name}, got {t.dtype} "
                            "(use backend='reference' for float64)")


def _on_device(tensor: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (a run on cuda:1)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# the finalize kernel holds (slices x 128) statistics in registers: at most 32 slices (checked by the AOT test)
MAX_SPLITS = 32


def _splits(n: int, c: int, device: torch.device) -> int:
    row_blocks = triton.cdiv(n, 32)
    return max(1, min(triton.cdiv(2 * sm_count(device), row_blocks), triton.cdiv(c, 128), MAX_SPLITS))


def _block_d(d: int) -> int:
    return min(128, max(16, next_power_of_2(d))) if not interpreting() else max(16, next_power_of_2(d))


def dual_forward_triton(x, pos, neg, y, yc, scale, lam, splits=None):
    """(loss, l1, l2, lse, p_y, p_c), fp32: the three 0-dim losses and the per-row statistics backward needs.
    ``scale``: a float or a 0-dim tensor on the features' device; ``splits`` (tests only) fixes the slices."""
    _check_inputs(x, pos, neg)
    x, pos, neg, y, yc = _rows(x), _rows(pos), _rows(neg), y.contiguous(), yc.contiguous()
    with _on_device(x):
        return _dual_forward(x, pos, neg, y, yc, scale, lam, splits)


def _dual_forward(x, pos, neg, y, yc, scale, lam, splits=None):
    n, d = x.shape
    c = pos.shape[0]
    device = x.device
    if splits is None:
        splits = _splits(n, c, device)
    splits = max(1, min(int(splits), c, MAX_SPLITS))
    cols_per_split = triton.cdiv(c, splits)
    if cols_per_split > 128:  # slice starts aligned to the largest column tile
        cols_per_split = triton.cdiv(cols_per_split, 128) * 128
    f32 = dict(device=device, dtype=torch.float32)
    part_m, part_l, part_sy, part_sc = (torch.empty(splits, n, **f32) for _ in range(4))
    neg_y, neg_c = torch.empty(n, **f32), torch.empty(n, **f32)
    scale_ptr, scale_val, from_ptr = _scale_args(scale, device)
    upcast = interpreting() or x.dtype == torch.float32
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    _launch_tiles(_dual_partial_kernel, grid, (
        x, pos, neg, y, yc, scale_ptr, scale_val, part_m, part_l, part_sy, part_sc, neg_y, neg_c,
        n, c, d, x.stride(0), pos.stride(0), neg.stride(0), cols_per_split, bucket(n), bucket(c),
    ), dict(SCALE_FROM_PTR=from_ptr, UPCAST=upcast, PRECISION=dot_precision(torch.float32 if upcast else x.dtype)),
        d, x)
    lse, p_y, p_c = (torch.empty(n, **f32) for _ in range(3))
    loss, l1, l2 = (torch.empty((), **f32) for _ in range(3))
    _dual_finalize_kernel[(1,)](
        part_m, part_l, part_sy, part_sc, neg_y, neg_c, scale_ptr, scale_val, float(lam),
        lse, p_y, p_c, loss, l1, l2, n, splits,
        SCALE_FROM_PTR=from_ptr, S_PAD=max(2, next_power_of_2(splits)), BLOCK_N=64 if interpreting() else 128,
    )
    return loss, l1, l2, lse, p_y, p_c


def dual_backward_triton(x, pos, neg, y, yc, lse, p_y, p_c, scale, grads, lam, detach_image_in_neg,
                         detach_pos_in_l2, need_x, need_pos, need_neg, need_scale):
    """(dx, dpos, dneg, dscale), None where not needed, from the incoming gradients ``grads`` of
    (loss, l1, l2) (0-dim tensors). Under deterministic algorithms the gathered rows' gradient dneg
    is one GEMM over a one-hot coefficient matrix instead of atomic adds (a fixed summation order)."""
    x, pos, neg, y, yc = _rows(x), _rows(pos), _rows(neg), y.contiguous(), yc.contiguous()
    with _on_device(x):
        return _dual_backward(x, pos, neg, y, yc, lse, p_y, p_c, scale, grads, lam, detach_image_in_neg,
                              detach_pos_in_l2, need_x, need_pos, need_neg, need_scale)


def _dual_backward(x, pos, neg, y, yc, lse, p_y, p_c, scale, grads, lam, detach_image_in_neg, detach_pos_in_l2,
                   need_x, need_pos, need_neg, need_scale):
    n, d = x.shape
    c = pos.shape[0]
    device = x.device
    scale_ptr, scale_val, from_ptr = _scale_args(scale, device)
    grads = [g.reshape(()).float().contiguous() for g in grads]
    upcast = interpreting() or x.dtype == torch.float32
    precision = dot_precision(torch.float32 if upcast else x.dtype)
    f32 = dict(device=device, dtype=torch.float32)
    dx = dpos = dneg = dscale = None

    # The scale's gradient needs no kernel of its own: sum_ik dS_ik (x_i . P_k) = sum(dP * P) / s
    # with dP = (s dS).T @ x, and likewise for the gathered negative rows with dQ.
    if need_x or need_pos or need_scale:
        # s * dS in the features' dtype, for the two GEMMs on tensor cores (fp32 stays fp32)
        dlogits = torch.empty(n, c, device=device, dtype=x.dtype)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
        _launch_tiles(_dual_logit_grad_kernel, grid, (
            x, pos, y, yc, scale_ptr, scale_val, lse, p_y, p_c, *grads, float(lam), dlogits,
            n, c, d, x.stride(0), pos.stride(0), bucket(n), bucket(c),
        ), dict(SCALE_FROM_PTR=from_ptr, DETACH_POS=detach_pos_in_l2, UPCAST=upcast, PRECISION=precision), d, x)
        if need_pos or need_scale:
            dpos = torch.mm(dlogits.T, x)
    need_dx_neg = need_x and not detach_image_in_neg
    need_dneg = need_neg or need_scale
    atomic = need_dneg and not deterministic()
    if need_dx_neg or atomic:
        if need_dx_neg:
            dx = torch.empty(n, d, device=device, dtype=x.dtype)
        dneg32 = torch.zeros(c, d, **f32) if atomic else lse
        block_n, block_d = 16, _block_d(d)
        _dual_rows_kernel[(triton.cdiv(n, block_n),)](
            x, neg, y, yc, scale_ptr, scale_val, p_y, p_c, *grads, float(lam),
            dx if need_dx_neg else lse, dneg32, n, d, x.stride(0), neg.stride(0),
            SCALE_FROM_PTR=from_ptr, NEED_DX=need_dx_neg, NEED_DNEG=atomic, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    if need_dneg and not atomic:  # dQ = s * W.T @ x, W holding c_y at (i, y_i) and c_c at (i, yc_i)
        b = (lam * grads[0] + grads[2]) / n
        weights = (torch.nn.functional.one_hot(y, c).float() * (b * (1.0 - p_y))[:, None]
                   - torch.nn.functional.one_hot(yc, c).float() * (b * p_c)[:, None])
        dneg32 = torch.mm(weights.T, x.float()) * (scale.float() if isinstance(scale, torch.Tensor) else scale)
    if need_neg:
        dneg = dneg32 if neg.dtype == torch.float32 else dneg32.to(neg.dtype)
    if need_x:
        if need_dx_neg:
            dx.addmm_(dlogits, pos)  # dx = negative part + dS @ P, one GEMM with beta = 1
        else:
            dx = torch.mm(dlogits, pos)
    if need_scale:  # logit_scale = exp(parameter) > 0, so the division is safe
        total = (dpos.float() * pos.float()).sum() + (dneg32 * neg.float()).sum()
        dscale = (total / scale.float()).to(scale.dtype).reshape(scale.shape)
        if not need_pos:
            dpos = None
    return dx, dpos, dneg, dscale


def clean_probability_triton(image_feats, pos_text, neg_text, labels, logit_scale):
    """(N,) fp32 p_clean(label), one gathered pass over the two label rows per sample."""
    _check_inputs(image_feats, pos_text, neg_text)
    x, pos, neg = _rows(image_feats), _rows(pos_text), _rows(neg_text)
    n, d = x.shape
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    scale_ptr, scale_val, from_ptr = _scale_args(logit_scale, x.device)
    block_n = 64 if interpreting() else 32
    with _on_device(x):
        _clean_probability_kernel[(triton.cdiv(n, block_n),)](
            x, pos, neg, labels.contiguous(), scale_ptr, scale_val, out, n, d, x.stride(0), pos.stride(0),
            neg.stride(0), SCALE_FROM_PTR=from_ptr, BLOCK_N=block_n, BLOCK_D=_block_d(d),
        )
    return out
