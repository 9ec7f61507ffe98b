"""The batch teacher: `--engine openai --batch-dir DIR` sends nothing live.

Each request a stage would POST becomes one line of a requests file in DIR, in the OpenAI Batch
API's input format (which vLLM's `run_batch` reads as well):

    {"custom_id": "af-<hash of url and body>", "method": "POST", "url": "/v1/chat/completions",
     "body": <exactly what the HTTP engine would POST, seed included>}

The user submits the file (OpenAI: 24-hour window at half price; vLLM: offline), drops the output
file(s) into DIR/results/, and reruns the same command. A request whose result is there is answered
from it; one whose result is not is written (once: its custom_id is the hash of what it asks) and
raises `BatchPending`. A stage catches that per request, carries on with everything else it can
ask now, and ends with `pending_error` (exit status 3): how many wait, in which file, how to submit.

Files in DIR, all append-only:

- `requests.jsonl`, then `requests-2.jsonl`, ...: one file per run that had something new to ask
  (a file already handed to a provider is never added to); `/v1/completions` requests go to
  `requests[-N].completions.jsonl`, since a batch takes one endpoint.
- `results/*.jsonl`: what the provider gave back, in any number of files. A line that failed
  (an `error`, or a status other than 200) is counted and its request written again into the next
  run's file: a failure is never lost, and never asked twice at once (after MAX_FAILED_RESULTS
  failures the run stops with the provider's error: a request it refuses fails alike each time).
  A line whose custom_id is in no requests file of DIR stops the run, naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from ..core.errors import UserError
from ..core.files import fsync_dir, read_appended_jsonl, sync
from ..core.prompts import Message
from .base import Completion, EngineError, FinishReason, GenerationSettings, cut_at_stop
from .openai_http import OpenAIEngine

URLS = {"chat/completions": "/v1/chat/completions", "completions": "/v1/completions"}
EXIT_WAITING = 3  # the command stopped to wait for batch results; rerun it once they are in
MAX_FAILED_RESULTS = 4  # a request that failed this often is not re-queued again: the run stops on it
_REQUESTS = re.compile(r"requests(?:-(\d+))?(\.completions)?\.jsonl")


class BatchPending(UserError):
    """Requests are waiting for their batch results: the run stops here (exit status 3) and the
    same command, rerun once the results are in DIR/results/, carries on."""

    exit_status = EXIT_WAITING
    label = "waiting"
    engine: BatchEngine | None = None  # the engine whose request waits (set on a single request's)


def request_id(url: str, body: dict[str, Any]) -> str:
    """The custom_id of a request: a hash of everything it asks, so the same request is written
    once and its result found again on any later run."""
    text = json.dumps([url, body], sort_keys=True, ensure_ascii=False)
    return "af-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def price_factor(cfg: Any) -> float:
    """What an engine config's requests cost, as a share of the list price: 1 - --batch-discount
    where they go through a batch, else 1. (`EngineConfig`; read by every cost line.)"""
    batched = getattr(cfg, "engine", None) == "openai" and getattr(cfg, "batch_dir", None)
    return 1.0 - float(cfg.batch_discount) if batched else 1.0


class BatchStore:
    """The requests written to a batch folder and the results put in it, as one run sees them."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.written: Counter[str] = Counter()  # custom_id -> how many request lines hold it
        self.url_of: dict[str, str] = {}
        self.file_of: dict[str, Path] = {}  # the latest requests file holding each request
        self.answers: dict[str, dict[str, Any]] = {}  # custom_id -> the body of its 200 result
        self.failures: dict[str, list[str]] = {}  # custom_id -> why each failed result failed
        self.waiting: set[str] = set()  # asked this run, no result yet
        self.requeued: set[str] = set()  # of those, written again after a failed result
        self.answered: set[str] = set()  # answered from a result this run
        self._wave: int | None = None  # this run's requests files' number, once it writes one
        self._out: dict[str, tuple[Path, IO[str]]] = {}
        self._lock = threading.Lock()
        self._read_requests()
        self._read_results()

    # -- reading ----------------------------------------------------------------------------

    def _request_files(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(_REQUESTS.fullmatch(p.name), p) for p in self.folder.iterdir()]
        return sorted((int(m.group(1) or 1), p) for m, p in found if m)

    def _read_requests(self) -> None:
        fix = f"move it out of {self.folder} (alpaca-forge names its requests files requests*.jsonl)"
        for _wave, path in self._request_files():
            for _line, row in read_appended_jsonl(path, ("custom_id", "url"), "--batch-dir", fix):
                cid = row["custom_id"]
                self.written[cid] += 1
                self.url_of[cid] = row["url"]
                self.file_of[cid] = path

    def _read_results(self) -> None:
        folder = self.folder / "results"
        paths = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        for path in paths:
            try:
                lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
            except OSError as e:
                raise UserError(f"{path}: cannot be read ({e.strerror})", "check its permissions") from e
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    self._take_result(path, lineno, line)

    def _take_result(self, path: Path, lineno: int, line: str) -> None:
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            row, why = None, f"not JSON ({e.msg})"
        else:
            why = "not a JSON object"
        if not isinstance(row, dict):
            raise UserError(
                f"{where}: {why}: not a line of a batch results file",
                "put only the provider's batch output and error files (JSONL) in "
                f"{self.folder / 'results'}",
            )
        cid = row.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise UserError(
                f"{where}: field 'custom_id' is missing or not a string: not a batch result",
                f"put only the provider's batch output and error files in {self.folder / 'results'}",
            )
        if cid not in self.written:
            raise UserError(
                f"{where}: field 'custom_id' {cid!r} names no request written in {self.folder}: "
                "this results file does not belong to these requests",
                f"move {path.name} out of {self.folder / 'results'} (it answers another batch folder's "
                "requests, or requests files were deleted)",
            )
        if cid in self.answers:
            return  # a success read before stands; a later copy or failure changes nothing
        body, problem = _result_body(row, self.url_of[cid])
        if body is not None:
            self.answers[cid] = body
            self.failures.pop(cid, None)
        else:
            self.failures.setdefault(cid, []).append(f"{where}: {problem}")

    # -- asking -----------------------------------------------------------------------------

    def ask(self, url: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The result body of this request, or None: then it is written (unless a line that has
        no failed result yet already holds it) and counted as waiting."""
        cid = request_id(url, body)
        with self._lock:
            got = self.answers.get(cid)
            if got is not None:
                self.answered.add(cid)
                return got
            failed = self.failures.get(cid, [])
            if len(failed) >= MAX_FAILED_RESULTS:
                raise EngineError(
                    f"a request failed in {len(failed)} batch results; the last: {failed[-1]}",
                    "see the provider's error above (a request it refuses fails the same way each time); "
                    "once fixed, move the results files holding these failures out of "
                    f"{self.folder / 'results'} and rerun",
                )
            if len(failed) >= self.written[cid]:  # never written, or every line of it failed
                if self.written[cid]:
                    self.requeued.add(cid)
                self._write(cid, url, body)
            self.waiting.add(cid)
            return None

    def _write(self, cid: str, url: str, body: dict[str, Any]) -> None:
        if url not in self._out:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self._wave is None:
                self._wave = max((w for w, _ in self._request_files()), default=0) + 1
            while True:  # a file another run in this folder took is never appended to
                path = self.folder / _file_name(self._wave, url)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
                    break
                except FileExistsError:
                    self._wave += 1
                except OSError as e:
                    raise UserError(
                        f"--batch-dir {self.folder}: cannot write {path.name} ({e.strerror})",
                        "choose a --batch-dir in a folder you can write to",
                    ) from e
            self._out[url] = (path, os.fdopen(fd, "a", encoding="utf-8"))
        path, f = self._out[url]
        line = {"custom_id": cid, "method": "POST", "url": url, "body": body}
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        self.written[cid] += 1
        self.url_of[cid] = url
        self.file_of[cid] = path

    def flush(self) -> None:
        """Every request written so far, on disk."""
        with self._lock:
            for _path, f in self._out.values():
                sync(f)
            if self._out:
                fsync_dir(self.folder)

    def close(self) -> None:
        self.flush()
        with self._lock:
            for _path, f in self._out.values():
                f.close()
            self._out.clear()

    # -- telling the user -------------------------------------------------------------------

    def pending_error(self, model: str) -> BatchPending | None:
        """What to tell the user when requests wait (None when none do); the files are synced."""
        self.flush()
        if not self.waiting:
            return None
        per_file = Counter(self.file_of[c] for c in self.waiting)
        files = ", ".join(f"{n} in {p}" for p, n in sorted(per_file.items()))
        failed = sum(len(self.failures.get(c, ())) for c in self.requeued)
        notes = []
        if self.answered:
            notes.append(f"{len(self.answered)} answered from {self.folder / 'results'}")
        if self.requeued:
            first = self.failures[min(self.requeued)][-1]
            notes.append(f"{len(self.requeued)} re-queued after {failed} failed results (e.g. {first})")
        message = f"{len(self.waiting)} requests wait for batch results ({files})" + (
            f"; {'; '.join(notes)}" if notes else ""
        )
        submits = []
        for path in sorted(per_file):
            url = self.url_of[next(c for c in self.waiting if self.file_of[c] == path)]
            submits.append(
                f"OpenAI: upload {path} with purpose 'batch', then batches.create(input_file_id=<its id>, "
                f"endpoint='{url}', completion_window='24h'); vLLM: `python -m "
                f"vllm.entrypoints.openai.run_batch -i {path} -o {self.folder / 'results' / (path.stem + '-results.jsonl')} "
                f"--model {model}`"
            )
        fix = (
            "submit the requests (" + " | ".join(submits) + f"), put the output file (and any error "
            f"file) the batch gives back in {self.folder / 'results'}/, then rerun this same command: "
            "answered requests are taken from there, the rest wait again"
        )
        return BatchPending(message, fix)


def _file_name(wave: int, url: str) -> str:
    number = "" if wave == 1 else f"-{wave}"
    return f"requests{number}{'.completions' if url == URLS['completions'] else ''}.jsonl"


def _result_body(row: dict[str, Any], url: str) -> tuple[dict[str, Any] | None, str]:
    """The response body of a successful result line, else None and why it failed."""
    error = row.get("error")
    response = row.get("response")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        return None, f"error: {message or json.dumps(error)[:200]}"
    if not isinstance(response, dict):
        return None, "no response and no error"
    status = response.get("status_code")
    body = response.get("body")
    if status != 200:
        detail = body.get("error") if isinstance(body, dict) else None
        detail = detail.get("message") if isinstance(detail, dict) else detail
        return None, f"HTTP {status}" + (f": {str(detail)[:200]}" if detail else "")
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] if url == URLS["chat/completions"] else choice["text"]
        if not isinstance(text, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        return None, f"HTTP 200 but field 'response.body' is not a {url} response"
    # Kept small (a results file of 50,000 answers is held whole): the answer, why it ended, usage.
    kept = {"finish_reason": choice.get("finish_reason")}
    kept.update({"message": {"content": text}} if url == URLS["chat/completions"] else {"text": text})
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    counts = {k: usage[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
    return {"choices": [kept], "usage": counts}, ""


def completion_of(body: dict[str, Any], url: str, settings: GenerationSettings) -> Completion:
    """A result body as the HTTP engine would have given it: stop strings cut, usage counted."""
    choice = body["choices"][0]
    text = choice["message"]["content"] if url == URLS["chat/completions"] else choice["text"]
    usage = body.get("usage") or {}
    text, stopped = cut_at_stop(text, settings.stop)
    reason = FinishReason.LENGTH if choice.get("finish_reason") == "length" and not stopped else FinishReason.STOP
    return Completion(
        text.strip(), reason, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    )


class BatchEngine(OpenAIEngine):
    """The HTTP engine's requests, written for a batch and answered from its results (see the
    module's docstring). `complete` and `chat` write every request they are given that has no
    result, then raise `BatchPending` if any had none."""

    def __init__(self, folder: str | os.PathLike, model: str, *, system: str | None = None, seed: int = 0):
        super().__init__("http://batch.invalid/v1", model, system=system, seed=seed)
        self.store = BatchStore(folder)
        self.name = f"{model} (batch: {self.store.folder})"

    def complete(self, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
        return self._answer([self._body(settings, prompt=p) for p in prompts], "completions", settings)

    def chat(
        self, conversations: Sequence[Sequence[Message]], settings: GenerationSettings
    ) -> list[Completion]:
        return self._answer([self._body(settings, messages=c) for c in conversations], "chat/completions", settings)

    def _answer(
        self, bodies: list[dict[str, Any]], endpoint: str, settings: GenerationSettings
    ) -> list[Completion]:
        url = URLS[endpoint]
        got = [self.store.ask(url, b) for b in bodies]
        if any(g is None for g in got):  # a stage that goes on past it ends with `pending_error`
            missing = sum(g is None for g in got)
            where = self.store.file_of[request_id(url, bodies[got.index(None)])]
            error = BatchPending(
                f"{missing} of {len(bodies)} requests wait for their batch results ({where})",
                f"submit {where} (OpenAI Batch API, completion_window 24h; or vLLM's run_batch), put the "
                f"output file in {self.store.folder / 'results'}/, then rerun this same command",
            )
            error.engine = self
            raise error
        return [completion_of(g, url, settings) for g in got if g is not None]

    def stream(self, conversation: Sequence[Message], settings: GenerationSettings) -> Any:
        raise EngineError(
            "--batch-dir answers whole requests hours later: it cannot stream an answer",
            "drop --batch-dir for chat and serve; use it with generate, eval, prefer and data score",
        )

    def pending_error(self) -> BatchPending | None:
        return self.store.pending_error(self.model)

    def close(self) -> None:
        self.store.close()
        super().close()


def waiting_error(*engines: Any) -> BatchPending | None:
    """The error that ends a stage whose batch engines have requests waiting, else None (other
    engines, and None, are passed over). Stages raise it once they have done all they could."""
    errors = [e.pending_error() for e in dict.fromkeys(engines) if isinstance(e, BatchEngine)]
    found = [e for e in errors if e is not None]
    if len(found) <= 1:
        return found[0] if found else None
    return BatchPending("; ".join(e.message for e in found), " || ".join(e.fix or "" for e in found))
