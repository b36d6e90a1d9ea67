"""Deep visual prompt tuning (VPT-deep) for open_clip ViT towers: each block has its own N tokens, appended
in place of the previous block's and dropped after the last, injected by hooks while
:meth:`VisualPrompts.applied` is active (one frozen tower serves several models)."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn


def _vision_transformer_parts(visual: nn.Module):
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1"):
        raise TypeError(f"visual prompts need an open_clip ViT visual tower (conv1 + transformer.resblocks); "
                        f"got {type(visual).__name__}")
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

        def add_prompts(index: int, token_dim: int):
            """A pre-hook appending block ``index``'s prompts along ``token_dim`` in place of the previous ones."""

            def hook(module, args, kwargs):
                x = args[0]
                if index:
                    x = x.narrow(token_dim, 0, x.shape[token_dim] - n)
                shape = list(x.shape)
                shape[token_dim] = n
                prompts = self.tokens[index].to(x.dtype).unsqueeze(1 - token_dim).expand(shape)
                return (torch.cat([x, prompts], dim=token_dim),) + tuple(args[1:]), kwargs

            return hook

        # the transformer's input and output are always batch first (B, L, w); its blocks' may be (L, B, w)
        handles = [transformer.register_forward_pre_hook(add_prompts(0, 1), with_kwargs=True)]
        for index in range(1, len(blocks)):
            hook = add_prompts(index, 1 if self.batch_first else 0)
            handles.append(blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(transformer.register_forward_hook(lambda module, args, output: output[:, :-n]))  # drop them
        try:
            yield visual
        finally:
            for handle in handles:
                handle.remove()
