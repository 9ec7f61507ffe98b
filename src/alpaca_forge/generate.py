"""Self-instruct data generation, the Alpaca recipe: seed tasks -> teacher prompts -> new records.

Data flow (one request): sample 3 seed tasks (seeded by the request number) -> `build_prompt`
-> teacher completion -> `parse_tasks` -> `filter_reason` for each candidate (length, blacklist,
prefixes, first character) -> ROUGE-L against the pool (seeds + everything accepted) -> append.

This module holds the pure steps; they are what decides which records a run produces.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .records import Record, read_appended_jsonl, write_text_atomic
from .rouge import Vocabulary, f1_from_lcs_matrix, lcs_matrix
from .teachers import SamplingParams, Teacher, TeacherReply

TASKS_PER_PROMPT = 20  # tasks the teacher is asked for in one completion
DEMOS_PER_PROMPT = 3  # seed tasks shown as examples in each prompt

# Our own wording of the Alpaca recipe's requirements.
PREAMBLE = f"""Write {TASKS_PER_PROMPT} new tasks that people might give an AI assistant, each with a good answer.

Rules for the tasks:
1. Make them different from one another: use a different verb in each, and mix kinds of task (open questions, classification, rewriting, brainstorming, extraction, reasoning, advice, short coding).
2. Write in English. Each instruction is one or two sentences, an imperative or a question.
3. When a task needs material to work on, give a realistic and concrete input of at most 100 words; otherwise write <noinput> as the input.
4. Give each task an appropriate answer of fewer than 100 words.
5. A language model can only read and write text: do not ask for images, drawings, audio, video, files, or actions in the world such as sending an email or setting an alarm.

Tasks:
"""


def format_demo(number: int, record: Record) -> str:
    """One example task in the numbered layout the teacher is asked to continue."""
    return (
        f"###\n{number}. Instruction: {record.instruction}\n"
        f"{number}. Input:\n{record.input or '<noinput>'}\n"
        f"{number}. Output:\n{record.output}\n"
    )


def sample_demos(seeds: Sequence[Record], request_number: int, seed: int) -> list[Record]:
    """The demonstrations for one request: a fixed function of (seed, request number), so that a
    resumed run asks exactly what an uninterrupted one would have."""
    rng = random.Random(f"{seed}:{request_number}")
    return rng.sample(list(seeds), min(DEMOS_PER_PROMPT, len(seeds)))


def build_prompt(demos: Sequence[Record]) -> str:
    """The teacher's prompt; it ends where the next instruction begins."""
    body = "".join(format_demo(i, r) for i, r in enumerate(demos, start=1))
    return f"{PREAMBLE}{body}###\n{len(demos) + 1}. Instruction:"


# ---------------------------------------------------------------------------------------------
# Parsing what the teacher wrote

# A field label at the start of a line: "4. Instruction:", "5) Input:", "Output:", "**6. Output:**".
_LABEL = re.compile(
    r"^[ \t]*[*_#]*[ \t]*(?:(\d+)[ \t]*[.)][ \t]*)?[*_]*(Instruction|Input|Output)[*_]*[ \t]*:[*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_TRAILING_HASHES = re.compile(r"(?:\n[ \t]*#+[ \t]*)+\s*$")
_NO_INPUT = re.compile(r"<?\s*no[\s_-]*input\s*>?\.?|n/?a|none|-|", re.IGNORECASE)


@dataclass
class ParsedTasks:
    records: list[Record] = field(default_factory=list)
    unparseable: int = 0  # blocks with an instruction but no output, or fields out of order
    truncated: int = 0  # the last block, dropped because the completion hit its length limit


def parse_tasks(completion: str, first_number: int, finish_reason: str = "stop") -> ParsedTasks:
    """Records from a teacher's completion of `build_prompt`.

    The prompt ended in "N. Instruction:", so the completion starts inside an instruction; a chat
    model may instead restate that label, number differently, skip numbers, add a preamble
    ("Sure! Here are ...") or bold its labels. Blocks are found by their labels, not their numbers.
    """
    text = completion.replace("\r\n", "\n")
    first = _LABEL.search(text)
    if first is None or first.group(2).lower() != "instruction":
        # A plain continuation of the prompt: its first instruction carries no label.
        text = f"{first_number}. Instruction:\n{text}"
    else:
        text = text[first.start() :]  # whatever precedes the first label is chat preamble
    parsed = ParsedTasks()
    blocks: list[dict[str, str]] = []
    labels = list(_LABEL.finditer(text))
    for k, label in enumerate(labels):
        end = labels[k + 1].start() if k + 1 < len(labels) else len(text)
        # Blocks end at "###"; a model that writes fewer hashes leaves a line of them behind.
        value = _TRAILING_HASHES.sub("", text[label.end() : end].split("###")[0]).strip()
        name = label.group(2).lower()
        if name == "instruction":
            blocks.append({"instruction": value})
        elif blocks and name not in blocks[-1]:
            blocks[-1][name] = value
        else:
            parsed.unparseable += 1  # an Input/Output with no instruction before it, or twice
    if finish_reason == "length" and blocks:
        blocks.pop()
        parsed.truncated = 1
    for block in blocks:
        if not block["instruction"] or "output" not in block or not block["output"]:
            parsed.unparseable += 1
            continue
        inp = block.get("input", "")
        parsed.records.append(
            Record(block["instruction"], "" if _NO_INPUT.fullmatch(inp.strip()) else inp, block["output"])
        )
    return parsed


# ---------------------------------------------------------------------------------------------
# Filters (the ROUGE-L one needs the pool and lives with it)

DEFAULT_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip


@dataclass(frozen=True)
class FilterConfig:
    """Which candidates are dropped before the ROUGE-L check; every threshold is a flag."""

    min_words: int = 4  # instructions of 3 words or fewer say too little
    max_words: int = 150  # longer ones are usually the teacher running on
    blacklist: tuple[str, ...] = DEFAULT_BLACKLIST  # whole words, any case: tasks a text model cannot do
    banned_prefixes: tuple[str, ...] = ("Write a program",)  # answers too long to check
    rouge_threshold: float = 0.7  # drop when ROUGE-L F1 with any pool instruction is above this

    def blacklist_pattern(self) -> re.Pattern[str]:
        words = "|".join(re.escape(w) for w in self.blacklist)
        return re.compile(rf"\b(?:{words})\b", re.IGNORECASE)


FILTERS = (
    "too_short",
    "too_long",
    "blacklisted",
    "banned_prefix",
    "starts_with_punctuation",
    "starts_non_ascii",
)


def filter_reason(
    instruction: str, config: FilterConfig, blacklist: re.Pattern[str] | None = None
) -> str | None:
    """Why a candidate instruction is dropped (one of FILTERS), or None if it passes."""
    words = len(instruction.split())
    if words < config.min_words:
        return "too_short"
    if words > config.max_words:
        return "too_long"
    if (blacklist or config.blacklist_pattern()).search(instruction):
        return "blacklisted"
    if any(instruction.startswith(p) for p in config.banned_prefixes):
        return "banned_prefix"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if not instruction[0].isascii():
        return "starts_non_ascii"
    return None


# ---------------------------------------------------------------------------------------------
# The pool: seeds plus everything accepted, scored against each candidate


class Pool:
    """Instructions a candidate must differ from: the seeds, then every accepted one, in order."""

    def __init__(self, instructions: Sequence[str]):
        self.vocab = Vocabulary()
        self.texts: list[str] = []
        self.ids: list[list[int]] = []
        self._lens = np.zeros(1024, dtype=np.int64)  # grows by doubling; first len(texts) are real
        for text in instructions:
            self.add(text)

    @property
    def lengths(self) -> np.ndarray:
        return self._lens[: len(self.ids)]

    def add(self, instruction: str) -> None:
        ids = self.vocab.encode(instruction)
        if len(self.ids) == len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros_like(self._lens)])
        self._lens[len(self.ids)] = len(ids)
        self.texts.append(instruction)
        self.ids.append(ids)

    def scores(self, instruction: str) -> np.ndarray:
        """ROUGE-L F1 against every pool instruction (exact, as rouge-score computes it)."""
        return self.scores_many([instruction])[0]

    def scores_many(self, instructions: Sequence[str]) -> np.ndarray:
        """(len(instructions), len(pool)) F1 matrix, in one multi-core LCS call."""
        queries = [self.vocab.encode(t) for t in instructions]
        lcs = lcs_matrix(queries, self.ids)
        return f1_from_lcs_matrix(lcs, np.array([len(q) for q in queries]), self.lengths)


def similarity_summary(pool: Pool, scores: np.ndarray, top: int = 10) -> dict[str, Any]:
    """What the original kept with each record: its most similar instructions and the mean score."""
    top = min(top, len(scores))
    best = np.argpartition(-scores, top - 1)[:top] if top else np.zeros(0, dtype=np.int64)
    best = best[np.lexsort((best, -scores[best]))]  # highest first; ties by pool order
    return {
        "most_similar_instructions": {pool.texts[i]: round(float(scores[i]), 6) for i in best},
        "avg_similarity_score": round(float(scores.mean()), 6) if len(scores) else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# A run: requests in flight, candidates filtered, records appended, everything resumable


@dataclass(frozen=True)
class GenerateConfig:
    num_instructions: int  # stop once this many records are accepted (across resumed runs)
    seed: int = 0  # demos of request k depend only on (seed, k)
    concurrency: int = 1  # requests in flight at once
    filters: FilterConfig = field(default_factory=FilterConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    price_prompt_usd_per_1m: float = 0.0  # teacher price per million prompt tokens
    price_completion_usd_per_1m: float = 0.0  # and per million completion tokens
    max_cost_usd: float | None = None  # no new request once this much is spent
    max_requests: int | None = None  # no new request after this many (all runs together)
    max_barren_requests: int = 100  # stop if this many requests in a row yield nothing accepted


@dataclass
class Tally:
    """Accounting for the whole job, rebuilt from the request log when a run resumes."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted: int = 0
    parsed: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count

    def cost_usd(self, config: GenerateConfig) -> float:
        return (
            self.prompt_tokens * config.price_prompt_usd_per_1m
            + self.completion_tokens * config.price_completion_usd_per_1m
        ) / 1e6

    def add(self, log: dict[str, Any]) -> None:
        self.requests += 1
        self.retries += log["retries"]
        self.prompt_tokens += log["prompt_tokens"]
        self.completion_tokens += log["completion_tokens"]
        self.accepted += log["accepted"]
        self.parsed += log["parsed"]
        self.dropped.update(log["dropped"])


def side_paths(output: Path) -> tuple[Path, Path]:
    """`data.jsonl` -> `data.requests.jsonl` (one line per request) and `data.summary.json`."""
    stem = output.name.removesuffix(".jsonl").removesuffix(".json")
    return output.with_name(f"{stem}.requests.jsonl"), output.with_name(f"{stem}.summary.json")


class Generator:
    """One `generate` job: setup (resume state) -> run (requests until N accepted) -> summary."""

    def __init__(
        self, teacher: Teacher, seeds: list[Record], output: str | os.PathLike, config: GenerateConfig
    ):
        if config.num_instructions < 1:
            raise UserError(
                f"--num-instructions must be at least 1, got {config.num_instructions}",
                "e.g. --num-instructions 52000",
            )
        if config.concurrency < 1:
            raise UserError(
                f"--concurrency must be at least 1, got {config.concurrency}",
                "use 1 for a local model, 8-64 for a server",
            )
        self.teacher, self.seeds, self.config = teacher, seeds, config
        self.output = Path(output)
        self.log_path, self.summary_path = side_paths(self.output)
        self.blacklist = config.filters.blacklist_pattern()
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            fix = "choose another --output, or move this file away to start over"
            accepted = [row for _, row in read_appended_jsonl(self.output, ("instruction",), "generate", fix)]
            logs = [row for _, row in read_appended_jsonl(self.log_path, (), "generate", fix)]
            self._out = open(self.output, "a", encoding="utf-8")  # noqa: SIM115 (closed in run)
            self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise UserError(
                f"{self.output}: cannot be written ({e.strerror})",
                "choose an --output in a folder you can write to",
            ) from e
        self.pool = Pool([s.instruction for s in seeds] + [r["instruction"] for r in accepted])
        self.tally = Tally()
        for log in logs:
            self.tally.add(log)
        self.tally.accepted = len(accepted)  # the records themselves are the truth
        self.done_requests = {log["request"] for log in logs}
        self.resumed_with = len(accepted)
        self.stop_reason = ""
        self._synced_at = time.monotonic()

    # -- one request ------------------------------------------------------------------------

    def _ask(self, request: int) -> tuple[int, TeacherReply]:
        demos = sample_demos(self.seeds, request, self.config.seed)
        params = dataclasses.replace(self.config.sampling, seed=self.config.seed * 1_000_003 + request)
        return request, self.teacher.complete(build_prompt(demos), params)

    def _take(self, request: int, reply: TeacherReply) -> int:
        """Filter the reply's tasks, append the accepted ones, log the request. Returns accepted."""
        parsed = parse_tasks(reply.text, DEMOS_PER_PROMPT + 1, reply.finish_reason)
        dropped: Counter = Counter(unparseable=parsed.unparseable, truncated=parsed.truncated)
        candidates = []
        for record in parsed.records:
            reason = filter_reason(record.instruction, self.config.filters, self.blacklist)
            if reason:
                dropped[reason] += 1
            else:
                candidates.append(record)
        # Greedy in order, as if scored one by one: each candidate against the pool as it was
        # before this reply, and against the candidates of this reply accepted before it.
        texts = [c.instruction for c in candidates]
        vs_pool = self.pool.scores_many(texts)
        vs_batch = Pool(texts).scores_many(texts)
        accepted_here: list[int] = []
        for k, record in enumerate(candidates):
            if self.tally.accepted + len(accepted_here) >= self.config.num_instructions:
                dropped["over_target"] += 1
                continue
            scores = np.concatenate([vs_pool[k], vs_batch[k, accepted_here]])
            if len(scores) and scores.max() > self.config.filters.rouge_threshold:
                dropped["rouge_similar"] += 1
                continue
            row = {
                "instruction": record.instruction,
                "input": record.input,
                "output": record.output,
                **similarity_summary(self.pool, scores),
                "request": request,
            }
            self._out.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._out.flush()  # in the OS's hands: survives a kill of this process from here on
            self.pool.add(record.instruction)
            accepted_here.append(k)
        accepted = len(accepted_here)
        log = {
            "request": request,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "retries": reply.retries,
            "finish_reason": reply.finish_reason,
            "parsed": len(parsed.records),
            "accepted": accepted,
            "dropped": {k: v for k, v in dropped.items() if v},
        }
        self._log.write(json.dumps(log) + "\n")
        self._log.flush()
        if time.monotonic() - self._synced_at >= 1.0:  # on disk too: a power cut costs at most ~1 s
            os.fsync(self._out.fileno())
            os.fsync(self._log.fileno())
            self._synced_at = time.monotonic()
        self.tally.add(log)
        self.done_requests.add(request)
        return accepted

    # -- the loop ---------------------------------------------------------------------------

    def _may_ask(self) -> bool:
        """Whether to send another request now; sets `stop_reason` once the job should end."""
        c, t = self.config, self.tally
        if self.stop_reason:
            return False
        if t.accepted >= c.num_instructions:
            self.stop_reason = "done"
            return False
        if c.max_cost_usd is not None and t.cost_usd(c) >= c.max_cost_usd:
            self.stop_reason = f"cost limit reached (${t.cost_usd(c):.4f} of ${c.max_cost_usd:g})"
            return False
        if c.max_requests is not None and t.requests + self._in_flight >= c.max_requests:
            self.stop_reason = f"request limit reached ({c.max_requests})"
            return False
        # What is already asked for should cover the rest: do not pay for more.
        return not (self._in_flight and self._expected_from_in_flight() >= c.num_instructions - t.accepted)

    def _expected_from_in_flight(self) -> float:
        """Records the requests in flight should bring, at the yield seen so far (none seen: 0)."""
        per_request = self.tally.accepted / self.tally.requests if self.tally.requests else 0.0
        return self._in_flight * per_request

    def run(self, progress: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        start = time.perf_counter()
        self._in_flight = 0
        requests = (k for k in itertools.count() if k not in self.done_requests)
        barren = 0
        bar = tqdm(
            total=self.config.num_instructions, initial=min(self.tally.accepted, self.config.num_instructions),
            desc="generate", unit="record", disable=not progress, file=sys.stderr,
        )  # fmt: skip
        pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="teacher")
        pending: set[Future] = set()
        try:
            while True:
                # Keep the teacher busy: top up before taking the next reply, one reply at a time.
                while len(pending) < self.config.concurrency and self._may_ask():
                    pending.add(pool.submit(self._ask, next(requests)))
                    self._in_flight += 1
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                future = finished.pop()
                pending |= finished
                self._in_flight -= 1
                request, reply = future.result()  # a TeacherError stops the run here
                got = self._take(request, reply)
                barren = 0 if got else barren + 1
                bar.update(min(got, bar.total - bar.n))
                bar.set_postfix_str(
                    f"{self.tally.requests} req, ${self.tally.cost_usd(self.config):.4f}, "
                    f"{self.tally.prompt_tokens + self.tally.completion_tokens} tok"
                )
                if barren >= self.config.max_barren_requests and not self.stop_reason:
                    self.stop_reason = f"the last {barren} requests gave no acceptable record"
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
            for f in (self._out, self._log):
                f.flush()
                os.fsync(f.fileno())
                f.close()
        return self._write_summary(time.perf_counter() - start)

    def _write_summary(self, elapsed_s: float) -> dict[str, Any]:
        t, c = self.tally, self.config
        summary = {
            "teacher": self.teacher.name,
            "stop_reason": "done" if t.accepted >= c.num_instructions else self.stop_reason or "done",
            "accepted": t.accepted,
            "target": c.num_instructions,
            "accepted_this_run": t.accepted - self.resumed_with,
            "requests": t.requests,
            "retries": t.retries,
            "parsed": t.parsed,
            "dropped": dict(sorted(t.dropped.items())),
            "accepted_per_request": round(t.accepted / t.requests, 3) if t.requests else 0.0,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "cost_usd": round(t.cost_usd(c), 6),
            "wall_time_s_this_run": round(elapsed_s, 2),
            "output": str(self.output),
        }
        write_text_atomic(self.summary_path, json.dumps(summary, indent=2) + "\n")
        return summary
