"""The in-process engine: a transformers model in this process (the default, offline).

Stop strings matter for Alpaca-format models: without them a model that has not learnt to emit
EOS runs on into a made-up `### Instruction:`. They are applied twice: transformers stops
generating when one appears, and the text is cut before it (when streaming, text that could be
the start of a stop string is held back until it is clear that it is not).

Safe under concurrent callers (a server's threads): the tokenizer is never changed (prompts are
padded here, not by flipping `padding_side`), and one lock runs one generation at a time, seeded
inside `torch.random.fork_rng`, so a call neither disturbs nor depends on the global RNG. A model
on one device is no faster split across threads; batching is what `complete` and `chat` offer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..core.errors import UserError
from ..core.models import LoadedModel
from ..core.prompts import Message, render_to_fit
from .base import AnswerPieces, Completion, FinishReason, GenerationSettings, cut_at_stop


class TransformersEngine:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.name = lm.name
        self.multi_turn = lm.prompt_format.multi_turn
        self.format_name = lm.prompt_format.name
        self.prompt_format = lm.prompt_format
        self._lock = threading.Lock()
        self._eos = self._eos_ids()
        self._pad = self._pad_id()

    # -- the interface ----------------------------------------------------------------------

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
        return self._generate(list(prompts), settings, settings.stop, add_special_tokens=True)

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        prompts = [self.render(c, settings.max_new_tokens) for c in conversations]
        fmt = self.lm.prompt_format
        return self._generate(
            prompts, settings, self._stops(settings), add_special_tokens=fmt.add_special_tokens
        )

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> TokenStream:
        prompt = self.render(conversation, settings.max_new_tokens)
        return TokenStream(self, prompt, settings)

    def close(self) -> None:
        pass

    # -- prompts ----------------------------------------------------------------------------

    def render(self, conversation: Sequence[Message], max_new_tokens: int) -> str:
        """The prompt for a conversation, the oldest turns dropped until the answer fits the
        model's context."""
        limit = self.context_tokens
        return render_to_fit(
            self.lm.prompt_format,
            conversation,
            self.lm.tokenizer,
            lambda prompt: self.count_tokens(prompt, chat=True),
            None if limit is None else limit - max_new_tokens,
        )

    # -- what serve asks of an engine that runs here ----------------------------------------

    def count_tokens(self, text: str, *, chat: bool) -> int:
        """Tokens the model reads for a prompt: a rendered conversation (`chat`) or a raw one."""
        return self.count(text, self.lm.prompt_format.add_special_tokens if chat else True)

    def count(self, text: str, add_special_tokens: bool) -> int:
        return len(self.lm.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def context_tokens(self) -> int | None:
        return getattr(self.lm.model.config, "max_position_embeddings", None)

    def weights_digest(self) -> bytes:
        """sha256 over every tensor's name and bytes (~0.5 s per GB of weights)."""
        import hashlib

        h = hashlib.sha256()
        for name, tensor in self.lm.model.state_dict().items():
            h.update(name.encode())
            h.update(_raw_bytes(tensor))
        return h.digest()

    def _stops(self, settings: GenerationSettings) -> list[str]:
        return list(dict.fromkeys((*self.lm.prompt_format.stop_strings, *settings.stop)))

    # -- generation -------------------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        eos = self.lm.model.generation_config.eos_token_id
        if eos is None:
            eos = self.lm.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()

    def _pad_id(self) -> int:
        tok = self.lm.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        if not self._eos:
            raise UserError(
                "the model's tokenizer has neither a pad nor an EOS token",
                "use a tokenizer that defines eos_token",
            )
        return min(self._eos)  # padding only ever sits where the attention mask is 0, so any id will do

    def encode(self, prompts: Sequence[str], add_special_tokens: bool) -> dict[str, Any]:
        """Prompts left-padded (generation appends on the right of every row), padded here so the
        shared tokenizer is never changed."""
        import torch

        ids = [self.lm.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
        width = max(len(e) for e in ids)
        input_ids = torch.tensor([[self._pad] * (width - len(e)) + e for e in ids])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in ids])
        return {"input_ids": input_ids.to(self.lm.device), "attention_mask": mask.to(self.lm.device)}

    def generate_kwargs(self, settings: GenerationSettings, stops: Sequence[str]) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": self._pad,
            "do_sample": settings.temperature > 0,
            "repetition_penalty": settings.repetition_penalty,
        }
        if settings.temperature > 0:
            kw.update(temperature=settings.temperature, top_p=settings.top_p)
        else:  # unset the model's own sampling defaults, which would only draw warnings
            kw.update(temperature=None, top_p=None, top_k=None)
        if stops:
            kw.update(stop_strings=list(stops), tokenizer=self.lm.tokenizer)
        return kw

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """One generation at a time, seeded without touching the global RNG's state."""
        import torch

        devices = [self.lm.device] if self.lm.device.type == "cuda" else []
        with self._lock, torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            yield

    def finish(
        self, new_ids: list[int], max_new_tokens: int, stops: Sequence[str], prompt_tokens: int
    ) -> Completion:
        """The answer from the generated ids: counted to the EOS (or the padding a stop string
        left), decoded, cut at the first stop string."""
        n, reason = len(new_ids), FinishReason.LENGTH if len(new_ids) >= max_new_tokens else FinishReason.STOP
        for i, t in enumerate(new_ids):
            if t in self._eos:
                n, reason = i + 1, FinishReason.STOP
                break
            if t == self._pad:  # finished early by a stop string; the rest is padding
                n, reason = i, FinishReason.STOP
                break
        text, stopped = cut_at_stop(self.lm.tokenizer.decode(new_ids[:n], skip_special_tokens=True), stops)
        return Completion(text.strip(), FinishReason.STOP if stopped else reason, prompt_tokens, n)

    def _generate(
        self,
        prompts: list[str],
        settings: GenerationSettings,
        stops: Sequence[str],
        *,
        add_special_tokens: bool,
    ) -> list[Completion]:
        if not prompts:
            return []
        enc = self.encode(prompts, add_special_tokens)
        width = enc["input_ids"].shape[1]
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        with self.seeded(settings.seed):
            out = self.lm.model.generate(**enc, **self.generate_kwargs(settings, stops))
        rows = out[:, width:].tolist()
        return [
            self.finish(r, settings.max_new_tokens, stops, p)
            for r, p in zip(rows, prompt_tokens, strict=True)
        ]


def _raw_bytes(tensor: Any) -> Any:
    """A tensor's bytes as a buffer hashlib can read, whatever its dtype (bf16 has no numpy type)."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else b""


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
    """One answer, piece by piece, generated in a worker thread (transformers'
    `TextIteratorStreamer` pattern), so the caller's thread stays free to react to Ctrl-C."""

    def __init__(self, engine: TransformersEngine, prompt: str, settings: GenerationSettings):
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        self.engine, self.settings = engine, settings
        self.completion: Completion | None = None
        self.elapsed_s = 0.0
        self.cancelled = False
        self._stops = engine._stops(settings)
        self._pieces_out = AnswerPieces(self._stops)
        self._cancel = threading.Event()
        self._result: dict[str, Any] = {}
        # The timeout only makes the consumer wake every 0.1 s, so that a Ctrl-C delivered to
        # another thread is noticed promptly (see `_pieces`).
        self._streamer = TextIteratorStreamer(
            engine.lm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.1
        )
        enc = engine.encode([prompt], engine.lm.prompt_format.add_special_tokens)
        self._width = enc["input_ids"].shape[1]
        kwargs = {
            **enc,
            **engine.generate_kwargs(settings, self._stops),
            "streamer": self._streamer,
            "stopping_criteria": StoppingCriteriaList([_StopWhenSet(self._cancel)]),
        }
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(kwargs,), daemon=True)
        self._thread.start()

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            with self.engine.seeded(self.settings.seed):
                self._result["ids"] = self.engine.lm.model.generate(**kwargs)[0, self._width :].tolist()
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
        for piece in self._pieces():
            text = self._pieces_out.push(piece)
            if text:
                yield text
            if self._pieces_out.stopped:
                self._cancel.set()  # the worker may not have seen the stop string yet
                break
        tail = self._pieces_out.end()
        if tail:
            yield tail
        self._finish()

    def cancel(self) -> None:
        """Stop generating (from the consumer's thread, e.g. on Ctrl-C) and wait for the worker."""
        self.cancelled = True
        self._cancel.set()
        self._finish()

    def _finish(self) -> None:
        if self.completion is not None:
            return
        self._thread.join()
        self.elapsed_s = time.perf_counter() - self._start
        if "error" in self._result:
            raise self._result["error"]
        done = self.engine.finish(
            self._result.get("ids", []), self.settings.max_new_tokens, self._stops, self._width
        )
        if self.cancelled:
            done = Completion(done.text, FinishReason.CANCELLED, done.prompt_tokens, done.completion_tokens)
        elif self._pieces_out.stopped:
            done = Completion(done.text, FinishReason.STOP, done.prompt_tokens, done.completion_tokens)
        self.completion = done
