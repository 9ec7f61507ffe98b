"""Layer 2 of the filter: an external moderation service of the OpenAI `/v1/moderations` shape
(`--moderation-url`). It fails closed: when the service is down, slow, answers non-200 or
garbage, the text is flagged "moderation_unavailable" and a warning is logged."""

from __future__ import annotations

import logging
from typing import Any

from .verdict import MODERATION_FLAGGED, MODERATION_UNAVAILABLE, Verdict, unavailable

log = logging.getLogger("alpaca_forge")


class ModerationClient:
    """Asks the service at `url` about one text at a time. Thread-safe: the HTTP client is.
    `close()` closes the HTTP client."""

    def __init__(
        self, url: str, *, model: str | None = None, api_key: str | None = None, timeout_s: float = 30.0
    ):
        import httpx

        self.url = url
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout_s, headers=headers)

    def check(self, text: str) -> Verdict:
        body: dict[str, Any] = {"input": text}
        if self.model:
            body["model"] = self.model
        try:
            r = self._http.post(self.url, json=body)
            if r.status_code != 200:
                raise ValueError(f"HTTP {r.status_code}: {r.text[:200]!r}")
            return parse_moderation(r.json())
        except Exception as e:  # any failure at all: fail closed
            log.warning(
                "content filter: the moderation service %s failed (%s: %s); blocking the text (fail closed)",
                self.url,
                type(e).__name__,
                e,
            )
            return unavailable("moderation_url", MODERATION_UNAVAILABLE)

    def close(self) -> None:
        self._http.close()


def parse_moderation(body: Any) -> Verdict:
    """The verdict in a `/v1/moderations` answer on one input; ValueError when it is not one.
    The service's category names are kept as they are ("violence", "self-harm/instructions")."""
    results = body.get("results") if isinstance(body, dict) else None
    first = results[0] if isinstance(results, list) and results else None
    if not isinstance(first, dict) or not isinstance(first.get("flagged"), bool):
        raise ValueError("no results[0].flagged in the answer")
    flags = first.get("categories") or {}
    raw_scores = first.get("category_scores") or {}
    if not isinstance(flags, dict) or not isinstance(raw_scores, dict):
        raise ValueError("categories / category_scores are not objects")
    try:
        scores = {str(k): float(v) for k, v in raw_scores.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"a category score is not a number ({e})") from e
    if not first["flagged"]:
        return Verdict(False, scores=scores)
    named = tuple(str(k) for k, v in flags.items() if v is True) or (MODERATION_FLAGGED,)
    return Verdict(True, named, "moderation_url", scores)
