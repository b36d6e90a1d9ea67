"""Deep visual prompt tuning (VPT-deep) for open_clip ViT visual towers, without changing their code.

Each transformer block i has its own N learnable tokens. Before block 0 they are appended after the
class and patch tokens; before block i > 0 the tokens that came out of block i-1 are dropped and
block i's appended, so the sequence stays 1 + patches + N. After the last block the prompt tokens
are dropped, so pooling (class token or patch average) and ``ln_post`` see the usual sequence.
With N = 0 the tower is exactly the frozen pre-trained one. The prompts are injected with forward
hooks while :meth:`VisualPrompts.applied` is active, so one frozen tower can serve several models.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn


def _vision_transformer_parts(visual: nn.Module):
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1"):
        raise TypeError(
            f"visual prompts need an open_clip ViT visual tower (conv1 + transformer.resblocks); "
            f"got {type(visual).__name__}"
        )
    return transformer, blocks


class VisualPrompts(nn.Module):
    """``num_tokens`` learnable tokens per block of a ViT tower; uniform VPT initialisation."""

    def __init__(self, visual: nn.Module, num_tokens: int = 20, generator: torch.Generator | None = None):
        super().__init__()
        transformer, blocks = _vision_transformer_parts(visual)
        width = visual.conv1.out_channels
        patch_h, patch_w = visual.conv1.kernel_size
        bound = math.sqrt(6.0 / float(3 * patch_h * patch_w + width))
        tokens = torch.empty(len(blocks), num_tokens, width).uniform_(-bound, bound, generator=generator)
        self.tokens = nn.Parameter(tokens)
        self.num_tokens = num_tokens
        self.batch_first = getattr(transformer, "batch_first", True)

    @contextlib.contextmanager
    def applied(self, visual: nn.Module):
        """Inject the prompts into ``visual`` for the duration of the block."""
        if self.num_tokens == 0:
            yield visual
            return
        transformer, blocks = _vision_transformer_parts(visual)
        if len(blocks) != self.tokens.shape[0]:
            raise ValueError(f"these prompts were made for {self.tokens.shape[0]} blocks, the tower has {len(blocks)}")
        n = self.num_tokens
        handles = []

        def append_first(module, args, kwargs):
            x = args[0]  # (B, 1 + P, w): the transformer's input is always batch first
            prompts = self.tokens[0].to(x.dtype).expand(x.shape[0], -1, -1)
            return (torch.cat([x, prompts], dim=1),) + tuple(args[1:]), kwargs

        def make_replace(index):
            def replace(module, args, kwargs):
                x = args[0]
                if self.batch_first:
                    prompts = self.tokens[index].to(x.dtype).expand(x.shape[0], -1, -1)
                    x = torch.cat([x[:, :-n], prompts], dim=1)
                else:  # (L, B, w)
                    prompts = self.tokens[index].to(x.dtype)[:, None].expand(-1, x.shape[1], -1)
                    x = torch.cat([x[:-n], prompts], dim=0)
                return (x,) + tuple(args[1:]), kwargs

            return replace

        def drop_prompts(module, args, output):
            return output[:, :-n]

        handles.append(transformer.register_forward_pre_hook(append_first, with_kwargs=True))
        for index in range(1, len(blocks)):
            handles.append(blocks[index].register_forward_pre_hook(make_replace(index), with_kwargs=True))
        handles.append(transformer.register_forward_hook(drop_prompts))
        try:
            yield visual
        finally:
            for handle in handles:
                handle.remove()
