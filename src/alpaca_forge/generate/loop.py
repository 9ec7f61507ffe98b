"""The request loop every `generate` method drives: requests kept in flight, replies taken one
at a time, the output and the request log appended, the accounting, the limits, the bar, resume.

How a method uses it (self-instruct: `runner.SelfInstruct`; evol: `evol.Evol`; magpie):

    accepted, logged = load_appended(output, log_path)     # resume state (a cut-off line removed)
    method = MyMethod(config, ..., accepted, logged)        # rebuilds its own state from these rows
    loop = Loop(config, method, output, log_path, summary_path, accepted, logged)
    result = loop.run(engine, progress)                     # a GenerateResult; the summary written

A method is any object with these (see `Method`):

    name: str                          "self-instruct" | "evol" | "magpie" (GenerateResult.method)
    next_request() -> key | None       main thread: the next request to send, or None when none can
                                       be sent now (more may come as replies are taken; with none in
                                       flight, None ends the job: everything there was to ask is
                                       asked). A key is JSON-able (int or str), unique in the job and
                                       the same in every run, so that a resumed run asks what an
                                       uninterrupted one would have (it is the log's "request").
    ask(engine, key) -> Completion     a worker thread: build request `key`, make ONE engine call
                                       (the loop reads `engine.last_retries` after it). No shared
                                       state may change here.
    take(key, reply, room) -> Taken    main thread, one reply at a time, in the order they arrive:
                                       what to append to the output (at most `room` rows: what the
                                       target still needs) and what to log. The loop writes both.
    details() -> dict                  the method's own counts for the summary ({} for none)
    finished_detail() -> str           the stop reason shown when the method ran out of requests
    most_records: int (optional)       the most records it can make (the bar's end, if below the target)

Every reply's log line is `{"request": key, "prompt_tokens", "completion_tokens", "retries",
"finish_reason", "parsed", "accepted", "dropped": {reason: n}, **Taken.fields}`; a method puts
in `fields` whatever it needs to rebuild its state on resume. A reply's accepted rows are
appended and flushed (one write) before its log line, so a kill between the two leaves records
whose request is redone: a method must then not add them twice (self-instruct's pool has them;
evol knows its records by their lineage).

The loop: top up to --concurrency in flight (unless a limit says stop, or the yield so far says
what is in flight covers the target), take the first reply that arrives (an `EngineError` stops
the run there), fsync both files at most once a second and at the end, stop on the target,
--max-cost-usd, --max-requests (resumed runs count), --max-barren-requests in a row that moved
nothing on, or when the method has nothing more to ask. A batch teacher (`--batch-dir`) answers
only what its results files hold: a request still waiting (`BatchPending`) is not taken or logged,
counts against --max-requests, and is asked again by the rerun; the run then ends with the
summary written and `BatchPending` raised (exit status 3).
"""

from __future__ import annotations

import enum
import json
import queue
import sys
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import UserError
from ..core.files import open_append, read_appended_jsonl, sync, write_json_atomic
from ..engines import Completion, Engine
from ..engines.batch import BatchPending, price_factor, waiting_error
from .config import GenerateConfig

RESUME_FIX = "choose another --output, or move this file away to start over"


class StopReason(str, enum.Enum):
    DONE = "done"  # the target is reached, or the method has nothing more to ask
    COST_LIMIT = "cost_limit"  # --max-cost-usd spent
    REQUEST_LIMIT = "request_limit"  # --max-requests sent
    BATCH_WAITING = "batch_waiting"  # a batch teacher's requests wait for their results (exit status 3)
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
        """At the list prices, less a batch teacher's discount."""
        list_price = (
            self.prompt_tokens * config.price_prompt_usd_per_1m
            + self.completion_tokens * config.price_completion_usd_per_1m
        ) / 1e6
        return list_price * price_factor(config.teacher)

    def add(self, row: dict[str, Any]) -> None:
        self.requests += 1
        self.retries += row["retries"]
        self.prompt_tokens += row["prompt_tokens"]
        self.completion_tokens += row["completion_tokens"]
        self.accepted += row["accepted"]
        self.parsed += row["parsed"]
        self.dropped.update(row["dropped"])


@dataclass
class Taken:
    """What a method made of one reply."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # accepted records, appended in order
    parsed: int = 0  # candidates found in the reply
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count (zeros are left out)
    fields: dict[str, Any] = field(default_factory=dict)  # more for the log line (to resume from)
    progress: bool | None = None  # moved the job on (resets the barren count); None: rows were kept


class Method(Protocol):
    name: str

    def next_request(self) -> Hashable | None: ...

    def ask(self, engine: Engine, key: Any) -> Completion: ...

    def take(self, key: Any, reply: Completion, room: int) -> Taken: ...

    def details(self) -> dict[str, Any]: ...

    def finished_detail(self) -> str: ...


def side_paths(output: Path) -> tuple[Path, Path]:
    """`data.jsonl` -> `data.requests.jsonl` (one line per request) and `data.summary.json`."""
    stem = output.name.removesuffix(".jsonl").removesuffix(".json")
    return output.with_name(f"{stem}.requests.jsonl"), output.with_name(f"{stem}.summary.json")


def load_appended(
    output: Path, log_path: Path, required: Sequence[str] = ("instruction",)
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows already in the output and the request log (both [] for a new job). `required`:
    the string fields every output row has (magpie's multi-turn rows have `messages` instead)."""
    accepted = [row for _, row in read_appended_jsonl(output, required, "generate", RESUME_FIX)]
    logged = [row for _, row in read_appended_jsonl(log_path, (), "generate", RESUME_FIX)]
    return accepted, logged


class Loop:
    """One generate job's requests, for any method: see the module's docstring."""

    def __init__(
        self,
        config: GenerateConfig,
        method: Method,
        output: Path,
        log_path: Path,
        summary_path: Path,
        accepted: Sequence[dict[str, Any]],
        logged: Sequence[dict[str, Any]],
    ):
        self.config, self.method = config, method
        self.output, self.log_path, self.summary_path = output, log_path, summary_path
        self.tally = Tally()
        for row in logged:
            self.tally.add(row)
        self.tally.accepted = len(accepted)  # the records themselves are the truth
        self.resumed_with = len(accepted)
        self.stop: StopReason | None = None
        self.stop_detail = ""
        self.in_flight = 0
        self.waiting = 0  # requests written for a batch teacher whose results are not in yet
        self.batch_engines: list[Engine] = []  # the engines they wait on (a method may use two)
        if config.teacher.batch_dir and config.max_requests is None and method.name != "evol":
            raise UserError(
                f"generate --method {method.name} --batch-dir writes its requests up front, as one batch "
                "(request k is fixed by --seed and k): it needs --max-requests",
                "add --max-requests N (self-instruct gives about 1.5 records a request; the rerun that "
                "reads the results stops at the target)",
            )

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
        elif c.max_requests is not None and t.requests + self.in_flight + self.waiting >= c.max_requests:
            self._stop(StopReason.REQUEST_LIMIT, f"request limit reached ({c.max_requests})")
        if self.stop is not None:
            return False
        # What is already asked for should cover the rest: do not pay for more. (The yield so
        # far, per request; before any reply it is 0, so the first wave is always sent.)
        per_request = t.accepted / t.requests if t.requests else 0.0
        return not (self.in_flight and self.in_flight * per_request >= c.num_instructions - t.accepted)

    def _stop(self, reason: StopReason, detail: str) -> None:
        self.stop, self.stop_detail = reason, detail

    def _ask(self, engine: Engine, key: Any) -> tuple[Any, Completion, int]:
        reply = self.method.ask(engine, key)
        return key, reply, engine.last_retries  # this thread's last call

    def _take(self, key: Any, reply: Completion, retries: int, out, log_file) -> Taken:
        room = self.config.num_instructions - self.tally.accepted
        taken = self.method.take(key, reply, room)
        if taken.rows:
            out.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in taken.rows))
            out.flush()  # in the OS's hands before the log says the request is done: survives a kill
        entry = {
            "request": key,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "retries": retries,
            "finish_reason": reply.finish_reason.value,
            "parsed": taken.parsed,
            "accepted": len(taken.rows),
            "dropped": {k: v for k, v in taken.dropped.items() if v},
            **taken.fields,
        }
        log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        log_file.flush()
        self.tally.add(entry)
        return taken

    def run(self, engine: Engine, progress: bool) -> GenerateResult:
        from tqdm import tqdm

        c = self.config
        start = time.perf_counter()
        barren = 0
        total = min(c.num_instructions, getattr(self.method, "most_records", c.num_instructions))
        bar = tqdm(
            total=total, initial=min(self.tally.accepted, total),
            desc=f"generate ({self.method.name})", unit="record", disable=not progress, file=sys.stderr,
        )  # fmt: skip
        out, log_file = open_append(self.output), open_append(self.log_path)
        workers = ThreadPoolExecutor(max_workers=c.concurrency, thread_name_prefix="teacher")
        arrived: queue.SimpleQueue[Future] = queue.SimpleQueue()  # finished requests, in order
        pending: set[Future] = set()
        synced_at = time.monotonic()
        finished_cleanly = False
        try:
            while True:
                # Keep the teacher busy: top up before taking the next reply, one reply at a time.
                while self.in_flight < c.concurrency and self.may_ask():
                    key = self.method.next_request()
                    if key is None:
                        break
                    future = workers.submit(self._ask, engine, key)
                    pending.add(future)
                    future.add_done_callback(arrived.put)
                    self.in_flight += 1
                if not self.in_flight:
                    break
                future = arrived.get()
                pending.discard(future)
                self.in_flight -= 1
                try:
                    asked = future.result()  # an EngineError stops the run here
                except BatchPending as e:  # written for a batch teacher: asked again by the rerun
                    self.waiting += 1
                    self.batch_engines.append(e.engine)
                    continue
                taken = self._take(*asked, out, log_file)
                if time.monotonic() - synced_at >= 1.0:  # on disk too: a power cut costs at most ~1 s
                    sync(out)
                    sync(log_file)
                    synced_at = time.monotonic()
                moved = bool(taken.rows) if taken.progress is None else taken.progress
                barren = 0 if moved else barren + 1
                bar.update(min(len(taken.rows), bar.total - bar.n))
                if progress:
                    t = self.tally
                    bar.set_postfix_str(
                        f"{t.requests} req, ${t.cost_usd(c):.4f}, {t.prompt_tokens + t.completion_tokens} tok",
                        refresh=False,
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
        result = self._finish(engine.name, time.perf_counter() - start)
        waiting = waiting_error(engine, *self.batch_engines)  # requests without results: exit status 3
        if waiting is not None:
            raise waiting
        return result

    def _finish(self, teacher: str, elapsed_s: float) -> GenerateResult:
        t, c = self.tally, self.config
        if t.accepted >= c.num_instructions:
            self._stop(StopReason.DONE, "done")
        elif self.waiting and self.stop in (None, StopReason.REQUEST_LIMIT):
            self._stop(StopReason.BATCH_WAITING, f"{self.waiting} requests wait for their batch results")
        elif self.stop is None:  # the method had nothing more to ask
            self._stop(StopReason.DONE, self.method.finished_detail())
        result = GenerateResult(
            stop=self.stop or StopReason.DONE,
            stop_detail=self.stop_detail,
            teacher=teacher,
            teacher_settings=teacher_settings(c),
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
            method=self.method.name,
            details=self.method.details(),
        )
        write_json_atomic(self.summary_path, result.to_dict())
        return result


def teacher_settings(config: GenerateConfig) -> dict[str, Any]:
    """What the summary records of how the teacher ran: the values used, whoever chose them."""
    s = config.settings
    batch = {"batch_dir": config.teacher.batch_dir, "price_factor": price_factor(config.teacher)}
    return {
        "engine": config.teacher.engine,
        **(batch if config.teacher.batch_dir else {}),
        "api": config.api,
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "repetition_penalty": s.repetition_penalty,
    }
