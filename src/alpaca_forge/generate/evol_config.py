"""Settings of `generate --method evol` (flags `--evol-*`). Owner: the evol work."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config


@dataclass(frozen=True)
class EvolConfig(Config):
    """How instructions are evolved (Evol-Instruct): rounds, operations, elimination rules."""
