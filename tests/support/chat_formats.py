"""Chat templates in the formats of public model cards (Gemma, Qwen's ChatML, Llama 3), written
for the tests, and tiny random-weight GGUFs that carry them with their control tokens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf.constants import TokenType

from tiny_gguf import Spec, write_tiny_gguf

# Gemma: <start_of_turn>user / model, a system message folded into the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# ChatML (Qwen 2): a default system message when none is given.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3.1 style: headers, <|eot_id|>, a system header with today's date (strftime_now).
LLAMA3 = (
    "{{ bos_token }}"
    "{% set date_string = strftime_now('%d %b %Y') %}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{ 'Today Date: ' + date_string + '\\n\\n' + system + '<|eot_id|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    name: str
    arch: str                   # the tiny model that carries it
    template: str
    controls: tuple[str, ...]   # control tokens the vocabulary needs (replacing its last pieces)
    bos: str | None = None      # the BOS token's text, when it is one of controls


FORMATS = {
    "gemma": ChatFormat("gemma", "gemma3", GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    "chatml": ChatFormat("chatml", "qwen2", CHATML, ()),     # the tiny BPE vocabulary has them
    "llama3": ChatFormat("llama3", "llama", LLAMA3,
                         ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                         bos="<|begin_of_text|>"),
}


def write_chat_gguf(path: str | Path, fmt: ChatFormat, template: str | None = None) -> Path:
    """The tiny model of fmt.arch with fmt's control tokens and template (or another one)."""
    def vocab_edit(vocab: dict) -> dict:
        vocab = dict(vocab)
        n = len(fmt.controls)
        if n:
            keep = len(vocab["tokens"]) - n
            vocab["tokens"] = vocab["tokens"][:keep] + list(fmt.controls)
            vocab["types"] = list(vocab["types"][:keep]) + [TokenType.CONTROL] * n
            if vocab["scores"] is not None:
                vocab["scores"] = vocab["scores"][:keep] + [0.0] * n
        if fmt.bos:
            vocab["bos"] = vocab["tokens"].index(fmt.bos)
        return vocab
    return write_tiny_gguf(path, Spec(fmt.arch, "q8_0"), vocab_edit=vocab_edit,
                           chat_template=fmt.template if template is None else template)
