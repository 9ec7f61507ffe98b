"""The llama.cpp engine: a GGUF file run in this process by llama-cpp-python (an optional extra).

A 4-bit GGUF of SmolLM2 decodes about 2.5x faster than transformers in fp32 on a laptop CPU in a
fifth of the memory, which is why Alpaca's community ran its models this way. The engine speaks
the same interface as the others, so chat, infer, serve and the generate teacher run on it with
`--engine llamacpp --model FILE.gguf`.

Prompts are rendered as training rendered them: a file that `alpaca-forge export gguf` wrote
carries the prompt format (`alpaca_forge.prompt_format`); any other GGUF gets the one rule of
`core.prompts.resolve_format` (its chat template if it has one, else Alpaca), the template read
from the file's metadata.

Sampling is llama.cpp's own: greedy at temperature 0 (the same choices as transformers' greedy
up to the file's rounding), else temperature and top-p, seeded per call. Its repetition penalty
looks back over the last 64 tokens, where transformers' looks at the whole text.

One llama.cpp context runs one generation at a time (a lock); a serve batch waits in line.
"""

from __future__ import annotations

import codecs
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.files import sha256_of
from ..core.prompts import Message, PromptFormat, get_format, render_to_fit, resolve_format
from .base import (
    Completion,
    FinishReason,
    GenerationSettings,
    ModelIdentity,
    SamplingDefaults,
    cut_at_stop,
    local_identity,
)
from .threaded import Put, ThreadStream

# Where each flag is documented, and how to build llama-cpp-python so it runs on any x86-64 CPU
# with AVX2 (a "native" build can crash at the first decode on VMs whose CPU advertises AMX).
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
)
INSTALL_HINT = (
    "install llama-cpp-python (a C++ build, ~5 min): `make llamacpp` in a checkout, or "
    f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --no-cache-dir llama-cpp-python'
)
PROMPT_FORMAT_KEY = "alpaca_forge.prompt_format"  # written by export gguf
REPEAT_LAST_N = 64  # llama.cpp's penalty window, in tokens
# The sampling a GGUF's converter copied from the model's generation_config.json (llama.cpp's
# convert_hf_to_gguf writes these); a file may have none. It has no answer length.
SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_p": "general.sampling.top_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
}


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(
            f"the llama.cpp engine needs llama-cpp-python, which is not installed ({e})", INSTALL_HINT
        ) from e
    return llama_cpp


def gguf_path(spec: str | None) -> Path:
    """The GGUF file `--model` names for this engine: a .gguf path, a folder holding one, or a
    built-in model (which ships as a GGUF)."""
    from ..core.models import DEFAULT_MODEL, resolve_model

    source = resolve_model(spec or DEFAULT_MODEL)
    if source.kind in ("gguf", "builtin"):
        return Path(source.location)
    raise UserError(
        f"--engine llamacpp runs a GGUF file, and {source.spec} is a transformers model ({source.kind})",
        f"export it first: alpaca-forge export gguf --model {source.spec} --output model.gguf --quant q8_0, "
        "then --model model.gguf",
    )


class TemplateTokenizer:
    """What `ChatFormat` needs of a tokenizer, from a GGUF's metadata: its chat template, rendered
    with Jinja in a sandbox with what transformers gives templates (loop controls, `tojson`
    keeping non-ASCII text, `raise_exception`, `strftime_now`, the BOS and EOS tokens). The parity
    check compares its prompts with transformers' own."""

    def __init__(self, template: str, bos_token: str, eos_token: str):
        self.chat_template = template
        self.bos_token, self.eos_token = bos_token, eos_token

    def apply_chat_template(
        self, chat: list[dict[str, str]], *, tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        import datetime

        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=chat,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise UserError(
                f"the model's chat template cannot render this conversation ({e})",
                "use --format alpaca or --format user-assistant, or fix tokenizer.chat_template in the file",
            ) from e


def open_llama(path: Path, fix: str, **settings: Any) -> Any:
    """A GGUF file loaded by llama-cpp-python (quietly), or a UserError naming it and `fix`.

    Threads left unnamed are OMP_NUM_THREADS where it is set: the variable schedulers and people
    set to share a machine between processes, which torch already obeys (llama.cpp's own default
    counts every core of the machine, and its threads spin). Prompt threads follow decode threads."""
    llama_cpp = import_llama_cpp()
    threads = settings.get("n_threads") or shared_threads()
    if threads:
        settings["n_threads"] = threads
        settings["n_threads_batch"] = settings.get("n_threads_batch") or threads
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **settings)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path}: llama.cpp cannot load this GGUF file ({e})", fix) from e


def shared_threads() -> int | None:
    """OMP_NUM_THREADS as a count (its first number, where it lists one per nesting level)."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def template_tokenizer(llm: Any) -> TemplateTokenizer | None:
    """The chat template a loaded GGUF carries, ready to render (None when it has none)."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None

    def text(token: int) -> str:
        return "" if token < 0 else llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    return TemplateTokenizer(template, text(llm.token_bos()), text(llm.token_eos()))


class LlamaCppEngine:
    upstream = False  # renders, counts and holds the weights here
    last_retries = 0  # nothing to retry in process

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        format: str | None = None,
        system: str | None = None,
        context_tokens: int = 4096,
        threads: int | None = None,
        name: str | None = None,
    ):
        llama_cpp = import_llama_cpp()
        self.path = Path(path)
        self._check_file()
        start = time.perf_counter()
        self.llm = open_llama(
            self.path,
            "check that it is complete and made for llama.cpp (alpaca-forge export gguf writes such files)",
            n_ctx=context_tokens,
            n_threads=threads,
            n_threads_batch=threads,
            last_n_tokens_size=REPEAT_LAST_N,
        )
        self.load_s = time.perf_counter() - start
        self._llama_cpp = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._lock = threading.Lock()
        self._closed = False
        self.name = name or str(path)
        try:
            self.prompt_format = self._format(format, system)
        except BaseException:
            self.llm.close()
            raise
        self.format_name = self.prompt_format.name
        self.multi_turn = self.prompt_format.multi_turn
        # llama.cpp rounds its context up (to a multiple of 256), but llama-cpp-python's token
        # buffer holds only what was asked for: that is the limit.
        self.context_tokens = min(context_tokens, self.llm.n_ctx())

    def _check_file(self) -> None:
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise UserError(f"{self.path}: cannot be read ({e.strerror})", "check the path") from e
        if magic != b"GGUF":
            raise UserError(f"{self.path}: not a GGUF file", "--engine llamacpp runs .gguf files")

    def _format(self, name: str | None, system: str | None) -> PromptFormat:
        meta = self.llm.metadata
        saved = None
        if PROMPT_FORMAT_KEY in meta:
            try:
                data = json.loads(meta[PROMPT_FORMAT_KEY])
                saved = get_format(data["format"], data.get("system"))
            except (ValueError, KeyError, TypeError, UserError) as e:
                raise UserError(
                    f"{self.path}: its {PROMPT_FORMAT_KEY} entry is not a prompt format ({e})",
                    "name the format with --format (alpaca, chat or user-assistant)",
                ) from e
        self._template_tokenizer = template_tokenizer(self.llm)
        return resolve_format(name, system, saved=saved, tokenizer=self._template_tokenizer)

    # -- the interface ----------------------------------------------------------------------

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
        return [self._whole(p, settings, list(settings.stop), add_bos=True) for p in prompts]

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        fmt = self.prompt_format
        return [
            self._whole(
                self.render(c, settings.max_new_tokens),
                settings,
                self.stop_strings(settings),
                fmt.add_special_tokens,
            )
            for c in conversations
        ]

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> ThreadStream:
        prompt = self.render(conversation, settings.max_new_tokens)
        ids = self.tokens(prompt, self.prompt_format.add_special_tokens)
        return self._stream(ids, settings, self.stop_strings(settings))

    def stream_prompt(self, prompt: str, settings: GenerationSettings) -> ThreadStream:
        """A raw prompt, piece by piece (serve's /v1/completions with stream)."""
        return self._stream(self.tokens(prompt, True), settings, list(settings.stop))

    def close(self) -> None:
        """Free the model once the generation running now ends; streams still waiting end
        cancelled, and later calls are refused."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.llm.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("the llama.cpp engine was closed", "open a new engine")

    # -- what serve asks of an engine ------------------------------------------------------

    def render(self, conversation: Sequence[Message], max_new_tokens: int) -> str:
        """The prompt for a conversation, the oldest exchanges dropped until the answer fits."""
        return render_to_fit(
            self.prompt_format,
            conversation,
            self._template_tokenizer,
            lambda prompt: self.count_tokens(prompt, chat=True),
            self.context_tokens - max_new_tokens,
        )

    def count_tokens(self, text: str, *, chat: bool) -> int:
        return len(self.tokens(text, self.prompt_format.add_special_tokens if chat else True))

    def identity(self) -> ModelIdentity:
        return local_identity(self.name, self.prompt_format, self.weights_digest())

    def generation_defaults(self) -> SamplingDefaults:
        """The general.sampling.* settings in the file's metadata, if it has any."""
        values = {}
        for name, key in SAMPLING_KEYS.items():
            if key in self.llm.metadata:
                try:
                    values[name] = float(self.llm.metadata[key])
                except ValueError:
                    values[name] = self.llm.metadata[key]  # logged and left out
        return SamplingDefaults.from_values(values, f"{self.path}: general.sampling")

    def weights_digest(self) -> bytes:
        """sha256 of the file (the weights and everything else in it): ~0.3 s per 100 MB."""
        return bytes.fromhex(sha256_of(self.path))

    # -- generation -------------------------------------------------------------------------

    def tokens(self, text: str, add_bos: bool) -> list[int]:
        # `add_bos` adds a BOS only where the file says the model wants one; `special` reads
        # `<|im_start|>` and the like as the control tokens a chat template means.
        self._check_open()
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def stop_strings(self, settings: GenerationSettings) -> list[str]:
        """Where a chat answer stops: the prompt format's stop strings, then the caller's."""
        return list(dict.fromkeys((*self.prompt_format.stop_strings, *settings.stop)))

    def _whole(
        self, prompt: str, settings: GenerationSettings, stops: list[str], add_bos: bool
    ) -> Completion:
        stream = self._stream(self.tokens(prompt, add_bos), settings, stops, show=False)
        try:
            for _ in stream:
                pass
        except BaseException:  # Ctrl-C: stop the worker now, not at max_new_tokens
            stream.cancel()
            raise
        assert stream.completion is not None
        return stream.completion

    def _stream(
        self, prompt_ids: list[int], settings: GenerationSettings, stops: list[str], *, show: bool = True
    ) -> ThreadStream:
        """One answer generated by a worker thread under the engine's lock (a serve batch waits in line)."""

        def work(put: Put, stop: threading.Event) -> tuple[int, bool, str]:
            return self._decode(prompt_ids, settings, stops, put, stop)

        def finish(result: tuple[int, bool, str]) -> Completion:
            n, eog, text = result
            text, stopped = cut_at_stop(text, stops)
            # not stopped: max_new_tokens, or the context filled up
            reason = FinishReason.STOP if stopped or eog else FinishReason.LENGTH
            return Completion(text.strip(), reason, len(prompt_ids), n)

        return ThreadStream(work, finish, stops, show=show)

    def _decode(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        stops: list[str],
        put: Put,
        stop: threading.Event,
    ) -> tuple[int, bool, str]:
        """Generate under the lock, handing out text as its UTF-8 completes: (tokens generated,
        whether an end-of-generation token ended it, the text)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        n, eog, text = 0, False, ""
        with self._lock:
            for _token, piece in self.generate(prompt_ids, settings, stop):
                n += 1
                if piece is None:
                    eog = True
                    break
                chunk = decoder.decode(piece)
                text += chunk
                if chunk:
                    put(chunk)
                if cut_at_stop(text, stops)[1]:
                    break  # the rest would be cut anyway
        tail = decoder.decode(b"", final=True)
        if tail:
            put(tail)
            text += tail
        return n, eog, text

    def generate(
        self,
        prompt_ids: list[int],
        settings: GenerationSettings,
        cancel: threading.Event,
    ) -> Iterator[tuple[int, bytes | None]]:
        """(token, its bytes) until an end-of-generation token (given with None for its bytes),
        `max_new_tokens` or `cancel`. A token without text (`<unk>`, a control token that does not
        end the answer) comes with b"". The caller holds the lock."""
        room = min(settings.max_new_tokens, self.context_tokens - len(prompt_ids))
        if room <= 0:
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens, at least as many as the {self.context_tokens}-token "
                "context holds",
                "shorten the prompt, or raise --context-tokens",
            )
        self.llm.set_seed(settings.seed)
        # Evaluate the whole prompt every time: reusing the cached prefix of the previous call
        # changes the logits in their last bits (other batch shapes), so a sampled answer would
        # depend on what was asked before it.
        self.llm.reset()
        greedy = settings.temperature <= 0
        produced: list[int] = []
        if cancel.is_set():  # cancelled while it waited for the lock: nobody wants the answer
            return
        self._check_open()
        for token in self.llm.generate(
            prompt_ids,
            temp=0.0 if greedy else settings.temperature,
            top_p=1.0 if greedy else settings.top_p,
            top_k=0,  # off, as in transformers' sampling here
            min_p=0.0,
            repeat_penalty=settings.repetition_penalty,
        ):
            if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
                yield token, None
                return
            piece = self.llm.detokenize([token])
            produced.append(token)
            yield token, piece
            if len(produced) >= room or cancel.is_set():
                return


def self_test() -> str:
    """One real greedy decode of the embedded model: proves a llama-cpp-python build computes (a
    bad build imports fine and crashes, or dies with "Illegal instruction", at the first decode)."""
    from ..core.prompts import Message

    engine = LlamaCppEngine(gguf_path(None), context_tokens=256)
    try:
        settings = GenerationSettings(max_new_tokens=8, temperature=0.0)
        stream = engine.stream([Message("user", "What is the capital of France?")], settings)
        text = "".join(stream)
        done = stream.completion
        assert done is not None and done.completion_tokens > 0, "llama.cpp produced no token"
        return f"llama.cpp works: {done.completion_tokens} tokens ({text!r}) in {stream.elapsed_s:.2f} s"
    finally:
        engine.close()


if __name__ == "__main__":  # `python -m alpaca_forge.engines.llamacpp`, run by `make llamacpp`
    print(self_test())
