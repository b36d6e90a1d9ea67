"""Prompt templates: one template, CLIP's ensemble, or a JSON file (per dataset or per class)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Union

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

SINGLE_TEMPLATE = "a photo of a {}."


class TemplateError(ValueError):
    """A template file or prompt is unusable; the message names it."""


def prompt_name(class_name: str) -> str:
    """The name that goes into prompts: underscores as spaces ("sea_lion" -> "sea lion"), as CoOp and DeFT."""
    return class_name.replace("_", " ")


def prompt_names(class_names: Sequence[str]) -> List[str]:
    return [prompt_name(name) for name in class_names]


def class_name_mapping(class_names: Sequence[str]) -> dict:
    """What a run writes to class_names.json: {original name: the name its prompts use}, in class order."""
    return {name: prompt_name(name) for name in class_names}


def templates_record(spec: Union[str, Path]):
    """metrics.json's record of the templates: "single", "ensemble", or {"file": path, "sha256": its hash}."""
    if str(spec) in ("single", "ensemble", "auto"):
        return str(spec)
    path = Path(spec)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        digest = None
    return {"file": str(path), "sha256": digest}


def clip_ensemble_templates() -> List[str]:
    """CLIP's 80 ImageNet templates (from open_clip), as strings with "{}" for the class name."""
    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def class_prompts(spec: Union[str, Path, Sequence[str]], class_names: Sequence[str]) -> List[List[str]]:
    """The prompts of every class, from "single", "ensemble", a list of templates with "{}", or a JSON file of
    either a template list or a mapping class name -> sentences; names go in as :func:`prompt_name` writes them."""
    if str(spec) == "auto":
        raise TemplateError("zeroshot.templates=auto must be resolved first (coft_fast.config.resolve_auto)")
    if isinstance(spec, (list, tuple)):
        templates, origin = list(spec), "template list"
    elif str(spec) == "single":
        templates, origin = [SINGLE_TEMPLATE], "single template"
    elif str(spec) == "ensemble":
        templates, origin = clip_ensemble_templates(), "CLIP template ensemble"
    else:
        path = origin = Path(spec)
        if not path.is_file():
            raise TemplateError(f"templates must be 'single', 'ensemble' or a JSON file; file not found: {path}")
        try:
            templates = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TemplateError(f"template file {path} is not valid JSON: {exc}") from None
        if isinstance(templates, dict):  # class -> sentences
            sentences = validate_class_sentences(templates, class_names, f"template file {path}")
            return [[s.replace("{}", prompt_name(name)) for s in sentences[name]] for name in class_names]
        if not isinstance(templates, list):
            raise TemplateError(f"template file {path}: expected a list of templates or a mapping class -> sentences")
        if not templates or not all(isinstance(t, str) for t in templates):
            raise TemplateError(f"template file {path}: expected a non-empty list of strings with '{{}}'")
    if not templates:
        raise TemplateError(f"{origin}: no templates")
    for template in templates:
        if "{}" not in template:
            raise TemplateError(f"{origin}: template {template!r} has no '{{}}' where the class name goes")
    return [[t.replace("{}", prompt_name(name)) for t in templates] for name in class_names]


def _listing(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def validate_class_sentences(data: Any, class_names: Sequence[str], origin: str) -> Dict[str, List[str]]:
    """``data`` checked to map exactly ``class_names`` to non-empty lists of sentences, in class order."""
    if not isinstance(data, dict):
        raise TemplateError(f"{origin}: expected a mapping class -> list of sentences, got {type(data).__name__}")
    known = set(class_names)
    unknown = [key for key in data if key not in known]
    missing = [name for name in class_names if name not in data]
    problems = []
    if missing:
        problems.append(f"class {missing[0]!r} needs a non-empty list of sentences (missing classes: "
                        f"{_listing(missing)})")
    if unknown:
        problems.append(f"{_listing(unknown)} are not class names of this task (keys must match the class names "
                        "exactly)")
    if problems:
        raise TemplateError(f"{origin}: " + "; ".join(problems))
    empty = [name for name in class_names if isinstance(data[name], list) and not data[name]]
    if empty:
        raise TemplateError(f"{origin}: class {empty[0]!r} needs a non-empty list of sentences (classes with an "
                            f"empty list: {_listing(empty)})")
    result = {}
    for name in class_names:
        sentences = data[name]
        if not isinstance(sentences, list):
            raise TemplateError(f"{origin}: class {name!r} needs a non-empty list of sentences, "
                                f"got {type(sentences).__name__}")
        for position, sentence in enumerate(sentences, 1):
            if not isinstance(sentence, str) or not sentence.strip():
                raise TemplateError(f"{origin}: class {name!r} needs a non-empty list of sentences; "
                                    f"entry {position} is {sentence!r}, expected a non-empty string")
        result[name] = [sentence.strip() for sentence in sentences]
    return result


def prompt_token_count(tokenizer: Callable, text: str) -> int:
    """Number of tokens of ``text`` including start and end tokens, without truncation."""
    encode = getattr(tokenizer, "encode", None)
    if encode is not None and hasattr(tokenizer, "sot_token_id"):
        clean = getattr(tokenizer, "clean_fn", None)
        return len(encode(clean(text) if clean else text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None:  # open_clip's HFTokenizer wraps a Hugging Face tokenizer
        return len(inner(text)["input_ids"])
    raise TypeError(f"cannot count tokens with tokenizer {type(tokenizer).__name__}")


def check_prompts_fit(tokenizer: Callable, prompts: Sequence[Sequence[str]], class_names: Sequence[str],
                      context_length: int, advice: str = "shorten the class name or template") -> None:
    """Raise a TemplateError naming the class and prompt that the text context cannot hold."""
    for name, class_prompts_ in zip(class_names, prompts):
        for prompt in class_prompts_:
            count = prompt_token_count(tokenizer, prompt)
            if count > context_length:
                raise TemplateError(f"prompt {prompt!r} of class {name!r} has {count} tokens, more than the "
                                    f"model's text context of {context_length}: {advice}")
