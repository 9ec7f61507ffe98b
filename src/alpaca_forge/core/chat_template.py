"""The prompt format a model was trained with, as the chat template saved with it.

Other runtimes (transformers' chat pipeline, vLLM, TGI, llama.cpp's server) prompt a model through
the Jinja chat template in its tokenizer files or its GGUF, not through `prompt_format.json`. So
every model folder and GGUF this project writes carries a template that renders exactly what
`PromptFormat.render` renders for the same messages:

- `alpaca`: single-turn, the last user message as the instruction; a message's `input` key goes
  under `### Input:`, as a record's input does;
- `user-assistant`: every user and assistant turn, as `UserAssistantFormat.render` writes them;
- `chat`: the base model's own template, unchanged.

System messages are left out, as both formats leave them out. A conversation that ends in an
assistant message (how other tools build training or scoring text, add_generation_prompt off)
renders the prompt of the turns before it, then the answer and the EOS token, which is the text
of the ids training built (`core.examples`). Runtimes add no special tokens to a templated
prompt, so a tokenizer that puts BOS first gets `{{ bos_token }}` at the template's start.

The templates use only `set`, `for`, `if`, `namespace`, `loop.last` and string literals, so
transformers' and llama-cpp-python's Jinja2 renderers (both with trim_blocks and lstrip_blocks)
and llama.cpp's own minja all read them alike; every tag trims the whitespace around it.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

from .prompts import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, PromptFormat, read_saved_format


def literal(text: str) -> str:
    """`text` as a Jinja string literal (the fixed Alpaca text holds newlines)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a prompt with special tokens puts BOS first."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def answer_prefix(tokenizer: Any) -> str:
    """What the text of a training example holds between prompt and answer: the answer is
    tokenized alone, so a tokenizer that prefixes a space to a text's first word (SentencePiece's
    dummy prefix, `add_prefix_space`) put one there."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    first = tokenizer.convert_ids_to_tokens(ids[:1])
    return " " if first and first[0][:1] in ("▁", "Ġ") else ""


def _text(message: str) -> str:
    """A user message's text, as `Message.text` has it: the content, then its input if any."""
    return (
        f"({message}['content'] + ({literal(chr(10) * 2)} + {message}['input'] "
        f"if {message}['input'] is defined and {message}['input'] else ''))"
    )


def _answer(prefix: str) -> str:
    """The final assistant message of a conversation: the answer as training wrote it, then EOS."""
    return (f"{literal(prefix)} + " if prefix else "") + "messages[-1]['content'] + eos_token"


def alpaca_template(prefix: str) -> str:
    head_input, rest = ALPACA_PROMPT_WITH_INPUT.split("{instruction}")
    between, response = rest.split("{input}")
    head, response_no_input = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    assert response == response_no_input, "both Alpaca templates end alike"
    return (
        "{%- set ns = namespace(instruction='', input='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set ns.instruction = message['content'] -%}"
        "{%- set ns.input = message['input'] if message['input'] is defined and message['input'] else '' -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.input -%}"
        f"{{{{- {literal(head_input)} + ns.instruction + {literal(between)} + ns.input -}}}}"
        "{%- else -%}"
        f"{{{{- {literal(head)} + ns.instruction -}}}}"
        "{%- endif -%}"
        "{%- if messages[-1]['role'] == 'assistant' -%}"
        f"{{{{- {literal(response)} + {_answer(prefix)} -}}}}"
        "{%- elif add_generation_prompt -%}"
        f"{{{{- {literal(response)} -}}}}"
        "{%- endif -%}"
    )


def user_assistant_template(prefix: str) -> str:
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' and loop.last -%}"
        f"{{{{- '<|assistant|>' + {_answer(prefix)} -}}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- '<|assistant|>\\n' + message['content'] + '\\n' -}}"
        "{%- elif message['role'] == 'user' -%}"
        f"{{{{- '<|user|>\\n' + {_text('message')} + '\\n' -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
        "{{- '<|assistant|>' -}}"
        "{%- endif -%}"
    )


_TEMPLATES = {"alpaca": alpaca_template, "user-assistant": user_assistant_template}


def chat_template_for(fmt: PromptFormat, tokenizer: Any) -> str | None:
    """The chat template that renders `fmt`'s prompts for this tokenizer; None for `chat`, whose
    template is the tokenizer's own."""
    build = _TEMPLATES.get(fmt.name)
    if build is None:
        return None
    bos = "{{- bos_token -}}" if fmt.add_special_tokens and adds_bos(tokenizer) else ""
    template = bos + build(answer_prefix(tokenizer))
    return template.replace("-%}", "-%}\n").replace("-}}", "-}}\n")


def with_chat_template(tokenizer: Any, fmt: PromptFormat) -> Any:
    """The tokenizer with `fmt`'s template (a shallow copy: the caller's tokenizer is unchanged,
    and training or the parity check may still render through it)."""
    template = chat_template_for(fmt, tokenizer)
    if template is None:
        return tokenizer
    out = copy.copy(tokenizer)
    out.chat_template = template
    return out


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike, fmt: PromptFormat) -> Path:
    """Save the tokenizer with the format's template (transformers writes chat_template.jinja)."""
    with_chat_template(tokenizer, fmt).save_pretrained(folder)
    return Path(folder)


def retemplate_folder(folder: str | os.PathLike) -> None:
    """Give a model folder the template of the format saved in it (`export recover` copies a
    tuned model's tokenizer files from a diff, which may have been made before templates were
    ours). A folder without a saved format, or saved as `chat`, keeps its files as they are."""
    from transformers import AutoTokenizer

    fmt = read_saved_format(folder)
    if fmt is None or fmt.name not in _TEMPLATES:
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:  # no tokenizer files: nothing holds a template
        logging.getLogger("alpaca_forge").warning("%s: no tokenizer to give a chat template (%s)", folder, e)
        return
    save_tokenizer(tokenizer, folder, fmt)
