"""A local OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`) for tests and benchmarks.

It binds 127.0.0.1 on a free port, answers with `answer(prompt)` after `latency` seconds, and can inject faults per
prompt: `faults={"marker": ["500", "timeout"]}` makes the first request whose prompt contains "marker" fail with HTTP
500, the second hang past the client's timeout, and later ones succeed. Fault kinds: an HTTP status (`"400"`,
`"401"`, `"429"`, `"500"`, ...), `"timeout"` (reply after `hang_seconds`), `"malformed"` (not JSON), `"bad_shape"`
(JSON without `choices`), `"drop"` (close the connection without a reply), `"length"` (a normal reply with
`finish_reason="length"`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: the default 5 resets connections under high concurrency


def _prompt_of(body: dict) -> str:
    if "messages" in body:
        return "\n".join(str(m.get("content", "")) for m in body["messages"])
    return str(body.get("prompt", ""))


class FakeOpenAIServer:
    """`with FakeOpenAIServer(answer=..., latency=0.01) as server:` then `OpenAITeacher(server.base_url, "fake")`.

    Attributes: `requests` (bodies received, in order), `max_in_flight` (most requests handled at once).
    """

    def __init__(self, answer: Callable[[str], str] | None = None, *, latency: float = 0.0,
                 faults: dict[str, list[str]] | None = None, hang_seconds: float = 2.0):
        self.answer = answer or (lambda prompt: "The answer is \\boxed{42}.")
        self.latency = latency
        self.faults = {marker: list(kinds) for marker, kinds in (faults or {}).items()}
        self.hang_seconds = hang_seconds
        self.requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_fault(self, prompt: str) -> str | None:
        with self._lock:
            for marker, kinds in self.faults.items():
                if marker in prompt and kinds:
                    return kinds.pop(0)
        return None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: bytes) -> None:
                self._done()  # the client may send its next request as soon as it has this reply
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _done(self) -> None:
                with server._lock:
                    if self._counted:
                        self._counted = False
                        server._in_flight -= 1

            def do_POST(self):  # noqa: N802 (http.server's name)
                with server._lock:
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                    self._counted = True
                try:
                    self._answer()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass
                finally:
                    self._done()

            def _answer(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server._lock:
                    server.requests.append(body)
                chat = self.path.endswith("/chat/completions")
                if not chat and not self.path.endswith("/completions"):
                    self._send(404, b'{"error": "not found"}')
                    return
                prompt = _prompt_of(body)
                fault = server._next_fault(prompt)
                if server.latency:
                    time.sleep(server.latency)
                if fault is not None and fault.isdigit():
                    self._send(int(fault), json.dumps({"error": {"message": f"injected {fault}"}}).encode())
                    return
                if fault == "timeout":
                    time.sleep(server.hang_seconds)
                elif fault == "malformed":
                    self._send(200, b"{not json")
                    return
                elif fault == "bad_shape":
                    self._send(200, b'{"object": "chat.completion", "choices": []}')
                    return
                elif fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                text = server.answer(prompt)
                choice = {"index": 0, "finish_reason": "length" if fault == "length" else "stop"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                reply = {"id": "fake", "object": "chat.completion" if chat else "text_completion",
                         "model": body.get("model"), "choices": [choice],
                         "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}}
                self._send(200, json.dumps(reply).encode())

        return Handler
