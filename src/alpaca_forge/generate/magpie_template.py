"""Where `generate --method magpie` gets the chat template it writes queries from.

A model in this process (transformers, llama.cpp) renders with its own format, so the engine's
`render` gives the template's text. A server renders its own template behind /v1/chat/completions,
which the client never sees, so the user names that template with `--magpie-template`: a .jinja
file, or a model folder holding the server model's tokenizer files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.errors import UserError
from ..core.prompts import ChatFormat, Message
from ..engines import Engine
from ..engines.llamacpp import TemplateTokenizer

Render = Callable[[Sequence[Message]], str]

_FIX_TEMPLATE = (
    "give --magpie-template with the server model's chat template: a .jinja file or the model's "
    "folder (chat_template.jinja or tokenizer_config.json with a chat_template)"
)


def template_renderer(engine: Engine, template: str | None, system: str | None, max_new_tokens: int) -> Render:
    """How the teacher's chat template renders a conversation (a generation prompt added).
    Refuses, before any request, a model without a chat template and a server without
    `--magpie-template`."""
    if engine.upstream:
        if not template:
            raise UserError(
                "--method magpie with --engine openai needs the server model's chat template: the "
                "server renders its own and the queries are raw completions of its pre-query text",
                _FIX_TEMPLATE,
            )
        tokenizer = read_template(Path(template))
        fmt = ChatFormat(system)
        return lambda messages: fmt.render(messages, tokenizer)
    if template:
        raise UserError(
            "--magpie-template is for --engine openai; a model in this process renders with its own template",
            "drop --magpie-template (or --format chooses how the model renders)",
        )
    if not engine.multi_turn:
        raise UserError(
            f"--method magpie needs an aligned chat model, and {engine.name} prompts with the "
            f"single-turn {engine.format_name!r} format (no chat template with a user turn to continue)",
            "name a chat model (its tokenizer or GGUF carries a chat template), or --format chat / "
            "user-assistant for a model trained with one",
        )
    return lambda messages: engine.render(messages, max_new_tokens) or ""


def read_template(path: Path) -> TemplateTokenizer:
    """A chat template from a .jinja file or a model folder, with its BOS and EOS tokens where
    tokenizer_config.json names them."""
    folder = path if path.is_dir() else None
    config: dict = {}
    try:
        if folder is not None:
            config_file = folder / "tokenizer_config.json"
            if config_file.is_file():
                config = json.loads(config_file.read_text(encoding="utf-8"))
            jinja = folder / "chat_template.jinja"
            text = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read a chat template from it ({e})", _FIX_TEMPLATE) from e
    if isinstance(text, list):  # several named templates: the default one
        text = next((t.get("template") for t in text if t.get("name") == "default"), None)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{path}: holds no chat template", _FIX_TEMPLATE)

    def token(name: str) -> str:
        value = config.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)

    return TemplateTokenizer(text, token("bos_token"), token("eos_token"))
