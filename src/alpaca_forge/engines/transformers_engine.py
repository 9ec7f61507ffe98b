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

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..core.errors import UserError
from ..core.models import LoadedModel
from ..core.prompts import Message, render_to_fit
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


class TransformersEngine:
    upstream = False  # renders, counts and holds the weights here
    last_retries = 0  # nothing to retry in process

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.name = lm.name
        self.multi_turn = lm.prompt_format.multi_turn
        self.format_name = lm.prompt_format.name
        self.prompt_format = lm.prompt_format
        self._lock = threading.Lock()
        self.eos_token_ids = self._eos_ids()
        self.pad_token_id = self._pad_id()

    # -- the interface ----------------------------------------------------------------------

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
        return self._generate(list(prompts), settings, settings.stop, add_special_tokens=True)

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        prompts = [self.render(c, settings.max_new_tokens) for c in conversations]
        fmt = self.lm.prompt_format
        return self._generate(
            prompts, settings, self.stop_strings(settings), add_special_tokens=fmt.add_special_tokens
        )

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> ThreadStream:
        prompt = self.render(conversation, settings.max_new_tokens)
        fmt = self.lm.prompt_format
        return self._stream(prompt, fmt.add_special_tokens, self.stop_strings(settings), settings)

    def stream_prompt(self, prompt: str, settings: GenerationSettings) -> ThreadStream:
        """A raw prompt continued piece by piece, stopped only at `settings.stop` (as `complete`)."""
        return self._stream(prompt, True, settings.stop, settings)

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

    # -- what serve asks of an engine ------------------------------------------------------

    def count_tokens(self, text: str, *, chat: bool) -> int:
        """Tokens the model reads for a prompt: a rendered conversation (`chat`) or a raw one."""
        return self.count(text, self.lm.prompt_format.add_special_tokens if chat else True)

    def count(self, text: str, add_special_tokens: bool) -> int:
        return len(self.lm.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def context_tokens(self) -> int | None:
        return getattr(self.lm.model.config, "max_position_embeddings", None)

    def identity(self) -> ModelIdentity:
        return local_identity(self.name, self.prompt_format, self.weights_digest())

    def generation_defaults(self) -> SamplingDefaults:
        """What the model's generation_config.json sets."""
        config = self.lm.model.generation_config
        return SamplingDefaults.of_generation_config(config, f"{self.name}: generation_config.json")

    def weights_digest(self) -> bytes:
        """sha256 over every tensor's name and bytes (~0.5 s per GB of weights)."""
        import hashlib

        h = hashlib.sha256()
        for name, tensor in self.lm.model.state_dict().items():
            h.update(name.encode())
            h.update(_raw_bytes(tensor))
        return h.digest()

    def stop_strings(self, settings: GenerationSettings) -> list[str]:
        """Where a chat answer stops: the prompt format's stop strings, then the caller's."""
        return list(dict.fromkeys((*self.lm.prompt_format.stop_strings, *settings.stop)))

    # -- generation -------------------------------------------------------------------------

    @property
    def end_token_ids(self) -> set[int]:
        """Ids that end an answer: EOS, and the pad id (generate pads a row a stop string ended)."""
        return {*self.eos_token_ids, self.pad_token_id}

    def _eos_ids(self) -> set[int]:
        eos = self.lm.model.generation_config.eos_token_id
        if eos is None:
            eos = self.lm.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()

    def _pad_id(self) -> int:
        tok = self.lm.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        if not self.eos_token_ids:
            raise UserError(
                "the model's tokenizer has neither a pad nor an EOS token",
                "use a tokenizer that defines eos_token",
            )
        return min(
            self.eos_token_ids
        )  # padding only ever sits where the attention mask is 0, so any id will do

    def encode(self, prompts: Sequence[str], add_special_tokens: bool) -> dict[str, Any]:
        """Prompts left-padded (generation appends on the right of every row), padded here so the
        shared tokenizer is never changed."""
        import torch

        ids = [self.lm.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
        width = max(len(e) for e in ids)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(e)) + e for e in ids])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in ids])
        return {"input_ids": input_ids.to(self.lm.device), "attention_mask": mask.to(self.lm.device)}

    def generate_kwargs(self, settings: GenerationSettings, stops: Sequence[str]) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": self.pad_token_id,
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
            if t in self.eos_token_ids:
                n, reason = i + 1, FinishReason.STOP
                break
            if t == self.pad_token_id:  # finished early by a stop string; the rest is padding
                n, reason = i, FinishReason.STOP
                break
        text, stopped = cut_at_stop(self.lm.tokenizer.decode(new_ids[:n], skip_special_tokens=True), stops)
        return Completion(text.strip(), FinishReason.STOP if stopped else reason, prompt_tokens, n)

    def _stream(
        self, prompt: str, add_special_tokens: bool, stops: Sequence[str], settings: GenerationSettings
    ) -> ThreadStream:
        """One answer generated in a worker thread, its text handed over as transformers decodes it."""
        from transformers import StoppingCriteriaList

        enc = self.encode([prompt], add_special_tokens)
        width = enc["input_ids"].shape[1]  # (1, width)

        def work(put: Put, stop: threading.Event) -> list[int]:
            kwargs = {
                **enc,
                **self.generate_kwargs(settings, stops),
                "streamer": _piece_streamer(self.lm.tokenizer, put),
                "stopping_criteria": StoppingCriteriaList([_StopWhenSet(stop)]),
            }
            with self.seeded(settings.seed):
                return self.lm.model.generate(**kwargs)[0, width:].tolist()

        return ThreadStream(work, lambda ids: self.finish(ids, settings.max_new_tokens, stops, width), stops)

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


def _piece_streamer(tokenizer: Any, put: Put) -> Any:
    """A generate() streamer handing each piece of decoded text to `put` (transformers'
    `TextStreamer` decides where a piece ends: a word, a line, a CJK character)."""
    from transformers import TextStreamer

    class PieceStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                put(text)

    return PieceStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
