"""The teacher's defaults, which depend on where it runs.

Alpaca asked a server (text-davinci-003) for up to 3072 tokens at temperature 1.0: room for a
list of 20 tasks, sampled for variety. A 135M model in this process given the same spends minutes
rambling inside its first task, and at 1.0 its text falls apart: the embedded SmolLM2 took 229 s
for one request and gave 0 records (issue 22). At 768 tokens and 0.7 in llama.cpp it gives about
1.5 records a request in ~8 s on 2 CPU cores. So a server keeps Alpaca's settings and a teacher in
this process gets the measured ones, unless the user gives them.

With no --engine, a GGUF or built-in model (the embedded teacher ships as a 4-bit GGUF) runs in
llama.cpp when llama-cpp-python imports: it decodes ~2.5x faster than transformers on a CPU.
Without it the teacher runs in transformers, and one line on stderr says so and how to install it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..core.errors import UserError

log = logging.getLogger("alpaca_forge")


@dataclass(frozen=True)
class TeacherDefaults:
    max_new_tokens: int
    temperature: float


SERVER = TeacherDefaults(max_new_tokens=3072, temperature=1.0)  # Alpaca's
IN_PROCESS = TeacherDefaults(max_new_tokens=768, temperature=0.7)  # measured on the embedded model

FALLBACK_NOTE = (
    "generate: llama-cpp-python {why}, so the teacher runs in transformers, "
    "several times slower; for llama.cpp run `make llamacpp` in a checkout (or see the README's "
    "llama.cpp section), or give --engine transformers to keep this choice"
)


def defaults_for(engine: str) -> TeacherDefaults:
    return SERVER if engine == "openai" else IN_PROCESS


def default_engine(model: str | None) -> str:
    """The engine when none is named: llamacpp for a GGUF or built-in model if llama-cpp-python
    imports (else transformers, said on stderr), transformers for any other model."""
    if not _is_gguf(model):
        return "transformers"
    why = llama_cpp_missing()
    if why is None:
        return "llamacpp"
    log.warning(FALLBACK_NOTE.format(why=why))
    return "transformers"


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python cannot be used, or None when it imports."""
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "llama_cpp":
            return "is not installed"
        return f"does not import ({e})"
    except (ImportError, OSError) as e:  # a build whose library does not load
        return f"does not import ({e})"
    return None


def _is_gguf(model: str | None) -> bool:
    """The model runs in llama.cpp as it is: a .gguf file, a folder holding one, a built-in name.
    A name that does not resolve is left to transformers, whose loader explains what is wrong."""
    from ..core.models import DEFAULT_MODEL, resolve_model

    try:
        return resolve_model(model or DEFAULT_MODEL).kind in ("gguf", "builtin")
    except UserError:
        return False
