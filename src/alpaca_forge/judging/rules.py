"""Rule judges: a stated preference in place of a model, named `rule:NAME` wherever a judge model
is (`--judge-model rule:shorter`).

They answer the pairwise question from the two answers alone, with no model and no network: a
judge whose preference is known in advance. That is what an offline demo or a test of the whole
preference pipeline needs (does `prefer` -> `align` move the model towards what its judge wants,
measured by that same judge?), and what the embedded 135M model cannot be (it names the first
response whatever it reads). They measure a rule, not quality: a real run uses a real judge.

    shorter   the answer with fewer words wins; an empty answer always loses; equal: a tie
    longer    the answer with more words wins; an empty answer always loses; equal: a tie
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError

PREFIX = "rule:"
RULES = {
    "shorter": "the answer with fewer words wins",
    "longer": "the answer with more words wins",
}


def rule_name(model: str | None) -> str | None:
    """The rule a judge model names (`rule:shorter` -> "shorter"), else None. An unknown rule is
    an error."""
    if not model or not model.startswith(PREFIX):
        return None
    name = model[len(PREFIX) :]
    if name not in RULES:
        raise UserError(
            f"judge model {model!r}: no rule judge of that name",
            "use one of: " + ", ".join(f"{PREFIX}{k} ({v})" for k, v in RULES.items()),
        )
    return name


@dataclass(frozen=True)
class RuleJudge:
    """Replies to a judging task as the rule says, in the form the judge's replies are read in."""

    rule: str

    @property
    def name(self) -> str:
        return PREFIX + self.rule

    def reply(self, a: str, b: str) -> str:
        words_a, words_b = len(a.split()), len(b.split())
        if (words_a == 0) != (words_b == 0):  # an empty answer loses to any other
            return ("A" if words_a else "B") + "\nThe other response is empty."
        if words_a == words_b:
            return "tie\nBoth responses have as many words."
        a_wins = (words_a < words_b) == (self.rule == "shorter")
        return ("A" if a_wins else "B") + f"\nIt is the {self.rule} response ({words_a} against {words_b} words)."

    def close(self) -> None:
        pass


def judge_model_problem(model: str | None) -> tuple[str, str] | None:
    """(problem, fix) where `model` names a rule judge that does not exist: for a config's
    check(), so the mistake shows before anything runs."""
    try:
        rule_name(model)
    except UserError as e:
        return e.message, e.fix or ""
    return None
