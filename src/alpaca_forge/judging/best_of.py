"""Best of N: for each item, which of its N candidate answers to keep.

Two choosers, one interface (`Chooser.choose(items, candidates) -> [Choice]`):

- `RewardChooser`: a reward model scores every candidate; the highest score wins.
- `JudgeChooser`: the pairwise LLM judge plays a round-robin among the N candidates, every pair
  judged in both orders (N(N-1) judgements an item, cached: a rerun asks nothing twice); each
  verdict is a win for the candidate it favours, and the candidate with the most wins is kept.
  A round-robin, not a knock-out: every candidate meets every other, so one verdict the judge
  gets wrong (or its position bias) cannot knock the best answer out in an early round.

Ties go to the lowest index (the first sample), so a choice is reproducible. Identical texts
are a tie without asking the judge; a verdict the judge wrote in no readable form is no win.
`infer --best-of` and `prefer --expert-iteration` both choose with these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..core.prompts import Message
from ..engines import Completion, Engine, EngineConfig, GenerationSettings
from .items import Item
from .judge import PROMPT_VERSION, JudgementCache, Task, judge_all, judgement_key
from .reward import Prompted, RewardModel
from .rules import RuleJudge


@dataclass(frozen=True)
class Choice:
    """The kept candidate of one item."""

    index: int  # into the item's candidates
    scores: list[float] | None  # a reward model's score of each candidate (None: chosen by a judge)
    detail: dict[str, Any] = field(default_factory=dict)  # judge: {"wins": [...], "unread": n}

    @property
    def tied(self) -> bool:
        """Several candidates shared the best score or the most wins (the first of them was kept):
        a judge that always names one position gives every candidate as many wins."""
        values = self.scores if self.scores is not None else self.detail.get("wins") or []
        return sum(v == values[self.index] for v in values) > 1


class Chooser(Protocol):
    name: str  # who chooses, as written into outputs (a reward-model folder, a judge's identity)

    def choose(self, items: Sequence[Prompted], candidates: Sequence[Sequence[str]]) -> list[Choice]: ...

    def close(self) -> None: ...


def best_index(values: Sequence[float]) -> int:
    """The index of the largest value; the lowest such index on a tie."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


class RewardChooser:
    """The candidate the reward model scores highest."""

    def __init__(self, reward_model: RewardModel):
        self.reward_model = reward_model
        self.name = reward_model.name

    def choose(self, items: Sequence[Prompted], candidates: Sequence[Sequence[str]]) -> list[Choice]:
        flat_items = [item for item, answers in zip(items, candidates, strict=True) for _ in answers]
        flat_answers = [answer for answers in candidates for answer in answers]
        flat = self.reward_model.score(flat_items, flat_answers)
        choices, start = [], 0
        for answers in candidates:
            scores = flat[start : start + len(answers)]
            start += len(answers)
            choices.append(Choice(best_index(scores), scores))
        return choices

    @classmethod
    def beside(cls, folder: str, policy: EngineConfig, batch_size: int) -> RewardChooser:
        """The reward model in `folder`, on the policy's device and dtype where the policy runs
        in this process (else torch's choice)."""
        local = policy.engine == "transformers"
        return cls(
            RewardModel.open(
                folder,
                device=policy.device if local else "auto",
                dtype=policy.dtype if local else "auto",
                batch_size=batch_size,
            )
        )

    def close(self) -> None:
        self.reward_model.close()


class _Kept:
    """The judge engine lent to `judge_all`, which closes what it opens: the chooser keeps one
    model loaded for all its batches and closes it itself."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.upstream = engine.upstream  # a server judge is kept busy (see judge_all)

    def chat(self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings) -> list[Completion]:
        return self.engine.chat(conversations, settings)

    def close(self) -> None:
        pass


class JudgeChooser:
    """The candidate with the most wins in a round-robin by the pairwise judge, both orders."""

    def __init__(
        self,
        open_judge: Callable[[], Engine | RuleJudge],
        judge: str,
        settings: GenerationSettings,
        cache: JudgementCache,
        *,
        batch_size: int = 8,
        max_answer_chars: int | None = None,
        prompt: str = PROMPT_VERSION,
        progress: bool = True,
    ):
        """`judge` is the judge's identity (`judge_identity`), as the cache keys verdicts;
        `open_judge()` is called once, when a first verdict is not in the cache; `prompt` names
        the judging prompt (a key of `judge.JUDGE_PROMPTS`)."""
        self.name = judge
        self._open_judge = open_judge
        self._engine: Engine | RuleJudge | None = None
        self.settings = settings
        self.cache = cache
        self.batch_size = batch_size
        self.max_answer_chars = max_answer_chars
        self.prompt = prompt
        self.progress = progress
        self.asked = 0  # judgements asked of the judge (not read from the cache)
        self._keys: set[str] = set()  # of every judgement the choices read

    def cost(self) -> tuple[int, int]:
        """(prompt tokens, completion tokens) the judgements behind every choice so far cost,
        cached ones too, each once: what judging these answers costs from scratch."""
        return self.cache.cost(self._keys)

    def _lend(self) -> Any:
        if self._engine is None:
            self._engine = self._open_judge()
        # A rule judge holds no model and `judge_all` reads it as it is; an engine is lent unclosable.
        return self._engine if isinstance(self._engine, RuleJudge) else _Kept(self._engine)

    def choose(self, items: Sequence[Prompted], candidates: Sequence[Sequence[str]]) -> list[Choice]:
        tasks: list[Task] = []
        where: list[tuple[int, int, int]] = []  # (item, first candidate, second candidate) of each task
        for n, (item, answers) in enumerate(zip(items, candidates, strict=True)):
            judged = Item(item.id or f"item-{n + 1}", item.instruction, item.input)
            for i in range(len(answers)):
                for j in range(len(answers)):
                    if i != j and answers[i].strip() != answers[j].strip():
                        tasks.append(Task(judged, str(i), str(j), answers[i], answers[j], self.prompt))
                        where.append((n, i, j))
        judgements, asked = judge_all(
            tasks,
            self._lend,
            self.name,
            self.settings,
            self.cache,
            batch_size=self.batch_size,
            max_answer_chars=self.max_answer_chars,
            progress=self.progress,
        )
        self.asked += asked
        self._keys.update(
            judgement_key(self.name, self.settings, self.max_answer_chars, t.item, t.a, t.b, t.prompt) for t in tasks
        )
        wins = [[0] * len(answers) for answers in candidates]
        unread = [0] * len(candidates)
        for (n, i, j), judgement in zip(where, judgements, strict=True):
            if judgement.verdict == "A":
                wins[n][i] += 1
            elif judgement.verdict == "B":
                wins[n][j] += 1
            elif judgement.verdict is None:
                unread[n] += 1
        return [
            Choice(best_index(w), None, {"wins": w, "unread": u}) for w, u in zip(wins, unread, strict=True)
        ]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
