"""A chat template that takes transformers' content parts and renders them as the model was trained.

visprompt renders a message's image parts as `IMAGE_TOKEN + "\\n"` before or between its text parts
(a trailing one loses its newline) and then applies the tokenizer's own template to string
contents (models/chat.py). Processors (`processor.apply_chat_template`) and servers pass content
as a list of parts. The wrapped template turns such lists into the same strings, adds the model's
default system prompt when a chat brings none, then runs the original template unchanged.
"""

from __future__ import annotations

import json

_PRELUDE = """\
{%- set vp = namespace(messages=[]) -%}
{%- if SYSTEM and (messages | length == 0 or messages[0]['role'] != 'system') -%}
{%- set vp.messages = [{'role': 'system', 'content': SYSTEM}] -%}
{%- endif -%}
{%- for message in messages -%}
{%- if message['content'] is string or message['content'] is none -%}
{%- set vp.messages = vp.messages + [message] -%}
{%- else -%}
{%- set part_text = namespace(value='') -%}
{%- for part in message['content'] -%}
{%- if part['type'] in ['image', 'image_url'] -%}
{%- set part_text.value = part_text.value + IMAGE + '\\n' -%}
{%- elif part['type'] == 'text' -%}
{%- set part_text.value = part_text.value + part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- if part_text.value.endswith(IMAGE + '\\n') -%}
{%- set part_text.value = part_text.value[:-1] -%}
{%- endif -%}
{%- set vp.messages = vp.messages + [{'role': message['role'], 'content': part_text.value}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = vp.messages -%}
"""


def content_parts_template(template: str, image_token: str, system_prompt: str = "") -> str:
    """`template` wrapped to accept content-part lists (see the module docstring).

    Args:
        template: the tokenizer's chat template (string contents).
        image_token: the placeholder one image part becomes (before the processor expands it).
        system_prompt: the model's default system message ("" for none).

    Returns:
        The wrapped Jinja template.
    """
    prelude = _PRELUDE.replace("SYSTEM", json.dumps(system_prompt)).replace("IMAGE", json.dumps(image_token))
    return prelude + template
