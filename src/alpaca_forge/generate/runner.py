"""`alpaca-forge generate`: new Alpaca records from seed tasks and a teacher, the self-instruct way.

Data flow: the seeds file -> (resuming: the output and the request log rebuild the pool and the
accounting) -> requests kept in flight, each: 3 demonstrations -> prompt -> the teacher (an
`Engine`) -> parse -> filters -> ROUGE-L against the pool -> accepted records appended and flushed
one by one, the request logged -> a summary. The pure steps are in `teacher_prompt.py` and
`steps.py`; this module holds the outside world: files, the engine, threads, limits.

Crash-safe: a kill at any moment loses at most the requests in flight; running the same command
again carries on to the target, losing and duplicating nothing (a record written just before a
kill is in the pool on the next start, so a redone request cannot add it twice).
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..core.files import check_output, open_append, read_appended_jsonl, sync, user_paths, write_json_atomic
from ..core.prompts import Message
from ..core.records import Record, read_records
from ..engines import Completion, Engine, using_engine
from .config import GenerateConfig
from .steps import Pool, accept_into, blacklist_pattern, filter_reason, parse_tasks
from .teacher_prompt import DEMOS_PER_PROMPT, build_prompt, request_seed, sample_demos

log = logging.getLogger("alpaca_forge")


class StopReason(str, enum.Enum):
    DONE = "done"  # the target is reached
    COST_LIMIT = "cost_limit"  # --max-cost-usd spent
    REQUEST_LIMIT = "request_limit"  # --max-requests sent
    BARREN = "barren"  # --max-barren-requests in a row gave nothing: the teacher is not following

    @property
    def as_asked(self) -> bool:
        """The run ended where the user said: its target, or a limit they set (exit status 0)."""
        return self is not StopReason.BARREN


@dataclass(frozen=True)
class GenerateResult:
    stop: StopReason
    stop_detail: str  # for people: "cost limit reached ($0.0120 of $0.01)"
    teacher: str
    teacher_settings: dict[str, Any]  # as run: engine, API, sampling (defaults resolved)
    accepted: int  # in the output, all runs together
    target: int
    accepted_this_run: int
    requests: int  # all runs together, as the counts below
    retries: int
    parsed: int
    dropped: dict[str, int]  # reason -> count
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    wall_time_s: float  # this run
    output: Path
    requests_log: Path
    summary_path: Path
    method: str = "self-instruct"
    details: dict[str, Any] = field(default_factory=dict)  # the method's own counts (evol, magpie)

    @property
    def accepted_per_request(self) -> float:
        return round(self.accepted / self.requests, 3) if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The summary file's contents."""
        return {
            "teacher": self.teacher,
            "teacher_settings": self.teacher_settings,
            "stop_reason": self.stop_detail,
            "stopped_by": self.stop.value,
            "accepted": self.accepted,
            "target": self.target,
            "accepted_this_run": self.accepted_this_run,
            "requests": self.requests,
            "retries": self.retries,
            "parsed": self.parsed,
            "dropped": dict(sorted(self.dropped.items())),
            "accepted_per_request": self.accepted_per_request,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "wall_time_s_this_run": round(self.wall_time_s, 2),
            "output": str(self.output),
            "method": self.method,
            **({"details": self.details} if self.details else {}),
        }


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

    def add(self, row: dict[str, Any]) -> None:
        self.requests += 1
        self.retries += row["retries"]
        self.prompt_tokens += row["prompt_tokens"]
        self.completion_tokens += row["completion_tokens"]
        self.accepted += row["accepted"]
        self.parsed += row["parsed"]
        self.dropped.update(row["dropped"])


def side_paths(output: Path) -> tuple[Path, Path]:
    """`data.jsonl` -> `data.requests.jsonl` (one line per request) and `data.summary.json`."""
    stem = output.name.removesuffix(".jsonl").removesuffix(".json")
    return output.with_name(f"{stem}.requests.jsonl"), output.with_name(f"{stem}.summary.json")


def run(config: GenerateConfig, *, progress: bool = True, engine: Engine | None = None) -> GenerateResult:
    """Generate until `config.num_instructions` records are in `config.output` (or a limit is
    reached). `engine` reuses an open teacher, which must be the kind `config.teacher` names (it
    decides the default API, sampling and repetition penalty); else one is opened and closed here."""
    config = config.resolved  # the teacher's defaults, filled in once for the whole job
    if config.method == "evol":
        from .evol import run_evol

        return run_evol(config, progress=progress, engine=engine)
    if config.method == "magpie":
        from .magpie import run_magpie

        return run_magpie(config, progress=progress, engine=engine)
    assert config.seeds is not None  # checked by the config
    with user_paths():  # an OSError on any of the user's paths is reported, never a traceback
        output = check_output(config.output, inputs=[config.seeds])
        log_path, summary_path = side_paths(output)
        for path in (log_path, summary_path):
            check_output(path, inputs=[config.seeds])
        seeds = read_records(config.seeds)  # a bad seed file fails before the teacher loads
        job = _Job(config, seeds, output, log_path, summary_path)
    if job.resumed_with:
        log.info(
            "resuming: %d records already in %s, %d requests done",
            job.resumed_with,
            output,
            job.tally.requests,
        )
    with using_engine(config.teacher, engine, seed=config.seed) as teacher, user_paths():
        return job.run(teacher, progress)


class _Job:
    """One generate job: resume state -> requests until the target -> summary."""

    def __init__(
        self, config: GenerateConfig, seeds: list[Record], output: Path, log_path: Path, summary_path: Path
    ):
        self.config, self.seeds = config, seeds
        self.output, self.log_path, self.summary_path = output, log_path, summary_path
        self.blacklist = blacklist_pattern(config.filters.blacklist)
        fix = "choose another --output, or move this file away to start over"
        accepted = [row for _, row in read_appended_jsonl(output, ("instruction",), "generate", fix)]
        logs = [row for _, row in read_appended_jsonl(log_path, (), "generate", fix)]
        self.pool = Pool([s.instruction for s in seeds] + [r["instruction"] for r in accepted])
        self.tally = Tally()
        for row in logs:
            self.tally.add(row)
        self.tally.accepted = len(accepted)  # the records themselves are the truth
        self.done_requests = {row["request"] for row in logs}
        self.resumed_with = len(accepted)
        self.stop: StopReason | None = None
        self.stop_detail = ""
        self.in_flight = 0

    # -- one request (in a worker thread) ---------------------------------------------------

    def ask(self, engine: Engine, request: int) -> tuple[int, Completion, int]:
        prompt = build_prompt(sample_demos(self.seeds, request, self.config.seed))
        settings = self.config.sampling(request_seed(self.config.seed, request))
        if self.config.api == "completions":  # continued as plain text
            reply = engine.complete([prompt], settings)[0]
        else:
            reply = engine.chat([[Message("user", prompt)]], settings)[0]
        return request, reply, engine.last_retries  # this thread's last call

    # -- one reply (in the main thread, one at a time) --------------------------------------

    def take(self, request: int, reply: Completion, retries: int, out: IO[str], log_file: IO[str]) -> int:
        """Filter the reply's tasks, append the accepted ones, log the request. Returns accepted."""
        filters = self.config.filters
        parsed = parse_tasks(reply.text, DEMOS_PER_PROMPT + 1, reply.finish_reason)
        dropped: Counter = Counter(unparseable=parsed.unparseable, truncated=parsed.truncated)
        candidates = []
        for record in parsed.records:
            reason = filter_reason(record.instruction, filters, self.blacklist)
            if reason:
                dropped[reason] += 1
            else:
                candidates.append(record)
        room = self.config.num_instructions - self.tally.accepted
        accepted, similar, over = accept_into(self.pool, candidates, filters.rouge_threshold, room)
        dropped.update(rouge_similar=similar, over_target=over)
        for record, neighbours in accepted:
            row = {**record.to_dict(), **neighbours, "request": request}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()  # in the OS's hands: survives a kill of this process from here on
        entry = {
            "request": request,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "retries": retries,
            "finish_reason": reply.finish_reason.value,
            "parsed": len(parsed.records),
            "accepted": len(accepted),
            "dropped": {k: v for k, v in dropped.items() if v},
        }
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()
        self.tally.add(entry)
        self.done_requests.add(request)
        return len(accepted)

    # -- the loop ---------------------------------------------------------------------------

    def may_ask(self) -> bool:
        """Whether to send another request now; sets `stop` once the job should end."""
        c, t = self.config, self.tally
        if self.stop is not None:
            return False
        if t.accepted >= c.num_instructions:
            self._stop(StopReason.DONE, "done")
        elif c.max_cost_usd is not None and t.cost_usd(c) >= c.max_cost_usd:
            self._stop(
                StopReason.COST_LIMIT, f"cost limit reached (${t.cost_usd(c):.4f} of ${c.max_cost_usd:g})"
            )
        elif c.max_requests is not None and t.requests + self.in_flight >= c.max_requests:
            self._stop(StopReason.REQUEST_LIMIT, f"request limit reached ({c.max_requests})")
        if self.stop is not None:
            return False
        # What is already asked for should cover the rest: do not pay for more. (The yield so
        # far, per request; before any reply it is 0, so the first wave is always sent.)
        per_request = t.accepted / t.requests if t.requests else 0.0
        return not (self.in_flight and self.in_flight * per_request >= c.num_instructions - t.accepted)

    def _stop(self, reason: StopReason, detail: str) -> None:
        self.stop, self.stop_detail = reason, detail

    def run(self, engine: Engine, progress: bool) -> GenerateResult:
        from tqdm import tqdm

        c = self.config
        start = time.perf_counter()
        requests = (k for k in itertools.count() if k not in self.done_requests)
        barren = 0
        bar = tqdm(
            total=c.num_instructions, initial=min(self.tally.accepted, c.num_instructions),
            desc="generate", unit="record", disable=not progress, file=sys.stderr,
        )  # fmt: skip
        out, log_file = open_append(self.output), open_append(self.log_path)
        workers = ThreadPoolExecutor(max_workers=c.concurrency, thread_name_prefix="teacher")
        pending: set[Future] = set()
        synced_at = time.monotonic()
        finished_cleanly = False
        try:
            while True:
                # Keep the teacher busy: top up before taking the next reply, one reply at a time.
                while len(pending) < c.concurrency and self.may_ask():
                    pending.add(workers.submit(self.ask, engine, next(requests)))
                    self.in_flight += 1
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                future = finished.pop()
                pending |= finished
                self.in_flight -= 1
                got = self.take(*future.result(), out, log_file)  # an EngineError stops the run here
                if time.monotonic() - synced_at >= 1.0:  # on disk too: a power cut costs at most ~1 s
                    sync(out)
                    sync(log_file)
                    synced_at = time.monotonic()
                barren = 0 if got else barren + 1
                bar.update(min(got, bar.total - bar.n))
                t = self.tally
                bar.set_postfix_str(
                    f"{t.requests} req, ${t.cost_usd(c):.4f}, {t.prompt_tokens + t.completion_tokens} tok"
                )
                if barren >= c.max_barren_requests and self.stop is None:
                    self._stop(StopReason.BARREN, f"the last {barren} requests gave no acceptable record")
            finished_cleanly = True
        finally:
            for future in pending:
                future.cancel()
            # After an error or Ctrl-C, do not wait minutes for requests still in flight (each
            # may be retrying): their work is redone on resume, and their replies are not taken.
            workers.shutdown(wait=finished_cleanly, cancel_futures=True)
            bar.close()
            for f in (out, log_file):
                sync(f)
                f.close()
        return self._finish(engine.name, time.perf_counter() - start)

    def _finish(self, teacher: str, elapsed_s: float) -> GenerateResult:
        t, c = self.tally, self.config
        if t.accepted >= c.num_instructions or self.stop is None:
            self._stop(StopReason.DONE, "done")
        result = GenerateResult(
            stop=self.stop or StopReason.DONE,
            stop_detail=self.stop_detail,
            teacher=teacher,
            teacher_settings=_teacher_settings(c),
            accepted=t.accepted,
            target=c.num_instructions,
            accepted_this_run=t.accepted - self.resumed_with,
            requests=t.requests,
            retries=t.retries,
            parsed=t.parsed,
            dropped=dict(t.dropped),
            prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens,
            cost_usd=t.cost_usd(c),
            wall_time_s=elapsed_s,
            output=self.output,
            requests_log=self.log_path,
            summary_path=self.summary_path,
        )
        write_json_atomic(self.summary_path, result.to_dict())
        return result


def _teacher_settings(config: GenerateConfig) -> dict[str, Any]:
    """What the summary records of how the teacher ran: the values used, whoever chose them."""
    s = config.settings
    return {
        "engine": config.teacher.engine,
        "api": config.api,
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "repetition_penalty": s.repetition_penalty,
    }
