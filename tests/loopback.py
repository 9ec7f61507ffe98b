"""An HTTP server on loopback for tests: `with Loopback(Handler) as base_url:` serves `Handler`
on a free port of 127.0.0.1 from a daemon thread, and gives the API base (`http://...:PORT/v1`)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # listen()'s backlog: the standard library's 5 drops the SYNs of a client opening 32
    # connections at once, and each waits a second for its retransmission (uvicorn's is 2048)
    request_queue_size = 256


class JsonHandler(BaseHTTPRequestHandler):
    """A scripted server's handler: HTTP/1.1 (the clients keep their connections), no access log."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def json_body(self) -> dict:
        """The request's JSON body ({} for none)."""
        return json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")


class Loopback:
    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        # TCP_NODELAY: headers and body leave in two writes, and with Nagle's algorithm on the body
        # waits ~40 ms for the client's delayed ACK (real servers, uvicorn and vLLM, set it too)
        handler.disable_nagle_algorithm = True
        self.server = _Server(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(body: dict, text: str, prompt: str, *, id: str, finish: str = "stop") -> dict:
    """An OpenAI reply of `text` to the request `body`: a chat message where it sent messages, else
    a completion's text; its usage counts the words of `prompt` and of `text`."""
    choice: dict = {"index": 0, "finish_reason": finish}
    if "messages" in body:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
    return {"id": id, "object": "chat.completion", "choices": [choice], "usage": usage}


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: object) -> None:
    """`payload` as a JSON response."""
    send_text(handler, status, json.dumps(payload), "application/json")


def send_text(handler: BaseHTTPRequestHandler, status: int, text: str, content_type: str) -> None:
    """A response of `text`; a client that went away mid-reply is not the server's error."""
    data = text.encode()
    try:
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
