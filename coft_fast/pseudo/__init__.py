"""Pseudo-labelling: prompt templates and zero-shot scoring."""
from coft_fast.pseudo.templates import (
    SINGLE_TEMPLATE,
    TemplateError,
    check_prompts_fit,
    class_prompts,
    clip_ensemble_templates,
    prompt_token_count,
)
from coft_fast.pseudo.zeroshot import (
    ZeroShotResult,
    class_text_embeddings,
    encode_images,
    logit_scale_of,
    zeroshot_probabilities,
)

__all__ = [
    "SINGLE_TEMPLATE",
    "TemplateError",
    "ZeroShotResult",
    "check_prompts_fit",
    "class_prompts",
    "class_text_embeddings",
    "clip_ensemble_templates",
    "encode_images",
    "logit_scale_of",
    "prompt_token_count",
    "zeroshot_probabilities",
]
