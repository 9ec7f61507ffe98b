"""Training examples: records become exactly the token ids and labels the trainer sees (and
`data tokenize` writes).

One example is `prompt ids + response ids + EOS`:

- the prompt is the record rendered by the prompt format (Alpaca template or chat template) and
  tokenised alone, just as inference tokenises it, so training and inference see the same ids;
- the response is the record's output, tokenised alone, then the tokenizer's EOS;
- labels are -100 on every prompt token (nothing is learnt from the prompt) unless
  `train_on_inputs`; the first token is never a target, so packed examples stay apart;
- an example longer than `max_seq_len` loses response tokens from its end, never its EOS, so a
  model trained on cut answers still learns to stop. A record whose prompt alone leaves no room
  for one response token and the EOS carries no loss; it is left out and counted.

A conversation (`Record.messages`) is the same, turn after turn: what the format writes before
each assistant turn (the text of `render(turns before it)` past the previous answer: the system
message, the user's turn, the template's turn markers) is masked; each assistant turn is
tokenised alone and followed by the EOS, both learnt (`assistant_turns="all"`), or only the last
one (`"last"`, the earlier ones then read as context). So the ids before each answer are the ids
inference renders for that point of the conversation. A window too short for the whole
conversation keeps its first turns (the last answer kept is cut, its EOS kept). Single-turn
formats refuse conversations (`check_format_fits`), before any model loads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UserError
from .prompts import PromptFormat
from .records import Record

IGNORE_INDEX = -100
AssistantTurns = Literal["all", "last"]  # which assistant turns of a conversation are learnt
ASSISTANT_TURNS = ("all", "last")


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    record: int  # position of the source record in its file (0-based)
    truncated: bool = False  # response cut to fit the window (EOS kept)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class TokenizeReport:
    records: int = 0
    examples: int = 0
    truncated: int = 0  # responses cut to fit (their EOS kept)
    no_room: list[int] = field(default_factory=list)  # records whose prompt fills the window
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        text = (
            f"{self.examples} examples from {self.records} records, {self.tokens} tokens "
            f"({self.trained_tokens} trained)"
        )
        if self.truncated:
            text += f"; {self.truncated} responses cut to fit the window, EOS kept"
        if self.no_room:
            shown = ", ".join(str(i + 1) for i in self.no_room[:5])
            more = "" if len(self.no_room) <= 5 else f" and {len(self.no_room) - 5} more"
            text += (
                f"; {len(self.no_room)} records left out: the prompt alone fills the window, so they "
                f"carry no loss (records {shown}{more})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "examples": self.examples,
            "truncated": self.truncated,
            "no_room": len(self.no_room),
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError(
            "the tokenizer has no EOS token, so a trained model could never learn to stop",
            "use a model whose tokenizer defines eos_token (every chat or base LLM on the Hub does)",
        )
    return int(tokenizer.eos_token_id)


def encode_record(
    record: Record,
    index: int,
    tokenizer: Any,
    fmt: PromptFormat,
    max_seq_len: int,
    train_on_inputs: bool = False,
    assistant_turns: AssistantTurns = "all",
) -> Example | None:
    """One record as an example, or None when its prompt leaves no room for a response."""
    if record.messages is not None:
        return encode_conversation(
            record, index, tokenizer, fmt, max_seq_len, train_on_inputs, assistant_turns
        )
    prompt = fmt.prompt(record.instruction, record.input, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=fmt.add_special_tokens)["input_ids"]
    response_ids = tokenizer(record.output, add_special_tokens=False)["input_ids"]
    room = max_seq_len - len(prompt_ids) - 1  # response tokens that fit before the EOS
    if room < 1:
        return None
    truncated = len(response_ids) > room
    response_ids = [*response_ids[:room], eos_id(tokenizer)]
    input_ids = list(prompt_ids) + response_ids
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + response_ids
    labels[0] = IGNORE_INDEX  # nothing predicts the first token (and packing must not try)
    return Example(input_ids, labels, index, truncated)


def conversation_segments(record: Record, fmt: PromptFormat, tokenizer: Any) -> list[tuple[str, bool]]:
    """A conversation as `(text, is_answer)` pieces in order: the masked text the format writes
    before each assistant turn, then that turn. Each piece is read off the format's rendering of
    the conversation up to the turn, so it must render earlier turns as a prefix of later ones."""
    turns = list(record.messages or ())
    eos_text = getattr(tokenizer, "eos_token", None) or ""
    pieces: list[tuple[str, bool]] = []
    prompt_before = answer_before = None
    for a, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = fmt.render(turns[:a], tokenizer)
        if prompt_before is None:
            pieces.append((prompt, False))
        else:
            pieces.append(
                (_after_answer(prompt, prompt_before, answer_before or "", eos_text, record, fmt), False)
            )
        pieces.append((turn.content, True))
        prompt_before, answer_before = prompt, turn.content
    return pieces


def _after_answer(
    prompt: str, before: str, answer: str, eos_text: str, record: Record, fmt: PromptFormat
) -> str:
    """What `prompt` (the conversation up to the next assistant turn) writes after `answer`, the
    previous one: the end of its turn and the next user turn, less the EOS text already learnt."""
    rest = prompt[len(before) :] if prompt.startswith(before) else None
    if rest is not None:
        stripped = rest.lstrip()  # whitespace a template puts between its prompt and the answer
        rest = stripped[len(answer) :] if stripped.startswith(answer) else None
    if rest is None:
        where = record.where or "a conversation"
        raise UserError(
            f"{where}: the '{fmt.name}' prompt format does not write the earlier turns of a conversation "
            "as they were before (its rendering of the turns up to one answer is not the start of its "
            "rendering up to the next), so which tokens are the assistant's cannot be told apart",
            "use a chat template that renders a conversation by appending turns (ChatML, Llama 3, Gemma, "
            "...), or --format user-assistant",
        )
    return rest[len(eos_text) :] if eos_text and rest.startswith(eos_text) else rest


def encode_conversation(
    record: Record,
    index: int,
    tokenizer: Any,
    fmt: PromptFormat,
    max_seq_len: int,
    train_on_inputs: bool = False,
    assistant_turns: AssistantTurns = "all",
) -> Example | None:
    """A conversation as one example (see the module's docstring), or None when the window
    leaves no room for a learnt answer token and its EOS."""
    eos = eos_id(tokenizer)
    pieces = conversation_segments(record, fmt, tokenizer)
    answers = [i for i, (_, is_answer) in enumerate(pieces) if is_answer]
    learnt = set(answers if assistant_turns == "all" else answers[-1:])
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = learnt_kept = False
    for i, (text, is_answer) in enumerate(pieces):
        if not is_answer:
            ids = tokenizer(text, add_special_tokens=fmt.add_special_tokens and i == 0)["input_ids"]
            if len(input_ids) + len(ids) + 2 > max_seq_len:  # no room for one answer token and the EOS
                truncated = bool(input_ids)
                break
            input_ids += ids
            labels += ids if train_on_inputs else [IGNORE_INDEX] * len(ids)
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        room = max_seq_len - len(input_ids) - 1  # answer tokens that fit before the EOS
        cut = len(ids) > room
        ids = [*ids[:room], eos]
        input_ids += ids
        labels += ids if (i in learnt or train_on_inputs) else [IGNORE_INDEX] * len(ids)
        learnt_kept = learnt_kept or i in learnt
        if cut:
            truncated = True
            break
    if not learnt_kept:  # the window ends before any answer that is learnt
        return None
    labels[0] = IGNORE_INDEX
    return Example(input_ids, labels, index, truncated)


def check_format_fits(records: Sequence[Record], fmt: PromptFormat) -> None:
    """Conversations need a multi-turn format, and system messages one that shows them: refused
    here, naming the records, rather than trained as something else than what was written."""
    if fmt.multi_turn and fmt.takes_system:
        return
    if fmt.multi_turn:
        bad = [(i, r) for i, r in enumerate(records) if r.messages and r.messages[0].role == "system"]
        what = f"has a system message, and the '{fmt.name}' prompt format writes none"
    else:
        bad = [(i, r) for i, r in enumerate(records) if r.is_conversation]
        what = f"is a conversation, and the '{fmt.name}' prompt format is single-turn"
    if not bad:
        return
    places = ", ".join(r.where or f"record {i + 1}" for i, r in bad[:5])
    more = "" if len(bad) <= 5 else f" and {len(bad) - 5} more"
    raise UserError(
        f"{places}{more}: {'this record' if len(bad) == 1 else f'{len(bad)} records'} {what} "
        "(it would read only the last user turn, or lose the system message)",
        "use --format chat (the model's own chat template), or make the records single exchanges "
        "without a system message (`alpaca-forge data convert --to alpaca` names those it cannot convert)",
    )


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    fmt: PromptFormat,
    max_seq_len: int,
    train_on_inputs: bool = False,
    progress: Callable[[int], None] | None = None,
    assistant_turns: AssistantTurns = "all",
) -> tuple[list[Example], TokenizeReport]:
    if max_seq_len < 2:
        raise UserError(f"max_seq_len {max_seq_len} is too small", "use at least 2 (512 is the original's)")
    check_format_fits(records, fmt)
    report = TokenizeReport(records=len(records))
    examples: list[Example] = []
    for i, record in enumerate(records):
        example = encode_record(record, i, tokenizer, fmt, max_seq_len, train_on_inputs, assistant_turns)
        if progress:
            progress(1)
        if example is None:
            report.no_room.append(i)
            continue
        examples.append(example)
        report.truncated += example.truncated
        report.tokens += len(example.input_ids)
        report.trained_tokens += example.trained_tokens
    report.examples = len(examples)
    return examples, report


def fingerprint(records: Sequence[Record]) -> str:
    """A hash of the records' text, in order: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for r in records:
        parts = (r.instruction, r.input, r.output)
        if r.messages is not None:  # every turn, with its role (plain records hash as they did)
            parts = tuple(f"{m.role}\x02{m.content}" for m in r.messages)
        for part in parts:
            h.update(part.encode("utf-8"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()[:16]


def describe_example(example: Example, tokenizer: Any, color: bool) -> str:
    """An example as text with its masked tokens told apart from its trained ones."""
    out: list[str] = []
    masked_run: list[int] = []
    trained_run: list[int] = []

    def flush() -> None:
        if masked_run:
            text = tokenizer.decode(masked_run)
            out.append(f"\033[2m{text}\033[0m" if color else f"⟦{text}⟧")
            masked_run.clear()
        if trained_run:
            text = tokenizer.decode(trained_run)
            out.append(f"\033[1;32m{text}\033[0m" if color else text)
            trained_run.clear()

    for tok, label in zip(example.input_ids, example.labels, strict=True):
        if label == IGNORE_INDEX:
            if trained_run:
                flush()
            masked_run.append(tok)
        else:
            if masked_run:
                flush()
            trained_run.append(tok)
    flush()
    return "".join(out)
