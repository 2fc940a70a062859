"""Chat templates: render a list of messages to the prompt text a checkpoint was trained on.

A checkpoint's own Jinja template (tokenizer_config.json "chat_template" or chat_template.jinja)
always wins. KIMI_TEMPLATE is the fallback for checkpoints that ship none; it writes Kimi K2's
format:

    <|im_system|>tool_declare<|im_middle|>[tools as compact JSON]<|im_end|>     (if tools)
    <|im_system|>system<|im_middle|>...<|im_end|>                             (default if none)
    <|im_user|>user<|im_middle|>...<|im_end|>
    <|im_assistant|>assistant<|im_middle|><think>...</think>text
        <|tool_calls_section_begin|><|tool_call_begin|>functions.f:0
        <|tool_call_argument_begin|>{...}<|tool_call_end|><|tool_calls_section_end|><|im_end|>
    <|im_system|>tool<|im_middle|>## Return of functions.f:0\n...<|im_end|>
    <|im_assistant|>assistant<|im_middle|><think>        (generation prompt, thinking mode)
    <|im_assistant|>assistant<|im_middle|><think></think>   (instant mode)

Reasoning of earlier turns (before the last user message) is dropped, as K2.5 does. An image part
({"type": "image"} or "image_url") is <|media_begin|>image<|media_content|><|media_pad|><|media_end|>,
as K2.5's own template writes it; <|media_pad|> is expanded to the image's tokens later.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

KIMI_DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."

KIMI_TEMPLATE = r"""
{%- macro content_text(content) -%}
  {%- if content is none -%}
  {%- elif content is string -%}{{ content }}
  {%- else -%}
    {%- for part in content -%}
      {%- if part is string -%}{{ part }}
      {%- elif part.type == 'text' -%}{{ part.text }}
      {%- elif part.type in ('image', 'image_url') -%}<|media_begin|>image<|media_content|><|media_pad|><|media_end|>
      {%- else -%}{{ raise_exception('message content part of type ' ~ part.type ~ ' is not supported by this model') }}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- if messages | length == 0 or messages[0].role != 'system' -%}
<|im_system|>system<|im_middle|>{{ default_system }}<|im_end|>
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}<|im_user|>
  {%- elif m.role == 'assistant' -%}<|im_assistant|>
  {%- else -%}<|im_system|>
  {%- endif -%}
  {{- m.name or m.role -}}<|im_middle|>
  {%- if m.role == 'assistant' -%}
    {%- if loop.index0 > ns.last_user and m.reasoning_content -%}
<think>{{ m.reasoning_content }}</think>
    {%- else -%}
<think></think>
    {%- endif -%}
    {{- content_text(m.content) -}}
    {%- if m.tool_calls -%}
<|tool_calls_section_begin|>
      {%- for tc in m.tool_calls -%}
<|tool_call_begin|>{{ tc.id }}<|tool_call_argument_begin|>
        {%- set args = tc.function.arguments if tc.function is defined else tc.arguments -%}
        {%- if args is string -%}{{ args }}{%- else -%}{{ args | tojson(separators=(',', ':')) }}{%- endif -%}
<|tool_call_end|>
      {%- endfor -%}
<|tool_calls_section_end|>
    {%- endif -%}
  {%- elif m.role == 'tool' -%}
## Return of {{ m.tool_call_id }}
{{ content_text(m.content) }}
  {%- else -%}
    {{- content_text(m.content) -}}
  {%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_assistant|>assistant<|im_middle|>
  {%- if thinking is defined and thinking is not none and not thinking -%}<think></think>{%- else -%}<think>{%- endif -%}
{%- endif -%}
"""


class ChatTemplateError(ValueError):
    """The messages or the template are wrong; the message says which."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson: no HTML escaping (unlike Jinja's built-in), unicode kept as is.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message):
    raise ChatTemplateError(f"chat template: {message}")


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # trim_blocks/lstrip_blocks and the loopcontrols extension are what checkpoint templates
    # are written against (they are the settings of transformers' renderer).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}] has no 'role' string")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ChatTemplateError(
                f"messages[{i}].content must be a string, a list of parts or null, "
                f"got {type(content).__name__}")
        if role == "tool" and not m.get("tool_call_id"):
            raise ChatTemplateError(f"messages[{i}] (role 'tool') needs 'tool_call_id'")
        out.append(dict(m))
    return out


def render(template: str, messages, *, tools=None, add_generation_prompt: bool = True,
           thinking: bool | None = None, bos_token: str = "", eos_token: str = "",
           **extra) -> str:
    """Render messages with a Jinja chat template.

    thinking is passed to the template as both `thinking` and `enable_thinking` (the names
    Kimi K2.5 / DeepSeek-V3.1 and Qwen templates read); None leaves the template's default.
    """
    from jinja2.exceptions import TemplateError

    messages = validate_messages(messages)
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise ChatTemplateError(f"tools must be a list, got {type(tools).__name__}")
    variables = dict(extra)
    variables.update(messages=messages, tools=list(tools) if tools else None,
                     add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                     eos_token=eos_token, default_system=KIMI_DEFAULT_SYSTEM)
    if thinking is not None:
        variables["thinking"] = bool(thinking)
        variables["enable_thinking"] = bool(thinking)
    try:
        return _compile(template).render(**variables)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e
