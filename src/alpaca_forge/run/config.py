"""Settings of `alpaca-forge run`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core.config import REQUIRED, Config, setting
from .recipe import STAGES


@dataclass(frozen=True)
class RunConfig(Config):
    recipe: str = setting(
        REQUIRED, "the recipe file (YAML): see recipes/demo.yaml", positional=True, metavar="RECIPE"
    )
    dry_run: bool = setting(False, "check everything and print the plan and the cost forecast; run nothing")
    from_stage: Literal[STAGES] | None = setting(  # type: ignore[valid-type]
        None,
        f"rerun this stage and every later one, whatever the run directory holds ({', '.join(STAGES)})",
        flag="--from",
        metavar="STAGE",
    )
    overrides: tuple[str, ...] = setting(
        (),
        "write VALUE over KEY of the recipe for this run, without editing the file (repeatable), e.g. "
        "--set stages.train.epochs=1; KEY is dotted as in the file, VALUE is YAML; a stage whose settings "
        "change reruns",
        repeat=True,
        flag="--set",
        metavar="KEY=VALUE",
    )
