"""Pseudo-labelling: prompt templates, S*, the filter, label issues and transductive labels."""
from coft_fast.pseudo.templates import (SINGLE_TEMPLATE, TemplateError, check_prompts_fit, class_name_mapping,
                                        class_prompts, clip_ensemble_templates, prompt_name, prompt_names,
                                        prompt_token_count, templates_record)

__all__ = ["SINGLE_TEMPLATE", "TemplateError", "check_prompts_fit", "class_prompts", "class_name_mapping",
           "clip_ensemble_templates", "prompt_name", "prompt_names", "templates_record", "prompt_token_count"]
