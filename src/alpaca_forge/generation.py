"""Text generation with transformers: streamed (chat) or batched (infer), with stop strings.

Stop strings matter for Alpaca-format models: without them a model that has not learnt to emit EOS
runs on into a made-up `### Instruction:`. They are applied twice: transformers stops generating
when one appears, and the text is cut before it (when streaming, text that could be the start of a
stop string is held back until it is clear that it is not).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .errors import UserError
from .models import LoadedModel
from .prompts import clean_response


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample. `temperature=0` means greedy decoding (deterministic)."""

    max_new_tokens: int = 256  # upper bound on answer length, in tokens
    temperature: float = 0.7  # 0 = greedy; higher = more varied
    top_p: float = 0.9  # nucleus sampling: sample only from the smallest set holding this probability
    seed: int = 0  # seeds torch's RNG before each generate call, so sampled runs repeat
    repetition_penalty: float = 1.0  # >1 discourages repeating tokens; small models loop without it
    stop: tuple[str, ...] = ()  # extra stop strings, added to the prompt format's own

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty must be above 0 (1 = off), got {self.repetition_penalty}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if problems:
            raise UserError("; ".join(problems), "fix the generation settings and run again")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass(frozen=True)
class Completion:
    text: str  # the answer, cut at the first stop string, surrounding whitespace removed
    num_tokens: int  # generated tokens, EOS included
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens hit) or "cancelled"


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


class StopStringFilter:
    """Streams text through, cutting at the first stop string.

    Text that could be the start of a stop string (e.g. a trailing `###`) is held back until the
    next piece shows whether it is one; `flush()` releases what is held at the end.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        text, found = cut_at_stop(self.pending, self.stops)
        if found:
            self.stopped, self.pending = True, ""
            return text
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0
        )
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return "" if self.stopped else out


def _stop_strings(lm: LoadedModel, settings: GenerationSettings) -> list[str]:
    return list(dict.fromkeys((*lm.prompt_format.stop_strings, *settings.stop)))


def _eos_ids(lm: LoadedModel) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()


def _pad_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    eos = sorted(_eos_ids(lm))
    if not eos:
        raise UserError(
            "the model's tokenizer has neither a pad nor an EOS token",
            "use a tokenizer that defines eos_token",
        )
    return eos[0]  # padding only ever sits where the attention mask is 0, so any id will do


def _generate_kwargs(lm: LoadedModel, settings: GenerationSettings) -> dict[str, Any]:
    stops = _stop_strings(lm, settings)
    kw: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "pad_token_id": _pad_id(lm),
        "do_sample": settings.temperature > 0,
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.temperature > 0:
        kw.update(temperature=settings.temperature, top_p=settings.top_p)
    else:  # unset the model's own sampling defaults, which would only draw warnings
        kw.update(temperature=None, top_p=None, top_k=None)
    if stops:
        kw.update(stop_strings=stops, tokenizer=lm.tokenizer)
    return kw


def _count_and_reason(new_ids: list[int], eos: set[int], pad: int, max_new_tokens: int) -> tuple[int, str]:
    """How many tokens the model really generated (EOS included), and why it stopped."""
    for i, t in enumerate(new_ids):
        if t in eos:
            return i + 1, "stop"
        if t == pad:  # finished early by a stop string; the rest is padding
            return i, "stop"
    return len(new_ids), "length" if len(new_ids) >= max_new_tokens else "stop"


def encode(lm: LoadedModel, prompts: Sequence[str]) -> Any:
    """Tokenize prompts left-padded (generation appends on the right of every row)."""
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        if tok.pad_token_id is None:
            enc = [
                tok(p, add_special_tokens=lm.prompt_format.add_special_tokens)["input_ids"] for p in prompts
            ]
            width = max(len(e) for e in enc)
            pad = _pad_id(lm)
            import torch

            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
            return {"input_ids": ids, "attention_mask": mask}
        return dict(
            tok(
                list(prompts),
                return_tensors="pt",
                padding=True,
                add_special_tokens=lm.prompt_format.add_special_tokens,
            )
        )
    finally:
        tok.padding_side = side


def generate_batch(lm: LoadedModel, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
    """Generate for several prompts at once (one forward pass per new token for the whole batch)."""
    import torch

    enc = {k: v.to(lm.device) for k, v in encode(lm, prompts).items()}
    width = enc["input_ids"].shape[1]
    torch.manual_seed(settings.seed)
    with torch.inference_mode():
        out = lm.model.generate(**enc, **_generate_kwargs(lm, settings))
    eos, pad, stops = _eos_ids(lm), _pad_id(lm), _stop_strings(lm, settings)
    completions = []
    for row in out[:, width:].tolist():
        n, reason = _count_and_reason(row, eos, pad, settings.max_new_tokens)
        text = lm.tokenizer.decode(row[:n], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, stops)
        completions.append(Completion(clean_response(text), n, "stop" if stopped else reason))
    return completions


def generate_text(lm: LoadedModel, prompt: str, settings: GenerationSettings) -> Completion:
    """One answer (the name `generate` belongs to the self-instruct stage module)."""
    return generate_batch(lm, [prompt], settings)[0]


class _StopWhenSet:
    """A generate() stopping criterion: stop every sequence once `event` is set (Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class TokenStream:
    """Iterate over the text of one answer as it is generated; `cancel()` stops it early.

    Generation runs in a worker thread (transformers' `TextIteratorStreamer` pattern), so the
    caller's thread stays free to react to Ctrl-C. After iteration, `completion` and
    `elapsed_s` hold the totals.
    """

    def __init__(self, lm: LoadedModel, prompt: str, settings: GenerationSettings):
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        self.lm, self.settings = lm, settings
        self._cancel = threading.Event()
        self._filter = StopStringFilter(_stop_strings(lm, settings))
        # The timeout only makes the consumer wake every 0.1 s, so that a Ctrl-C delivered to
        # another thread is noticed promptly (see `_pieces`).
        self._streamer = TextIteratorStreamer(
            lm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.1
        )
        self._result: dict[str, Any] = {}
        self.completion: Completion | None = None
        self.elapsed_s = 0.0
        self.cancelled = False

        enc = {k: v.to(lm.device) for k, v in encode(lm, [prompt]).items()}
        self._width = enc["input_ids"].shape[1]
        kwargs = {
            **enc,
            **_generate_kwargs(lm, settings),
            "streamer": self._streamer,
            "stopping_criteria": StoppingCriteriaList([_StopWhenSet(self._cancel)]),
        }
        torch.manual_seed(settings.seed)
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(kwargs,), daemon=True)
        self._thread.start()

    def _run(self, kwargs: dict[str, Any]) -> None:
        import torch

        try:
            with torch.inference_mode():
                self._result["ids"] = self.lm.model.generate(**kwargs)[0, self._width :].tolist()
        except BaseException as e:  # re-raised in the caller's thread
            self._result["error"] = e
            self._streamer.end()

    def _pieces(self) -> Iterator[str]:
        """The streamer's text pieces, waiting in short slices: Python runs a pending Ctrl-C
        handler only when this (main) thread runs, never while it is blocked on the queue."""
        while True:
            try:
                yield next(self._streamer)
            except queue.Empty:
                continue
            except StopIteration:
                return

    def __iter__(self) -> Iterator[str]:
        started = False
        for piece in self._pieces():
            text = self._filter.push(piece)
            if not started:  # the template's space or newline before the answer
                text = text.lstrip()
                started = bool(text)
            if text:
                yield text
            if self._filter.stopped:
                self._cancel.set()  # the worker may not have seen the stop string yet
                break
        tail = self._filter.flush().rstrip()
        if tail:
            yield tail
        self._finish()

    def cancel(self) -> None:
        """Stop generating (from the consumer's thread, e.g. on Ctrl-C) and wait for the worker."""
        self.cancelled = True
        self._cancel.set()
        self._finish()

    def _finish(self) -> None:
        self._thread.join()
        self.elapsed_s = time.perf_counter() - self._start
        if "error" in self._result:
            raise self._result["error"]
        ids = self._result.get("ids", [])
        n, reason = _count_and_reason(ids, _eos_ids(self.lm), _pad_id(self.lm), self.settings.max_new_tokens)
        text, stopped = cut_at_stop(
            self.lm.tokenizer.decode(ids[:n], skip_special_tokens=True), self._filter.stops
        )
        if self.cancelled:
            reason = "cancelled"
        elif stopped or self._filter.stopped:
            reason = "stop"
        self.completion = Completion(clean_response(text), n, reason)

    @property
    def tokens_per_s(self) -> float:
        return self.completion.num_tokens / self.elapsed_s if self.completion and self.elapsed_s > 0 else 0.0
