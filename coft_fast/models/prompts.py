"""CoOp-style dual prompts: [SOS] V_1..V_M <class name> "." [EOS], the M context vectors learned (shared
positive and negative ones). All 2C prompts go through the frozen text tower in one call, cut after the
longest prompt's end-of-text token (exact: the tower is causal and pools there)."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import torch.nn as nn

from coft_fast.pseudo.templates import check_prompts_fit

PLACEHOLDER = "X"


def prompt_texts(class_names: Sequence[str], n_ctx: int) -> list:
    """Per class, the text whose first ``n_ctx`` word tokens become the learned context."""
    return [" ".join([PLACEHOLDER] * n_ctx) + f" {name}." for name in class_names]


def check_dual_prompts_fit(tokenizer: Callable, class_names: Sequence[str], n_ctx: int, context_length: int) -> None:
    """Raise TemplateError naming the first class whose phase-I prompt exceeds the text context."""
    check_prompts_fit(tokenizer, [[text] for text in prompt_texts(class_names, n_ctx)], class_names, context_length,
                      f"shorten the name or lower phase1.n_ctx ({n_ctx} learned context tokens)")


def encode_text_prefix(model: nn.Module, embeddings: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
    """open_clip's text tower on token embeddings (B, L, w) of any length L <= context, pooled at ``eot_index``."""
    length = embeddings.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = embeddings.to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    x = x[torch.arange(x.shape[0], device=x.device), eot_index]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class DualPromptLearner(nn.Module):
    """Learned positive and negative contexts; ``forward()`` -> (pos_text, neg_text), each (C, d), unnormalised."""

    def __init__(self, clip_model: nn.Module, tokenizer: Callable, class_names: Sequence[str], n_ctx: int = 16,
                 init_std: float = 0.02, generator: torch.Generator | None = None, joint: bool = True):
        super().__init__()
        pool_type = getattr(clip_model, "text_pool_type", "argmax")
        if pool_type != "argmax":
            raise ValueError(f"dual prompts need a CLIP text tower that pools at the end-of-text token "
                             f"(text_pool_type 'argmax'), this model uses {pool_type!r}")
        check_dual_prompts_fit(tokenizer, class_names, n_ctx, int(clip_model.context_length))
        tokens = tokenizer(prompt_texts(class_names, n_ctx))  # (C, L)
        eot = tokens.argmax(dim=-1)  # EOT has the highest token id
        # not joint: the research code's two calls over the full context (the naive baseline)
        self.joint = joint
        cut = int(eot.max()) + 1 if joint else tokens.shape[1]
        with torch.no_grad():
            embedded = clip_model.token_embedding(tokens[:, :cut].to(clip_model.token_embedding.weight.device))
        width = embedded.shape[-1]
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)  # SOS
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)  # name . EOS pad
        self.register_buffer("eot_index", eot, persistent=False)
        self.n_ctx, self.num_classes, self.cut = n_ctx, len(class_names), cut
        ctx = torch.empty(2, n_ctx, width).normal_(0.0, init_std, generator=generator)
        self.ctx_pos = nn.Parameter(ctx[0].clone())
        self.ctx_neg = nn.Parameter(ctx[1].clone())
        self._encoder = [clip_model]

    def prompt_embeddings(self) -> torch.Tensor:
        """(2C, cut, width): positive prompts of all classes, then negative ones."""
        c = self.num_classes
        ctx = torch.stack([self.ctx_pos, self.ctx_neg]).to(self.token_prefix.dtype)  # (2, M, w)
        ctx = ctx[:, None].expand(2, c, -1, -1).reshape(2 * c, self.n_ctx, -1)
        return torch.cat([self.token_prefix.repeat(2, 1, 1), ctx, self.token_suffix.repeat(2, 1, 1)], dim=1)

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        embeddings, c, model = self.prompt_embeddings(), self.num_classes, self._encoder[0]
        if not self.joint:
            return tuple(encode_text_prefix(model, part, self.eot_index) for part in (embeddings[:c], embeddings[c:]))
        features = encode_text_prefix(model, embeddings, self.eot_index.repeat(2))
        return features[:c], features[c:]
