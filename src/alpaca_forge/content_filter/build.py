"""The filter a stage's settings describe (`build_filter`): the settings live with the stage that
takes them as flags (serve's `FilterConfig`); the filter only reads them, through
`FilterSettings`, and checks what would fail every request (a URL that is not http(s), an API
key an HTTP header cannot carry) before the first one."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Protocol

from ..core.errors import UserError
from .filter import ContentFilter
from .rules_file import load_rules

if TYPE_CHECKING:
    from ..engines import Engine


class FilterSettings(Protocol):
    """What `build_filter` reads from a stage's config (serve's `FilterConfig` is one): the
    settings live with the stage that takes them as flags, the filter only reads them."""

    @property
    def filter(self) -> bool: ...
    @property
    def filter_rules(self) -> str | None: ...
    @property
    def moderation_url(self) -> str | None: ...
    @property
    def moderation_model(self) -> str | None: ...
    @property
    def moderation_api_key_env(self) -> str: ...
    @property
    def judge_model(self) -> str | None: ...
    @property
    def filter_timeout_s(self) -> float: ...


def build_filter(cfg: FilterSettings, judge: Engine | None = None) -> ContentFilter | None:
    """The filter `cfg` describes; None with --no-filter. `judge`: the engine the caller opened
    from --judge-model (required when it is set; it stays the caller's to close)."""
    if not cfg.filter:
        return None
    if cfg.judge_model and judge is None:
        raise ValueError("--judge-model is set: pass the engine opened from it as `judge`")
    rules = load_rules(cfg.filter_rules)
    key = None
    if cfg.moderation_url:
        if not re.match(r"https?://[^/\s:]+", cfg.moderation_url):
            raise UserError(
                f"--moderation-url {cfg.moderation_url!r} is not an http(s) URL",
                "e.g. --moderation-url https://api.openai.com/v1/moderations",
            )
        key = os.environ.get(cfg.moderation_api_key_env) or None
        if key and (not key.isascii() or any(c.isspace() for c in key)):
            raise UserError(
                f"the API key in ${cfg.moderation_api_key_env} has spaces or characters an HTTP header cannot carry",
                f"set {cfg.moderation_api_key_env} to the key alone, as the provider shows it",
            )
    return ContentFilter(
        rules,
        moderation_url=cfg.moderation_url,
        moderation_model=cfg.moderation_model,
        moderation_api_key=key,
        judge=judge,
        timeout_s=cfg.filter_timeout_s,
    )
