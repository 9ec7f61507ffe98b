"""Who may ask, how often, and how many at once: API keys, the loopback-only rule of a server
without keys (Host and Origin), a per-key rate limit and the bounded queue in front of the engine.
All of them answer before any work is done for a request."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import UserError
from ..core.net import hostname_of
from .config import LOOPBACK_HOSTS
from .protocol import ApiError

OPEN = "anonymous"  # the client id of every request when the server has no keys


class Keys:
    """API keys, each belonging to a client id (logs, metrics and rate limits go by the id)."""

    def __init__(self, by_client: dict[str, str]):
        self.by_client = by_client

    @classmethod
    def from_settings(cls, api_keys: Sequence[str], keys_file: str | None) -> Keys:
        if keys_file:
            return cls(read_keys_file(keys_file))
        return cls({(f"key{i + 1}" if len(api_keys) > 1 else "default"): k for i, k in enumerate(api_keys)})

    @property
    def required(self) -> bool:
        return bool(self.by_client)

    def client_of(self, authorization: str | None) -> str:
        """The client id of a request's `Authorization: Bearer KEY` header, or a 401."""
        if not self.required:
            return OPEN
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401,
                "this server needs an API key: send the header `Authorization: Bearer KEY`",
                code="missing_api_key",
            )
        given = key.strip().encode()
        found = None
        for client, k in self.by_client.items():  # every key compared, in constant time each
            if hmac.compare_digest(given, k.encode()):
                found = client
        if found is None:
            raise ApiError(401, "the API key is not valid for this server", code="invalid_api_key")
        return found


def check_loopback(host: str | None, origin: str | None) -> None:
    """The rule of a server without keys: only this machine may ask, and not through a web page of
    another site. A request must be addressed to a loopback name (a DNS-rebinding page sends its
    own `Host`), and a browser's `Origin`, when sent, must be loopback too (cross-site `fetch`).
    `Origin: null` is cross-site: browsers send it from sandboxed frames and `file:` pages, which
    any site can open."""
    name = hostname_of(host or "")
    if name not in LOOPBACK_HOSTS:
        raise ApiError(
            403,
            f"this server has no API key, so it answers only requests to a loopback address, not Host {(host or '')[:80]!r}; "
            "start it with --api-key to serve other names",
            code="host_not_allowed",
        )
    if origin is None:
        return
    scheme, _, authority = origin.partition("://")
    if scheme not in ("http", "https") or hostname_of(authority) not in LOOPBACK_HOSTS:
        raise ApiError(
            403,
            f"cross-site request from {origin[:80]!r} refused: this server has no API key",
            code="origin_not_allowed",
        )


def read_keys_file(path: str) -> dict[str, str]:
    """`client-id: key` per line; blank lines and `#` comments skipped. Problems name the line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"--api-keys-file {path}: cannot be read ({e})", "give a readable UTF-8 text file"
        ) from e
    keys: dict[str, str] = {}
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        client, sep, key = (s.strip() for s in text.partition(":"))
        where = f"{path}:{n}"
        if not sep or not client or not key:
            raise UserError(f"{where}: expected `client-id: key`", "write one `client-id: key` per line")
        if any(c.isspace() for c in key) or not key.isascii():
            raise UserError(
                f"{where}: the key of {client!r} has spaces or non-ASCII characters",
                "use printable ASCII keys",
            )
        if client in keys:
            raise UserError(f"{where}: client {client!r} is listed twice", "give each client one line")
        if key in seen:
            raise UserError(f"{where}: the same key as line {seen[key]}", "give each client its own key")
        keys[client], seen[key] = key, n
    if not keys:
        raise UserError(f"--api-keys-file {path}: holds no keys", "add lines of the form `client-id: key`")
    return keys


class RateLimiter:
    """Requests per minute per client, as a token bucket: a burst of up to `rpm` requests, then
    one more each 60/rpm seconds. `rpm=0` turns it off."""

    def __init__(self, rpm: int, clock=time.monotonic):
        self.rpm, self.clock = rpm, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, client: str) -> None:
        if not self.rpm:
            return
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(client, (float(self.rpm), now))
            tokens = min(float(self.rpm), tokens + (now - at) * self.rpm / 60)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                wait = (1 - tokens) * 60 / self.rpm
                raise ApiError(
                    429,
                    f"rate limit: {self.rpm} requests per minute for this key; retry in {wait:.0f} s",
                    code="rate_limit_exceeded",
                    retry_after_s=wait,
                )
            self._buckets[client] = (tokens - 1, now)


class Admission:
    """The bounded queue: at most `size` requests waiting for or using the engine. One more is
    refused at once (429) rather than left to time out, so a client can back off and retry."""

    def __init__(self, size: int):
        self.size = size
        self.waiting = 0  # admitted, no token yet
        self.running = 0  # generating
        self._lock = threading.Lock()

    def enter(self, weight: int = 1) -> Ticket:
        """A place for one request generating `weight` answers (n choices, several prompts): the
        queue counts answers, since each is a row the engine generates."""
        if weight > self.size:
            raise ApiError(
                400,
                f"this request asks for {weight} answers (prompts x n); this server queues at most {self.size}",
                param="n",
            )
        with self._lock:
            if self.waiting + self.running + weight > self.size:
                raise ApiError(
                    429,
                    f"the server is busy: {self.waiting + self.running} of its {self.size} answers are queued or running",
                    code="queue_full",
                    retry_after_s=1,
                )
            self.waiting += weight
        return Ticket(self, weight)


class Ticket:
    """One admitted request's place: `started()` when its first token arrives, `leave()` once."""

    def __init__(self, admission: Admission, weight: int = 1):
        self.admission, self.weight, self.state = admission, weight, "waiting"

    def started(self) -> None:
        with self.admission._lock:
            if self.state == "waiting":
                self.admission.waiting -= self.weight
                self.admission.running += self.weight
                self.state = "running"

    def leave(self) -> None:
        with self.admission._lock:
            if self.state == "waiting":
                self.admission.waiting -= self.weight
            elif self.state == "running":
                self.admission.running -= self.weight
            self.state = "left"
