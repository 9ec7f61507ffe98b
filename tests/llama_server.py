"""llama.cpp's own OpenAI-compatible server (`python -m llama_cpp.server`, llama-cpp-python's
`server` extra) on loopback, for tests that hold our files and our gateway to a server nobody here
wrote: `with llama_server(gguf, "alias") as base_url:` gives the API base (`http://...:PORT/v1`)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

HAS_SERVER = importlib.util.find_spec("sse_starlette") is not None
NEEDS_SERVER = pytest.mark.skipif(
    not HAS_SERVER,
    reason="llama.cpp's server needs llama-cpp-python's `server` extra (the dev install has it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf: Path, alias: str, *flags: str) -> Iterator[str]:
    """The server on `gguf`, serving it as `alias`, with its chat format left to the file (the
    GGUF's `tokenizer.chat_template`), as a user starting it would; yields the API base."""
    port = _free_port()
    threads = os.environ.get("OMP_NUM_THREADS")  # a pytest-xdist worker's share of the cores
    flags = (*(("--n_threads", threads, "--n_threads_batch", threads) if threads else ()), *flags)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--verbose", "False", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp's server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(base + "/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama.cpp's server did not answer within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
