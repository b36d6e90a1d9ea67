"""Per-class prompt sentences written by an LLM: the prompt to paste, and :func:`ask_llm`'s client."""
from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Sequence

from coft_fast.pseudo.templates import TemplateError, validate_class_sentences

MAX_WORDS = 20  # keeps a sentence well inside CLIP's 77-token text context
SYSTEM_MESSAGE = "You write short visual descriptions for zero-shot image classification. You answer with JSON only."
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)```", re.DOTALL)


def llm_prompt(class_names: Sequence[str], per_class: int = 10, dataset_hint: Optional[str] = None) -> str:
    """The instruction text to paste into any LLM; its answer is a JSON object class -> sentences."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    if not class_names:
        raise ValueError("no class names to write sentences for")
    first = class_names[0]
    about = f" The classes are {dataset_hint.strip()}." if dataset_hint and dataset_hint.strip() else ""
    example = json.dumps({first: [f"a photo of a {first}, a type of ...", f"a {first} with ..."]}, ensure_ascii=False)
    return (
        f"I am building a zero-shot image classifier with CLIP.{about} For each of the {len(class_names)} class "
        f"names listed at the end, write {per_class} short, different sentences that describe what a photo of "
        "that class looks like.\n\n"
        "Rules:\n"
        f"- Every sentence contains the class name exactly as written, e.g. \"a photo of a {first}, a type of ...\".\n"
        "- Describe visual features only: shape, colour, texture, parts, typical surroundings. "
        "Nothing that cannot be seen in a photo.\n"
        f"- Keep every sentence under {MAX_WORDS} words: CLIP reads at most 77 tokens of text and longer "
        "sentences are refused.\n"
        "- Answer with one JSON object and nothing else (no prose, no explanation): its keys are the class names "
        f"exactly as listed (same spelling, case and punctuation), each value a list of {per_class} strings.\n\n"
        f"Format (shortened):\n{example}\n\n"
        f"Class names ({len(class_names)}, as a JSON list):\n{json.dumps(list(class_names), ensure_ascii=False)}\n"
    )


def chat_completions_url(url: str) -> str:
    """The ``/chat/completions`` endpoint of a base URL such as ``http://localhost:8000/v1``."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def ask_llm(url: str, model: str, class_names: Sequence[str], per_class: int = 10, dataset_hint: Optional[str] = None,
            api_key: Optional[str] = None, timeout: float = 120.0) -> Dict[str, List[str]]:
    """The validated sentences of every class from an OpenAI-compatible chat endpoint (else a TemplateError)."""
    endpoint = chat_completions_url(url)
    messages = [{"role": "system", "content": SYSTEM_MESSAGE},
                {"role": "user", "content": llm_prompt(class_names, per_class, dataset_hint)}]
    body = {"model": model, "messages": messages, "temperature": 0}
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace") if exc.fp else ""
        raise TemplateError(f"LLM endpoint {endpoint}: HTTP {exc.code} {exc.reason}: {_excerpt(detail)}") from None
    except urllib.error.URLError as exc:
        raise TemplateError(f"LLM endpoint {endpoint}: cannot connect ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, dropped connections
        raise TemplateError(f"LLM endpoint {endpoint}: no answer ({exc}; timeout {timeout:g} s)") from None
    except ValueError as exc:  # e.g. a URL without http:// or https://
        raise TemplateError(f"LLM endpoint {endpoint}: invalid URL ({exc})") from None

    try:
        reply = json.loads(raw)
    except json.JSONDecodeError:
        raise TemplateError(f"LLM endpoint {endpoint}: the reply is not JSON: {_excerpt(raw)}") from None
    try:
        choice = reply["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise TemplateError(f"LLM endpoint {endpoint}: the reply has no choices[0].message.content "
                            f"(not an OpenAI-compatible chat completion): {_excerpt(raw)}") from None
    if not isinstance(content, str):
        raise TemplateError(f"LLM endpoint {endpoint}: choices[0].message.content is "
                            f"{type(content).__name__}, expected text")
    try:
        fenced = _FENCE.search(content)  # a ```json ... ``` block, or the whole answer
        data = json.loads((fenced.group(1) if fenced else content).strip())
    except json.JSONDecodeError as exc:
        cut = " (the answer was cut off: finish_reason 'length'; ask for fewer sentences per class)" \
            if choice.get("finish_reason") == "length" else ""
        raise TemplateError(f"LLM endpoint {endpoint}: the model's answer is not JSON ({exc}){cut}: "
                            f"{_excerpt(content)}") from None
    return validate_class_sentences(data, class_names, f"LLM answer from {endpoint} (model {model!r})")
