"""`generate --method evol`: Evol-Instruct over any instruction file, driven by the shared loop.

Each seed instruction starts a chain. In round r (1 to --evol-rounds) the chain's current
instruction is rewritten by one operation chosen by (--seed, the seed, r) (request
"evolve/r/i"); a rewrite that survives the elimination rules and the ROUGE-L check against the
pool is answered by the teacher (request "answer/r/i"), and an answer that survives makes a
record, which the next round evolves. An eliminated evolution leaves the chain's instruction as
it was for the next round (as Evol-Instruct puts a failed one back in the pool). Chains run side
by side: a chain is never waiting on another, so --concurrency requests stay in flight.

Which request goes next is a fixed order, not the order replies came in: answers first, then
evolutions by (round, seed). So a run resumed after a kill asks exactly what an uninterrupted one
would have, and at --concurrency 1 writes the same bytes. The state is rebuilt from the request
log (each evolution's rewrite, or why it was eliminated) and the output (the kept records, by
their lineage), so a record written just before a kill is never written twice.

The ROUGE-L pool holds the seeds and every rewrite that passed, in the order they passed. An
in-depth rewrite is not compared with its own ancestors (it extends them on purpose: the "no
information gain" rule judges it against its parent); a breadth rewrite is compared with all.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections import Counter
from typing import Any

import numpy as np

from ..core.errors import UserError
from ..core.files import check_output, user_paths
from ..core.prompts import Message
from ..core.records import Record, read_records
from ..engines import Completion, Engine, GenerationSettings, using_engine
from .config import GenerateConfig
from .evol_steps import (
    ANSWER_STOP,
    EVOLVE_STOP,
    IN_DEPTH,
    answer_prompt,
    answer_reason,
    choose_operation,
    evolve_prompt,
    evolved_reason,
    parent_text,
    read_evolved,
)
from .loop import GenerateResult, Loop, Taken, load_appended, side_paths
from .steps import Pool, blacklist_pattern
from .teacher_prompt import request_seed

log = logging.getLogger("alpaca_forge")

EVOLVE, ANSWER = "evolve", "answer"


def run_evol(
    config: GenerateConfig, *, progress: bool = True, engine: Engine | None = None
) -> GenerateResult:
    """Evolve `config.seeds` until `config.num_instructions` records are kept, every chain has had
    its --evol-rounds, or a limit is reached. The teacher is asked on the chat API unless
    --teacher-api says otherwise (one instruction at a time is what chat models follow best)."""
    config = config.resolved
    if config.teacher_api is None:
        config = dataclasses.replace(config, teacher_api="chat")
    assert config.seeds is not None  # checked by the config
    with user_paths():
        output = check_output(config.output, inputs=[config.seeds])
        log_path, summary_path = side_paths(output)
        for path in (log_path, summary_path):
            check_output(path, inputs=[config.seeds])
        seeds = read_records(config.seeds, require_output=False)
        accepted, logged = load_appended(output, log_path)
        method = Evol(config, seeds, accepted, logged)
        loop = Loop(config, method, output, log_path, summary_path, accepted, logged)
    if loop.resumed_with or logged:
        log.info(
            "resuming: %d records already in %s, %d requests done", loop.resumed_with, output, len(logged)
        )
    with using_engine(config.teacher, engine, seed=config.seed) as teacher, user_paths():
        return loop.run(teacher, progress)


@dataclasses.dataclass
class _Chain:
    """One seed's line of evolutions."""

    index: int  # the seed's place in the file
    root: str  # the seed's id
    head_id: str  # the instruction the next round evolves
    head_text: str
    ancestors: list[int]  # pool indices of the seed and every kept evolution of this chain
    round: int = 1  # the round being tried
    candidate: str | None = None  # a rewrite that passed, waiting for its answer
    candidate_at: int = -1  # its place in the pool
    operation: str = ""


def root_ids(seeds: list[Record]) -> list[str]:
    """The seeds' own ids when every seed has a distinct one, else seed-0, seed-1, ..."""
    ids = [s.id for s in seeds]
    if all(ids) and len(set(ids)) == len(ids):
        return [str(i) for i in ids]
    return [f"seed-{k}" for k in range(len(seeds))]


def request_key(stage: str, round_: int, index: int) -> str:
    return f"{stage}/{round_}/{index}"


def parse_key(key: str) -> tuple[str, int, int]:
    stage, round_, index = key.split("/")
    return stage, int(round_), int(index)


class Evol:
    """Evol-Instruct as a `loop.Method` (see the module's docstring)."""

    name = "evol"

    def __init__(
        self,
        config: GenerateConfig,
        seeds: list[Record],
        accepted: list[dict[str, Any]],
        logged: list[dict[str, Any]],
    ):
        self.config, self.evol = config, config.evol
        self.blacklist = blacklist_pattern(config.filters.blacklist)
        texts = [parent_text(s) for s in seeds]
        self.pool = Pool(texts)
        self.chains = [
            _Chain(k, root, root, text, [k])
            for k, (root, text) in enumerate(zip(root_ids(seeds), texts, strict=True))
        ]
        self.kept_by_round: Counter = Counter()
        self.kept_by_operation: Counter = Counter()
        self.requests: Counter = Counter()  # by stage
        self.passed = 0  # rewrites that reached the answer stage
        self.most_records = len(seeds) * self.evol.rounds  # one a round per chain at most
        self._rebuild(accepted, logged)
        self.ready: list[tuple[int, int, int]] = []  # (0 answer | 1 evolve, round, chain): a heap
        for chain in self.chains:
            self._queue(chain)

    # -- resume ---------------------------------------------------------------------------------

    def _rebuild(self, accepted: list[dict[str, Any]], logged: list[dict[str, Any]]) -> None:
        """Replay the log and the output: each chain's round, head and waiting rewrite, and the
        pool in the order rewrites passed."""
        by_index = {c.root: c for c in self.chains}
        kept: dict[tuple[int, int], dict[str, Any]] = {}
        for row in accepted:
            lineage = row.get("evol")
            chain = by_index.get(lineage.get("root")) if isinstance(lineage, dict) else None
            if chain is None:
                raise UserError(
                    f"{self.config.output}: holds a record that is not an evolution of these seeds "
                    f"({row.get('instruction', '')[:60]!r})",
                    "give the --seeds it was made from, or another --output to start over",
                )
            kept[(chain.index, int(lineage["round"]))] = row
            self.kept_by_round[str(lineage["round"])] += 1
            self.kept_by_operation[lineage["operation"]] += 1
        evolved: dict[tuple[int, int], tuple[str | None, str, int]] = {}  # -> (rewrite, op, pool index)
        answered: set[tuple[int, int]] = set()
        for row in logged:
            stage, round_, index = parse_key(str(row["request"]))
            if index >= len(self.chains):
                raise UserError(
                    f"{self.config.output}: its request log names seed {index}, beyond these "
                    f"{len(self.chains)} seeds",
                    "give the --seeds it was made from, or another --output to start over",
                )
            self.requests[stage] += 1
            if stage == EVOLVE:
                text = row.get("evolved")
                evolved[(index, round_)] = (text, row.get("operation", ""), len(self.pool.texts))
                if text is not None:
                    self.pool.add(text)
                    self.passed += 1
            else:
                answered.add((index, round_))
        for chain in self.chains:
            while chain.round <= self.evol.rounds:
                at = (chain.index, chain.round)
                if at not in evolved:
                    break
                text, operation, pool_index = evolved[at]
                if text is not None and at in kept:
                    row = kept[at]
                    chain.head_id, chain.head_text = row.get("id") or chain.head_id, row["instruction"]
                    chain.ancestors.append(pool_index)
                elif text is not None and at not in answered:
                    chain.candidate, chain.candidate_at, chain.operation = text, pool_index, operation
                    break
                chain.round += 1

    # -- the order of requests --------------------------------------------------------------------

    def _queue(self, chain: _Chain) -> None:
        if chain.round <= self.evol.rounds:
            heapq.heappush(self.ready, (0 if chain.candidate is not None else 1, chain.round, chain.index))

    def next_request(self) -> str | None:
        if not self.ready:
            return None
        stage, round_, index = heapq.heappop(self.ready)
        return request_key(ANSWER if stage == 0 else EVOLVE, round_, index)

    # -- one request (in a worker thread: reads the chain, changes nothing) -------------------------

    def _settings(self, stage: str, round_: int, index: int) -> GenerationSettings:
        number = (index * (self.evol.rounds + 1) + round_) * 2 + (stage == ANSWER)
        s = self.config.sampling(request_seed(self.config.seed, number))
        if stage == EVOLVE:
            limit = min(s.max_new_tokens, self.evol.max_instruction_tokens)
            return dataclasses.replace(s, stop=EVOLVE_STOP, max_new_tokens=limit)
        return dataclasses.replace(s, stop=ANSWER_STOP if self.config.api == "completions" else ())

    def prompt(self, key: str) -> str:
        """Request `key`'s text: the rewriting prompt, or the instruction to answer."""
        stage, round_, index = parse_key(key)
        chain = self.chains[index]
        if stage == EVOLVE:
            operation = choose_operation(self.config.seed, chain.root, round_, self.evol.operations)
            return evolve_prompt(operation, chain.head_text)
        assert chain.candidate is not None
        return answer_prompt(chain.candidate) if self.config.api == "completions" else chain.candidate

    def ask(self, engine: Engine, key: str) -> Completion:
        stage, round_, index = parse_key(key)
        prompt, settings = self.prompt(key), self._settings(stage, round_, index)
        if self.config.api == "completions":
            return engine.complete([prompt], settings)[0]
        return engine.chat([[Message("user", prompt)]], settings)[0]

    # -- one reply (in the main thread) ---------------------------------------------------------

    def take(self, key: str, reply: Completion, room: int) -> Taken:
        stage, _, index = parse_key(key)
        chain = self.chains[index]
        self.requests[stage] += 1
        taken = (
            self._take_evolution(chain, reply) if stage == EVOLVE else self._take_answer(chain, reply, room)
        )
        self._queue(chain)
        return taken

    def _take_evolution(self, chain: _Chain, reply: Completion) -> Taken:
        operation = choose_operation(self.config.seed, chain.root, chain.round, self.evol.operations)
        child = read_evolved(reply.text)
        reason = evolved_reason(
            child,
            chain.head_text,
            min_new_words=self.evol.min_new_words,
            filters=self.config.filters,
            blacklist=self.blacklist,
            min_kept=self.evol.min_kept if operation in IN_DEPTH else 0.0,
        )
        if reason is None and reply.finish_reason.value == "length":
            reason = "truncated"
        if reason is None:
            scores = self.pool.scores(child)
            if operation in IN_DEPTH:
                scores[chain.ancestors] = 0.0  # it extends them on purpose
            if len(scores) and float(np.max(scores)) > self.config.filters.rouge_threshold:
                reason = "rouge_similar"
        fields = {"operation": operation, "evolved": None if reason else child}
        if reason:
            fields["rejected"] = child  # for people reading the log: what the teacher wrote
        if reason:
            chain.round += 1  # the chain's instruction stays as it was for the next round
            return Taken(parsed=1 if child else 0, dropped={reason: 1}, fields=fields, progress=False)
        chain.candidate, chain.candidate_at, chain.operation = child, len(self.pool.texts), operation
        self.pool.add(child)
        self.passed += 1
        return Taken(parsed=1, fields=fields, progress=True)

    def _take_answer(self, chain: _Chain, reply: Completion, room: int) -> Taken:
        assert chain.candidate is not None
        reason = answer_reason(reply.text, reply.finish_reason.value, min_words=self.evol.min_answer_words)
        if reason is None and room <= 0:
            reason = "over_target"
        rows = []
        if reason is None:
            child_id = f"{chain.root}.e{chain.round}"
            lineage = {
                "parent": chain.head_id,
                "round": chain.round,
                "operation": chain.operation,
                "root": chain.root,
            }
            rows.append({**Record(chain.candidate, "", reply.text, id=child_id).to_dict(), "evol": lineage})
            chain.head_id, chain.head_text = child_id, chain.candidate
            chain.ancestors.append(chain.candidate_at)
            self.kept_by_round[str(chain.round)] += 1
            self.kept_by_operation[chain.operation] += 1
        chain.candidate, chain.operation = None, ""
        chain.round += 1
        return Taken(rows=rows, dropped={reason: 1} if reason else {})

    # -- the summary ----------------------------------------------------------------------------

    def details(self) -> dict[str, Any]:
        kept = sum(self.kept_by_round.values())
        total = sum(self.requests.values())
        return {
            "rounds": self.evol.rounds,
            "seeds": len(self.chains),
            "evolve_requests": self.requests[EVOLVE],
            "answer_requests": self.requests[ANSWER],
            "rewrites_passed": self.passed,
            "kept_by_round": dict(sorted(self.kept_by_round.items(), key=lambda kv: int(kv[0]))),
            "kept_by_operation": dict(sorted(self.kept_by_operation.items())),
            "kept_per_request": round(kept / total, 3) if total else 0.0,
        }

    def finished_detail(self) -> str:
        return f"every seed evolved for {self.evol.rounds} round{'s' * (self.evol.rounds != 1)}"
