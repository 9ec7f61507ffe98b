"""`alpaca-forge serve` on the command line."""

from __future__ import annotations

from typing import Any

from ..core.cli import add_command, say
from .config import ServeConfig

DESCRIPTION = """\
Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
/v1/moderations, /v1/models), with a chat page at / that works offline, /health and Prometheus
/metrics. Concurrent requests to an in-process model are batched; every prompt and answer passes
the content filter; API keys, rate limits, size and token caps, and deadlines keep one client
from hurting the others. With --engine openai it is a gateway: the same safeguards in front of
any OpenAI-compatible server (vLLM, TGI, llama.cpp).

examples:
  alpaca-forge serve                                   # the embedded model on http://127.0.0.1:8000
  alpaca-forge serve --model runs/my-alpaca --request-log logs/requests.jsonl
  # a gateway with keys in front of vLLM, reachable from other machines:
  alpaca-forge serve --engine openai --base-url http://gpu-host:8000/v1 --model my-alpaca \\
      --host 0.0.0.0 --api-keys-file keys.txt --rate-limit-rpm 60
  curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}]}'"""


def register(sub: Any) -> None:
    add_command(
        sub,
        "serve",
        "serve a model: OpenAI-compatible API, chat page, content filter, metrics",
        DESCRIPTION,
        ServeConfig,
        _main,
    )


def _main(config: ServeConfig, args: Any) -> int:
    from .runner import run

    r = run(config, progress=not args.quiet)
    say(
        "served %d request%s in %.0f s (%s)",
        r.requests,
        "" if r.requests == 1 else "s",
        r.elapsed_s,
        r.model or "model not loaded",
    )
    return 0
