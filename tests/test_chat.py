"""Chat template rendering tests; expected strings are derived by hand from the templates."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from toy_llm.chat import ChatTemplateError, render_chat

# SmolLM2-Instruct's template (ChatML with a default system prompt)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's template: BOS, no system role, alternating turns, "assistant" renamed "model"
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_smollm2_chatml_default_system_prompt():
    out = render_chat(SMOLLM2_TEMPLATE, [{"role": "user", "content": "Hello"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_chatml_with_system_and_no_generation_prompt():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    out = render_chat(SMOLLM2_TEMPLATE, messages, add_generation_prompt=False)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_gemma_template():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  Hello!  "},
        {"role": "user", "content": "How are you?"},
    ]
    out = render_chat(GEMMA_TEMPLATE, messages, bos_token="<bos>")
    assert out == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_raise_exception_becomes_value_error():
    with pytest.raises(ValueError, match="System role not supported"):
        render_chat(GEMMA_TEMPLATE, [{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat(GEMMA_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_missing_or_broken_template():
    for template in (None, ""):
        with pytest.raises(ValueError, match="no chat template"):
            render_chat(template, [{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for m in messages %}", [])


def test_trim_and_lstrip_blocks():
    template = (
        "{% for m in messages %}\n"
        "  {% if m.role == 'user' %}\n"
        "U: {{ m.content }}\n"
        "  {% else %}\n"
        "A: {{ m.content }}\n"
        "  {% endif %}\n"
        "{% endfor %}\n"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # block tags swallow their own line: indentation before them (lstrip_blocks) and the
    # newline after them (trim_blocks)
    assert render_chat(template, messages) == "U: hi\nA: yo\n"


def test_helpers_tojson_strftime_and_extra_variables():
    template = "{{ messages[0]['content'] | tojson }}|{{ tools | tojson(indent=None) }}|{{ strftime_now('%Y') }}"
    out = render_chat(template, [{"role": "user", "content": "héllo <b> & 'q'"}],
                      tools=[{"name": "f"}])
    year = str(datetime.datetime.now().year)
    assert out in ('"héllo <b> & \'q\'"|[{"name": "f"}]|' + year,
                   '"héllo <b> & \'q\'"|[{"name": "f"}]|' + str(int(year) + 1))


def test_loop_controls_and_sandbox():
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert render_chat(template, [{"content": "a"}, {"content": "b"}]) == "a"
    # the sandbox refuses access to Python internals
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__ }}", [])
    # and the environment is immutable: templates cannot mutate caller data
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.append(1) }}", [])


def test_gguf_chat_template_renders():
    """The qwen2 vocab file ships a ChatML template; rendering it must work end to end."""
    models = Path(__file__).resolve().parent.parent / "build" / "llama_cpp_python-0.3.36" / \
        "vendor" / "llama.cpp" / "models"
    if not models.is_dir():
        pytest.skip(f"llama.cpp vocab files not found at {models}")
    from toy_llm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(models / "ggml-vocab-qwen2.gguf")
    out = render_chat(tok.chat_template, [{"role": "user", "content": "Hi"}])
    assert out.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(out, add_special=True, parse_special=True)
    assert ids.count(tok.token_to_id("<|im_start|>")) == out.count("<|im_start|>")
