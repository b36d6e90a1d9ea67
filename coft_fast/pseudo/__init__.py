"""Pseudo-labelling: prompt templates and zero-shot scoring."""
from coft_fast.pseudo.templates import (
    SINGLE_TEMPLATE,
    TemplateError,
    check_prompts_fit,
    class_prompts,
    class_name_mapping,
    clip_ensemble_templates,
    prompt_name,
    prompt_names,
    prompt_token_count,
    templates_record,
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
    "class_name_mapping",
    "clip_ensemble_templates",
    "prompt_name",
    "prompt_names",
    "templates_record",
    "encode_images",
    "logit_scale_of",
    "prompt_token_count",
    "zeroshot_probabilities",
]
