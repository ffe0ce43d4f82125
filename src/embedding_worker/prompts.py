"""Prompts for instruction-aware embedding models (Qwen3-Embedding and any model declaring prompts).

Infinity applies no prompt of any model, so the worker prefixes texts itself, using only what the
model declares in its sentence-transformers config (`prompts` in config_sentence_transformers.json).
A model that declares nothing is never prefixed.

- `prompt_type`: the name of one of the model's prompts; that prompt is prepended to every text.
- `instruction`: a task description. It replaces the task of the model's instruction prompt, a
  prompt of the form "Instruct: <task>\\n<Label>:" (Qwen3-Embedding's "query" prompt). The template
  is taken from the model's own prompt, so its spacing is exact: Qwen3 gives
  "Instruct: {instruction}\\nQuery:{text}", with no space after "Query:".
- Both: `prompt_type` picks the prompt; `instruction` replaces its task when that prompt is an
  instruction prompt, and is ignored for prompts without one ("document" embeds the raw text).
- Neither: the model's `default_prompt_name` prompt if it declares one (as sentence-transformers'
  encode() does), else no prefix.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import errors

if TYPE_CHECKING:
    from .engines import ModelEngine

# \Z, not $: "$" also matches before a final newline, which would drop it from the tail.
_INSTRUCTION_PROMPT = re.compile(r"Instruct: (?P<task>[^\n]*)\n(?P<tail>[^\n]*)\Z")


def with_instruction(prompt: str, instruction: str) -> str | None:
    """The instruction prompt `prompt` with its task replaced by `instruction`; None if it has none.

    Plain concatenation, not str.format: braces in either part are text.
    """
    match = _INSTRUCTION_PROMPT.match(prompt)
    if match is None:
        return None
    return "Instruct: " + instruction + "\n" + match.group("tail")


def _instruction_prompt_name(prompts: dict[str, str]) -> str | None:
    names = [name for name, text in prompts.items() if _INSTRUCTION_PROMPT.match(text)]
    if "query" in names:
        return "query"
    return names[0] if names else None


def embedding_prefix(model: ModelEngine, instruction: str | None, prompt_type: str | None) -> str:
    """The text to put before every input of an embedding request."""
    prompts = model.prompts
    name: str | None
    if prompt_type is not None:
        if prompt_type not in prompts:
            known = ", ".join(f"'{n}'" for n in prompts) or "none"
            raise errors.invalid_input(
                f"model '{model.served_id}' has no prompt named '{prompt_type[:64]}'; "
                f"its prompts: {known}",
                param="prompt_type",
            )
        name = prompt_type
    elif instruction is not None:
        name = _instruction_prompt_name(prompts)
        if name is None:
            raise errors.invalid_input(
                f"model '{model.served_id}' declares no instruction template, so 'instruction' "
                "cannot be applied; send the prefixed text in 'input' instead",
                param="instruction",
            )
    elif model.default_prompt_name in prompts:
        name = model.default_prompt_name  # as sentence-transformers' encode() does
    else:
        return ""
    assert name is not None
    if instruction is not None:
        instructed = with_instruction(prompts[name], instruction)
        if instructed is not None:
            return instructed
    return prompts[name]


def apply_embedding_prompt(
    model: ModelEngine, texts: list[str], instruction: str | None, prompt_type: str | None
) -> list[str]:
    prefix = embedding_prefix(model, instruction, prompt_type)
    return [prefix + text for text in texts] if prefix else list(texts)
