"""`generate --method magpie`: an aligned model writes the queries itself, from its chat template.

Data flow, per request (one conversation; `ask` in a worker thread): the template rendered up to
where a user's words go (`magpie_steps.pre_query`) -> the teacher continues it as raw text
(`engine.complete`), stopped at the template's end-of-turn marker: the query -> its filters -> the
answer, through `chat` (the teacher, or `--magpie-answer-*`'s engine) -> its filters -> for
`--magpie-turns N`, the next query is drawn the same way after the conversation so far. Then (main
thread, `take`): ROUGE-L of the opening query against every accepted one -> the row.

The requests, files, limits, resume and bar are the shared loop's (`loop.py`). A request is a whole
conversation: its log line counts the tokens of all its calls (`calls`, `retries` summed). A
record written just before a kill marks its request done on the next start (its `magpie.request`),
so it is never redone or written twice; with --concurrency 1 (or replies that arrive in order) a
resumed run writes byte for byte what an uninterrupted one would have.

Refused before any request: a model with no chat template (a single-turn format), a server with
no `--magpie-template`, an answerer that cannot take several turns for `--magpie-turns` above 1.
A server with no raw completions (its /v1/completions answers 404) is refused at its first reply.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..core.errors import UserError
from ..core.files import check_output, user_paths
from ..core.prompts import Message
from ..core.records import Record
from ..engines import Completion, Engine, EngineConfig, EngineError, FinishReason, GenerationSettings
from ..engines.config import repetition_penalty_for, using_engine
from .config import GenerateConfig
from .loop import GenerateResult, Loop, Taken, load_appended, side_paths
from .magpie_steps import (
    answer_problem,
    conversation_of,
    cut_query,
    first_query,
    magpie_row,
    pre_query,
    query_problem,
)
from .magpie_template import Render, template_renderer
from .steps import Pool, accept_into, blacklist_pattern
from .teacher_prompt import request_seed

NO_COMPLETIONS = (404, 405, 501)  # what servers without /v1/completions answer


@dataclass(frozen=True)
class Conversation(Completion):
    """One request's outcome: every call's tokens summed, the turns kept, why it stopped."""

    turns: tuple[tuple[str, str], ...] = ()
    problem: str | None = None  # the first filter that dropped it; None: every turn passed
    calls: int = 0
    queries: int = 0  # queries the teacher wrote
    retries: int = 0
    dropped_text: str = ""  # the query or answer a filter dropped (logged, to tune the filters by)


def run_magpie(
    config: GenerateConfig, *, progress: bool = True, engine: Engine | None = None
) -> GenerateResult:
    """Generate until `config.num_instructions` conversations are in `config.output` (or a limit)."""
    if config.teacher_api is not None:
        raise UserError(
            "--teacher-api does not apply to --method magpie: queries are raw completions, answers chat",
            "drop --teacher-api",
        )
    with user_paths():
        output = check_output(config.output)
        log_path, summary_path = side_paths(output)
        for path in (log_path, summary_path):
            check_output(path)
        accepted, logged = load_appended(output, log_path, required=())
        for k, row in enumerate(accepted, start=1):
            if not isinstance(row.get("magpie"), dict):
                raise UserError(
                    f"{output}: row {k} has no \"magpie\" key: not a file `generate --method magpie` wrote",
                    "choose another --output, or move this file away to start over",
                )
    with (
        using_engine(config.teacher, engine, seed=config.seed) as teacher,
        _answerer(config, teacher) as answerer,
        user_paths(),
    ):
        m = config.magpie
        render = template_renderer(teacher, m.template, config.teacher.system, m.query_max_new_tokens)
        if m.turns > 1 and not answerer.multi_turn:
            raise UserError(
                f"--magpie-turns {m.turns} needs an answerer that reads several turns, and {answerer.name} "
                f"prompts with the single-turn {answerer.format_name!r} format",
                "answer with a chat model (--magpie-answer-engine / --magpie-answer-model), or --magpie-turns 1",
            )
        # Renders the first pre-query: a template with no user turn to continue is refused here.
        method = Magpie(config, render, teacher.name, answerer, accepted, logged)
        return Loop(config, method, output, log_path, summary_path, accepted, logged).run(teacher, progress)


@contextlib.contextmanager
def _answerer(config: GenerateConfig, teacher: Engine) -> Iterator[Engine]:
    """The teacher itself, or the engine `--magpie-answer-*` names (opened and closed here)."""
    answer = config.magpie.answer
    if answer.engine is None:
        yield teacher
        return
    fields = {f.name: getattr(answer, f.name) for f in dataclasses.fields(EngineConfig)}
    with using_engine(EngineConfig(**fields), seed=config.seed) as opened:
        yield opened


class Magpie:
    """The magpie method of the shared loop (see `loop.Method`)."""

    name = "magpie"

    def __init__(
        self,
        config: GenerateConfig,
        render: Render,
        teacher: str,
        answerer: Engine,
        accepted: list[dict[str, Any]],
        logged: list[dict[str, Any]],
    ):
        self.config, self.render, self.teacher, self.answerer = config, render, teacher, answerer
        self.blacklist = blacklist_pattern(config.filters.blacklist)
        self.pool = Pool([first_query(row) for row in accepted])
        # Done: every logged request, and one whose record was written but not its log line.
        self.done = {row["request"] for row in logged} | {row["magpie"].get("request") for row in accepted}
        self.next_key = 0
        self.calls = sum(row.get("calls", 0) for row in logged)
        answer_cfg = config.magpie.answer if config.magpie.answer.engine else config.teacher
        self.answer_penalty = repetition_penalty_for(answer_cfg, config.repetition_penalty)
        self.opening = pre_query(render)  # every first turn's: rendered once
        asked = config.magpie.query_temperature
        self.query_temperature = asked if asked is not None else (1.0 if config.on_server else 0.7)

    # -- the loop's side --------------------------------------------------------------------

    def next_request(self) -> int:
        while self.next_key in self.done:
            self.next_key += 1
        key, self.next_key = self.next_key, self.next_key + 1
        return key

    def ask(self, engine: Engine, key: int) -> Conversation:
        """One conversation: for each turn, a query written from the template, then its answer."""
        m = self.config.magpie
        turns: list[tuple[str, str]] = []
        calls = queries = retries = prompt_tokens = completion_tokens = 0
        problem, dropped_text = None, ""
        for turn in range(m.turns):
            place = pre_query(self.render, conversation_of(turns)) if turns else self.opening
            reply = self._complete(engine, place.text, self._query_settings(key, turn, place.stops))
            calls, queries, retries = calls + 1, queries + 1, retries + engine.last_retries
            prompt_tokens, completion_tokens = prompt_tokens + reply.prompt_tokens, completion_tokens + reply.completion_tokens
            query = cut_query(reply.text, place.stops)
            problem = query_problem(
                query, reply.finish_reason == FinishReason.LENGTH, self.config.filters, self.blacklist
            )
            if problem:
                dropped_text = reply.text
                break
            asked = [*conversation_of(turns), Message("user", query)]
            answer = self.answerer.chat([asked], self._answer_settings(key, turn))[0]
            calls, retries = calls + 1, retries + self.answerer.last_retries
            prompt_tokens, completion_tokens = prompt_tokens + answer.prompt_tokens, completion_tokens + answer.completion_tokens
            problem = answer_problem(
                answer.text, answer.finish_reason == FinishReason.LENGTH, m.min_answer_words
            )
            if problem:
                dropped_text = answer.text
                break
            turns.append((query, answer.text))
        cut = problem in ("query_cut", "answer_cut")
        return Conversation(
            "", FinishReason.LENGTH if cut else FinishReason.STOP, prompt_tokens, completion_tokens,
            tuple(turns), problem, calls, queries, retries, dropped_text[:500],
        )  # fmt: skip

    def take(self, key: int, reply: Conversation, room: int) -> Taken:  # type: ignore[override]
        fields = {"calls": reply.calls, "retries": reply.retries}
        self.calls += reply.calls
        if reply.problem:
            fields["dropped_text"] = reply.dropped_text
            return Taken(parsed=reply.queries, dropped={reply.problem: 1}, fields=fields)
        opening = Record(reply.turns[0][0])
        kept, similar, _over = accept_into(self.pool, [opening], self.config.filters.rouge_threshold, room)
        if not kept:
            reason = "query_similar" if similar else "over_target"
            return Taken(parsed=reply.queries, dropped={reason: 1}, fields=fields)
        meta = {"request": key, "teacher": self.teacher, "answerer": self.answerer.name}
        return Taken(rows=[magpie_row(reply.turns, meta)], parsed=reply.queries, fields=fields)

    def details(self) -> dict[str, Any]:
        m = self.config.magpie
        return {
            "turns": m.turns,
            "engine_calls": self.calls,
            "answerer": self.answerer.name,
            "query_max_new_tokens": m.query_max_new_tokens,
            "query_temperature": self.query_temperature,
            "pre_query": self.opening.text,  # what the teacher continued for a first query
        }

    def finished_detail(self) -> str:
        return "done"

    # -- one request's calls ----------------------------------------------------------------

    def _query_settings(self, key: int, turn: int, stops: tuple[str, ...]) -> GenerationSettings:
        m = self.config.magpie
        return GenerationSettings(
            max_new_tokens=m.query_max_new_tokens,
            temperature=self.query_temperature,
            top_p=m.query_top_p,
            repetition_penalty=self.config.settings.repetition_penalty,
            seed=_call_seed(self.config.seed, key, 2 * turn),
            stop=stops,
        )

    def _answer_settings(self, key: int, turn: int) -> GenerationSettings:
        return dataclasses.replace(
            self.config.settings,
            repetition_penalty=self.answer_penalty,
            seed=_call_seed(self.config.seed, key, 2 * turn + 1),
            stop=(),  # the teacher prompt's numbering stops are self-instruct's
        )

    def _complete(self, engine: Engine, prompt: str, settings: GenerationSettings) -> Completion:
        try:
            return engine.complete([prompt], settings)[0]
        except EngineError as e:
            if engine.upstream and e.status in NO_COMPLETIONS:
                raise UserError(
                    f"the server cannot continue raw text, which --method magpie needs for its queries "
                    f"(its /v1/completions answered HTTP {e.status}: {e.message})",
                    "use a server with /v1/completions (vLLM, llama.cpp's server, TGI), or write the "
                    "queries with a model in this process (--engine llamacpp or transformers) and answer "
                    "them with this server (--magpie-answer-engine openai --magpie-answer-base-url ...)",
                ) from e
            raise


def _call_seed(run_seed: int, key: int, call: int) -> int:
    """A call's sampling seed: a resumed run samples what an uninterrupted one would have."""
    return (request_seed(run_seed, key) * 32 + call) % 2**31
