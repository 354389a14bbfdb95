"""A scripted OpenAI-compatible HTTP server on 127.0.0.1, for fault injection (stdlib only, no network).

    with FakeServer() as server:                     # a random free port, served from a thread
        server.script = lambda req: Reply(status=500) if req.attempt == 0 else None   # None: the normal reply
        OpenAIGenerator("m", base_url=server.url)...
        server.requests                              # every request seen, with path, body, time, attempt, reply

The normal reply to `/v1/completions` and `/v1/chat/completions` has `n` choices (at most `max_choices`), whose
texts name the request's seed and the choice index (`s<seed>c<j>`), so tests can tell samples apart; it carries
log-probs (one per character, plus one for EOS) when asked and `usage`: `prompt_tokens` the prompt's characters
(message contents), `completion_tokens` each choice's characters plus one (EOS). `/v1/models`,
`/health` and `/v1/load_lora_adapter` answer 200 unless scripted (`models_reply`, `health_reply`, `lora_reply`).

A server that dies and comes back: `close()` drops every open connection (a kept-alive one would otherwise go on
being served), and a new `FakeServer(port=old.port)` takes over the address; with `start_after=None` it holds the
port but refuses connections until `listen()`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer. `hang`: seconds to stall before answering; `reset`: send half the body, then a TCP
    reset; `raw`: these bytes as the body instead of `json`; `choices`: override the number of choices."""

    status: int = 200
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    hang: float = 0.0
    reset: bool = False
    choices: int | None = None


def error(status: int, message: str, code: str | None = None, type: str = "error", param: str | None = None,
          headers: dict[str, str] | None = None) -> Reply:
    """An OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return Reply(status=status, json=body, headers=headers or {})


def chat_answer(text: str, finish_reason: str = "stop", top: dict[str, float] | None = None,
                at: str | None = None) -> Reply:
    """A chat completion whose content is `text` (a scripted judge's answer). With `top`, it carries log-probs:
    one token per character, and at the last occurrence of `at` the alternatives `top` ({token: log-prob})."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None,
                              "message": {"role": "assistant", "content": text}}
    if top is not None:
        where = text.rindex(at) if at else -1
        choice["logprobs"] = {"content": [
            {"token": ch, "logprob": top.get(ch, -0.1) if i == where else -0.1, "bytes": None,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in top.items()] if i == where else []}
            for i, ch in enumerate(text)
        ]}
    return Reply(json={"id": "judge", "object": "chat.completion", "created": 0, "model": "judge",
                       "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": len(text) + 1,
                                                      "total_tokens": len(text) + 4}})


@dataclass
class Request:
    path: str
    body: dict
    headers: dict[str, str]
    t: float  # time.monotonic() when it arrived
    attempt: int  # earlier generation requests that carried the same prompt
    reply: Reply | None = None  # what the server sent (None until sent; stays None if the client hung up first)

    @property
    def prompt(self) -> Any:
        return self.body.get("prompt", self.body.get("messages"))

    @property
    def prompt_chars(self) -> int:
        prompt = self.prompt
        return len(prompt) if isinstance(prompt, str) else sum(len(m.get("content") or "") for m in prompt or [])


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hangs up (or is killed) is expected
            super().handle_error(request, client_address)


class FakeServer:
    """See module docstring. `start_after`: seconds before the port starts listening (None: until `listen()`);
    `port`: 0 for a free one, or a fixed one (e.g. a closed server's, to restart it)."""

    def __init__(self, start_after: float | None = 0.0, expected_key: str | None = None, port: int = 0) -> None:
        self.script: Callable[[Request], Reply | None] = lambda req: None
        self.models_reply: Reply | None = None
        self.health_reply: Reply | None = None
        self.lora_reply: Reply | None = None
        self.max_choices: int | None = None  # a server that ignores `n` returns at most this many
        self.finish_reasons: list[str] = ["stop"]  # cycled over choices
        self.latency = 0.0  # seconds every generation request takes
        self.expected_key = expected_key  # 401 for requests without `Authorization: Bearer <key>`
        self.requests: list[Request] = []
        self.inflight = self.max_inflight = 0
        self._lock = threading.Lock()
        self._release = threading.Event()  # ends hangs at shutdown
        self._listen = threading.Event()  # set by listen(): start listening now
        self._connections: set[socket.socket] = set()  # open client connections, dropped at close()
        self._closed = False
        self._httpd = _Server(("127.0.0.1", port), self._handler_class(), bind_and_activate=False)
        self._httpd.block_on_close = False
        self._httpd.server_bind()  # the port is ours now; connections are refused until it listens
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._serving = False
        self._thread = threading.Thread(target=self._serve, args=(start_after,), daemon=True)
        self._thread.start()

    def _serve(self, start_after: float | None) -> None:
        self._listen.wait(start_after)
        with self._lock:  # not once close() has begun
            if self._closed:
                return
            self._httpd.server_activate()
            self._serving = True
        self._httpd.serve_forever(poll_interval=0.05)

    def generation_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("completions")]

    def listen(self) -> None:
        """Start listening now (a server made with `start_after=None`, or one still waiting)."""
        self._listen.set()

    def close(self) -> None:
        """Stop like a dead process: stop listening, drop every open connection, end hangs. Idempotent."""
        with self._lock:
            self._closed, serving = True, self._serving
        self._drop_connections()  # first, so a request in flight gets no answer (hangs end below)
        self._release.set()
        self._listen.set()
        if serving:
            self._httpd.shutdown()
        self._httpd.server_close()
        self._drop_connections()  # any accepted while stopping
        self._thread.join(timeout=5)

    def _drop_connections(self) -> None:
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- replies -------------------------------------------------------------------------------------------------

    def normal_reply(self, req: Request, choices: int | None = None) -> Reply:
        body, chat = req.body, req.path.endswith("chat/completions")
        n = body.get("n") or 1
        k = choices if choices is not None else min(n, self.max_choices if self.max_choices is not None else n)
        out = []
        for j in range(k):
            text = f"s{body.get('seed')}c{j}"
            reason = self.finish_reasons[j % len(self.finish_reasons)]
            lps = [-0.25] * (len(text) + 1)  # one per character, plus EOS
            choice: dict[str, Any] = {"index": j, "finish_reason": reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": "x", "logprob": v, "bytes": None, "top_logprobs": []}
                                                      for v in lps]}
            else:
                choice["text"] = text
                if body.get("logprobs") is not None:
                    choice["logprobs"] = {"tokens": ["x"] * len(lps), "token_logprobs": lps, "top_logprobs": None,
                                          "text_offset": list(range(len(lps)))}
            out.append(choice)
        tokens = sum(len(c.get("text") or c.get("message", {}).get("content", "")) + 1 for c in out)
        return Reply(json={
            "id": f"cmpl-{len(self.requests)}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model"), "choices": out,
            "usage": {"prompt_tokens": req.prompt_chars, "completion_tokens": tokens,
                      "total_tokens": tokens + req.prompt_chars},
        })

    def _answer(self, req: Request) -> Reply:
        if self.expected_key is not None and req.headers.get("authorization") != f"Bearer {self.expected_key}":
            return error(401, "Incorrect API key provided.", code="invalid_api_key", type="invalid_request_error")
        if req.path.endswith("/models"):
            return self.models_reply or Reply(json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        if req.path == "/health":
            return self.health_reply or Reply(json={})
        if req.path.endswith("/load_lora_adapter"):
            return self.lora_reply or Reply(raw=b"Success: LoRA adapter added successfully.")
        if not req.path.endswith("completions"):
            return error(404, f"no route {req.path}")
        if self.latency:
            time.sleep(self.latency)
        scripted = self.script(req)
        if scripted is None:
            return self.normal_reply(req)
        if scripted.status == 200 and scripted.json is None and scripted.raw is None:  # a normal body, modified
            return replace(scripted, json=self.normal_reply(req, scripted.choices).json)
        return scripted

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)
                    if server._closed:  # accepted while closing: dead already
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                with server._lock:
                    server._connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def do_GET(self) -> None:
                self._handle({})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_unparsed": raw.decode("utf-8", "replace")}
                self._handle(body)

            def _handle(self, body: dict) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    key = json.dumps(body.get("prompt", body.get("messages")), sort_keys=True)
                    attempt = sum(1 for r in server.requests
                                  if r.path.endswith("completions")
                                  and json.dumps(r.prompt, sort_keys=True) == key)
                    req = Request(self.path, body, headers, time.monotonic(), attempt)
                    server.requests.append(req)
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    reply = server._answer(req)
                    if reply.hang:
                        server._release.wait(reply.hang)
                    req.reply = reply  # before sending: a client may act on the reply before this thread resumes
                    self._send(reply)
                except OSError:
                    req.reply = None  # the client gave up (timeout) or we reset the connection on purpose
                finally:
                    with server._lock:
                        server.inflight -= 1

            def _send(self, reply: Reply) -> None:
                data = reply.raw if reply.raw is not None else json.dumps(reply.json).encode()
                headers = {"Content-Type": "text/plain" if reply.raw is not None else "application/json",
                           **reply.headers, "Content-Length": str(len(data))}
                self.send_response(reply.status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if reply.reset:  # half the body, then RST: the client sees the connection die mid-response
                    self.wfile.write(data[: len(data) // 2])
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                self.wfile.write(data)

        return Handler
