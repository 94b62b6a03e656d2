"""Teachers: where traces come from. A local model (the evaluation harness's transformers / vLLM backends) or an
OpenAI-compatible HTTP endpoint (`vllm serve`, a hosted API).

A teacher has a `name` and `stream(requests, protocol)`, which yields `(request, generation)` pairs as they arrive, in
any order; `generation` is a `luffy_trl.evaluation.backends.Generation`, or None when the teacher gave up on that
request (a counted skip; the request is asked again on the next run). Requests are the evaluation runner's `Request`s
(`luffy_trl.evaluation.runner.build_requests`): the problem's prompt messages, the templated prompt text and a seed.
A configuration problem that no retry can fix (wrong URL, model name or key) raises `TeacherError` instead.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from luffy_trl.evaluation.backends import Generation

logger = logging.getLogger(__name__)

# HTTP statuses worth another try: request timeout, conflict, rate limit, server errors.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
# Statuses that mean the configuration is wrong for every request: stop the run (the cache keeps what arrived).
FATAL_STATUSES = frozenset({401, 403, 404})
APIS = ("chat", "completions")


class TeacherError(RuntimeError):
    """A teacher problem that retrying cannot fix (bad URL, model or credentials)."""


class BackendTeacher:
    """A local model through an evaluation backend (`TransformersBackend`, `VLLMBackend`, `load_backend`).

    Requests are sent `batch_size` at a time (default: the backend's), so each batch is cached as it arrives.
    """

    def __init__(self, backend, batch_size: int | None = None):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.name = backend.name
        self.batch_size = batch_size or backend.default_batch_size
        self.stats: Counter = Counter()

    def stream(self, requests: Sequence, protocol) -> Iterator[tuple[object, Generation | None]]:
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            generations = self.backend.generate([r.prompt_text for r in batch], protocol, [r.seed for r in batch])
            self.stats["requests"] += len(batch)
            yield from zip(batch, generations, strict=True)


class _Retry(Exception):
    """A failure worth another try (reason: a short label counted in `stats`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class _Skip(Exception):
    """A failure of this request only that retrying will not fix (e.g. HTTP 400: the prompt is too long)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class OpenAITeacher:
    """An OpenAI-compatible endpoint: `POST {base_url}/chat/completions` (messages) or `{base_url}/completions`
    (the prompt templated with `tokenizer`).

    Args:
        base_url: the API root, e.g. `http://localhost:8000/v1`.
        model: the `model` field of each request.
        api: `"chat"` (messages; the server applies its chat template) or `"completions"` (the templated prompt text,
            so the trace continues exactly the prompt the policy will see; needs `tokenizer` when building requests).
        api_key: sent as `Authorization: Bearer ...` when given.
        concurrency: requests in flight at once (threads).
        timeout: seconds to wait for one reply (connect + read).
        max_retries: further tries after a failure that may pass (connection error, timeout, HTTP 408/409/429/5xx,
            a reply that is not the expected JSON); then the request is skipped and counted.
        backoff: seconds before the first retry; doubled each retry (with ±25 % jitter), at most `max_backoff`.
        fail_fast_after: attempts that fail to connect, with no success yet, after which `TeacherError` is raised
            (a dead URL fails in seconds, not after every request's retries).
        extra_body: more JSON fields for every request (e.g. `{"top_k": 20}` for vLLM).
        tokenizer: the teacher's tokenizer (only used to template prompts for `api="completions"`).

    `stats` counts `requests` (attempts), `ok`, `retries`, `skipped` and `skipped/<reason>`, `retry/<reason>`.
    HTTP 401/403/404 raise `TeacherError` at once (the configuration is wrong for every request).
    """

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api: str = "chat", api_key: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0, max_retries: int = 3, backoff: float = 1.0,
                 fail_fast_after: int = 8,
                 max_backoff: float = 30.0, extra_body: dict | None = None, tokenizer=None):
        if api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {api!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(f"need concurrency >= 1, max_retries >= 0, timeout > 0; got {concurrency}, "
                             f"{max_retries}, {timeout}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = api
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout
        self.fail_fast_after = fail_fast_after
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.extra_body = dict(extra_body or {})
        self.tokenizer = tokenizer
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- one request ------------------------------------------------------------------------------------------------
    def _body(self, request, protocol) -> dict:
        body = {"model": self.model, "max_tokens": protocol.max_new_tokens, "temperature": protocol.temperature,
                "top_p": protocol.top_p, "seed": request.seed, "n": 1, **self.extra_body}
        if self.api == "chat":
            body["messages"] = [dict(m) for m in request.problem.prompt]
        else:
            if not request.prompt_text:
                raise ValueError("api='completions' needs the templated prompt: give the teacher a tokenizer")
            body["prompt"] = request.prompt_text
        return body

    def _post(self, body: dict) -> dict:
        url = f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        http_request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:300].decode(errors="replace")
            if err.code in FATAL_STATUSES:
                raise TeacherError(f"{url} answered HTTP {err.code}: {detail!r}. Check the base URL (it should end "
                                   "in /v1), the model name and the API key.") from err
            if err.code in RETRY_STATUSES:
                raise _Retry(f"http_{err.code}", detail) from err
            raise _Skip(f"http_{err.code}", detail) from err
        except TimeoutError as err:
            raise _Retry("timeout", str(err)) from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise _Retry("timeout", str(err)) from err
            raise _Retry("connection", str(err)) from err
        except (ConnectionError, OSError) as err:  # reset, broken pipe, incomplete read
            raise _Retry("connection", str(err)) from err
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _Retry("malformed", f"not JSON: {raw[:120]!r}") from err

    def _parse(self, reply: dict) -> Generation:
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
            # A reasoning server (vLLM's reasoning parser, DeepSeek's API) returns the thinking separately.
            reasoning = choice.get("message", {}).get("reasoning_content") if self.api == "chat" else None
            if reasoning:
                text = f"<think>\n{reasoning}\n</think>\n\n{text}"
            usage = reply.get("usage") or {}
            num_tokens = int(usage.get("completion_tokens") or 0)
            return Generation(text, num_tokens, choice.get("finish_reason") == "length")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise _Retry("malformed", f"unexpected reply ({err}): {str(reply)[:120]!r}") from err

    def _fail_if_unreachable(self, err) -> None:
        """Raise `TeacherError` once `fail_fast_after` attempts failed to connect while none ever succeeded: a dead
        URL fails in seconds instead of retrying every request with backoff."""
        with self._lock:
            self.stats["connection_failures"] += 1
            dead = self.stats["ok"] == 0 and self.stats["connection_failures"] >= self.fail_fast_after
        if dead:
            raise TeacherError(f"cannot reach the teacher at {self.base_url}: the first {self.fail_fast_after} "
                               f"attempts all failed to connect ({err}) and none succeeded. Check that the server "
                               "is running and the URL (it should end in /v1).")

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def complete(self, request, protocol) -> Generation | None:
        """One request with retries: its generation, or None after a counted skip. Raises `TeacherError`."""
        body = self._body(request, protocol)
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                return None
            self._count("requests")
            try:
                generation = self._parse(self._post(body))
                self._count("ok")
                return generation
            except _Skip as err:
                self._count("skipped")
                self._count(f"skipped/{err.reason}")
                logger.warning("teacher skipped a request (%s): %s", err.reason, err)
                return None
            except _Retry as err:
                if err.reason == "connection":
                    self._fail_if_unreachable(err)
                if attempt == self.max_retries:
                    self._count("skipped")
                    self._count(f"skipped/{err.reason}")
                    logger.warning("teacher gave up on a request after %d tries (%s): %s", attempt + 1, err.reason,
                                   err)
                    return None
                self._count("retries")
                self._count(f"retry/{err.reason}")
                self._stop.wait(min(delay, self.max_backoff) * random.uniform(0.75, 1.25))
                delay *= 2
        return None  # not reached

    # -- many requests ------------------------------------------------------------------------------------------
    def stream(self, requests: Sequence, protocol) -> Iterator[tuple[object, Generation | None]]:
        """Yields each request with its generation as replies arrive, at most `concurrency` in flight. A
        `TeacherError` (or an interrupt) cancels what is queued and is raised at once; requests in flight stop
        retrying and are dropped (nothing is cached for them)."""
        self._stop.clear()
        queue = iter(requests)
        pending: dict[Future, object] = {}
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="teacher")
        try:
            while True:
                while len(pending) < self.concurrency:
                    request = next(queue, None)
                    if request is None:
                        break
                    pending[pool.submit(self.complete, request, protocol)] = request
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    request = pending.pop(future)
                    yield request, future.result()
        finally:
            # In-flight requests stop retrying and end within `timeout`; the caller gets control back at once.
            self._stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
