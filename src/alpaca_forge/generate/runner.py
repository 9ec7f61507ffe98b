"""`alpaca-forge generate`: new Alpaca records from seed tasks and a teacher, the self-instruct way.

Data flow: the seeds file -> (resuming: the output and the request log rebuild the pool and the
accounting) -> requests kept in flight, each: 3 demonstrations -> prompt -> the teacher (an
`Engine`) -> parse -> filters -> ROUGE-L against the pool -> the reply's accepted records appended
and flushed, the request logged -> a summary. The pure steps are in `teacher_prompt.py` and
`steps.py`; the files, threads and limits are the shared request loop's (`loop.py`), which
evol and magpie drive too; this module is self-instruct's side of it.

Crash-safe: a kill at any moment loses at most the requests in flight; running the same command
again carries on to the target, losing and duplicating nothing (a record written just before a
kill is in the pool on the next start, so a redone request cannot add it twice).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import Any

from ..core.files import check_output, user_paths
from ..core.prompts import Message
from ..core.records import Record, read_records
from ..engines import Completion, Engine, using_engine
from .config import GenerateConfig
from .loop import GenerateResult, Loop, StopReason, Taken, Tally, load_appended, side_paths
from .steps import Pool, accept_into, blacklist_pattern, filter_reason, parse_tasks
from .teacher_prompt import DEMOS_PER_PROMPT, build_prompt, request_seed, sample_demos

__all__ = ["GenerateResult", "StopReason", "Tally", "run", "side_paths"]

log = logging.getLogger("alpaca_forge")


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
        accepted, logged = load_appended(output, log_path)
        method = SelfInstruct(config, seeds, accepted, logged)
        loop = Loop(config, method, output, log_path, summary_path, accepted, logged)
    if loop.resumed_with:
        log.info(
            "resuming: %d records already in %s, %d requests done",
            loop.resumed_with,
            output,
            loop.tally.requests,
        )
    with using_engine(config.teacher, engine, seed=config.seed) as teacher, user_paths():
        return loop.run(teacher, progress)


class SelfInstruct:
    """Self-instruct as a `loop.Method`: request k shows 3 seed tasks chosen by (--seed, k) and
    asks for more; a reply's tasks are parsed, filtered and checked against the pool."""

    name = "self-instruct"

    def __init__(
        self,
        config: GenerateConfig,
        seeds: list[Record],
        accepted: list[dict[str, Any]],
        logged: list[dict[str, Any]],
    ):
        self.config, self.seeds = config, seeds
        self.blacklist = blacklist_pattern(config.filters.blacklist)
        self.pool = Pool([s.instruction for s in seeds] + [r["instruction"] for r in accepted])
        done = {row["request"] for row in logged}
        self.requests = (k for k in itertools.count() if k not in done)

    def next_request(self) -> int:
        return next(self.requests)

    # -- one request (in a worker thread) ---------------------------------------------------

    def ask(self, engine: Engine, request: int) -> Completion:
        prompt = build_prompt(sample_demos(self.seeds, request, self.config.seed))
        settings = self.config.sampling(request_seed(self.config.seed, request))
        if self.config.api == "completions":  # continued as plain text
            return engine.complete([prompt], settings)[0]
        return engine.chat([[Message("user", prompt)]], settings)[0]

    # -- one reply (in the main thread, one at a time) --------------------------------------

    def take(self, request: int, reply: Completion, room: int) -> Taken:
        """Filter the reply's tasks; the accepted ones (at most `room`) become rows."""
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
        accepted, similar, over = accept_into(
            self.pool, candidates, filters.rouge_threshold, room, self.config.similarity_details
        )
        dropped.update(rouge_similar=similar, over_target=over)
        rows = [{**record.to_dict(), **neighbours, "request": request} for record, neighbours in accepted]
        return Taken(rows=rows, parsed=len(parsed.records), dropped=dropped)

    def details(self) -> dict[str, Any]:
        return {}

    def finished_detail(self) -> str:
        return "done"  # never reached: the requests do not run out
