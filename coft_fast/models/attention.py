"""A faster way through open_clip's batch-first ``nn.MultiheadAttention``, exact to rounding: a contiguous
(L, N, E) copy keeps the input projection one matrix product. On CPUs the attention can stay in float32 under
bf16 autocast (``float32=True``), whose flash-attention backward is much slower in bf16."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class BatchMajorAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch first, self-attention) run on a contiguous sequence-major copy."""
    float32 = False

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (self.batch_first and query is key and key is value and query.dim() == 3):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        device = query.device.type
        exact = self.float32 and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if exact else contextlib.nullcontext():
            x = query.transpose(0, 1).contiguous()
            if exact:
                x = x.float()
                attn_mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
            self.batch_first = False
            try:
                out, weights = super().forward(x, x, x, key_padding_mask, need_weights, attn_mask,
                                               average_attn_weights, is_causal)
            finally:
                self.batch_first = True
        return out.transpose(0, 1), weights


class Float32Attention(BatchMajorAttention):
    """:class:`BatchMajorAttention` computed in float32 under autocast."""
    float32 = True


def use_batch_major_attention(model: nn.Module, float32: bool = False) -> int:
    """Switch ``model``'s batch-first attention modules to :class:`BatchMajorAttention`; returns how many."""
    modules = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m.batch_first]
    for module in modules:
        module.__class__ = Float32Attention if float32 else BatchMajorAttention
    return len(modules)
