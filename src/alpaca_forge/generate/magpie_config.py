"""Settings of `generate --method magpie` (flags `--magpie-*`). Owner: the magpie work."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import Config


@dataclass(frozen=True)
class MagpieConfig(Config):
    """How queries are drawn from an aligned model's chat template and answered (Magpie)."""
