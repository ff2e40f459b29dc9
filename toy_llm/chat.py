"""Chat prompt rendering with the Jinja2 chat templates shipped in GGUF files
(``tokenizer.chat_template``), set up the way Hugging Face ``apply_chat_template`` does:
a sandboxed environment with ``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols``
extension, and the helpers templates expect (``raise_exception``, ``strftime_now`` and a
``tojson`` that does not HTML-escape).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "render_chat"]


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or rejected the conversation."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML; chat prompts need the raw text
    return json.dumps(value, indent=indent, separators=separators,
                      sort_keys=sort_keys, ensure_ascii=ensure_ascii)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Renders ``messages`` (``[{"role": ..., "content": ...}, ...]``) with ``template``.

    ``extra`` is passed to the template as additional variables (e.g. ``tools``).
    Raises :class:`ChatTemplateError` (a ``ValueError``) when the template is missing or
    invalid, or when it calls ``raise_exception``.
    """
    if not template:
        raise ChatTemplateError("no chat template: the model has no tokenizer.chat_template "
                                "and none was given")
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
