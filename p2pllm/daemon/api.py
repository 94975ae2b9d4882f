"""The OpenAI-compatible API of every daemon (issue 13 item 1): `p2pllmd --api [HOST:]PORT`.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both streaming as
server-sent events ``data: {...}`` ending with ``data: [DONE]``, or one JSON body), GET
/health, GET /metrics (:func:`~p2pllm.daemon.httpd.metrics_routes`: the daemon's metrics plus
this API's request/token counters and TTFT / inter-token histograms).

Size: over 400 lines because request validation (OpenAI's field rules and error shape), the
local backend and the SSE streaming are one HTTP surface; the engine work is elsewhere.

Server: aiohttp (see :mod:`.httpd` for why), on the daemon's own event loop, with the same
header limits as the metrics listener and ``handler_cancellation``: a client that goes away
cancels its handler, which cancels its generation (a local sequence is aborted and its KV
blocks freed; a job's stream is left, which cancels the job).

Backends. The local engine (:class:`LocalModel`): every model in the daemon's models dirs, the
pulled and the bundled models (:func:`~p2pllm.engine.loader.list_models`, top-level folders)
is served by its folder name; it loads on its first request and stays loaded, and its
:class:`~p2pllm.engine.scheduler.BatchEngine` batches every request's tokens. The serve
config's names (``--api-serve``, :mod:`.serving`; :class:`JobModel`): each request is one
GENERATE job (spec, split, tp) this daemon coordinates on its in-process connection, as
`p2pllm generate --mode ...` would. Both render prompts on the name's
:class:`~p2pllm.daemon.worker.RoleWorker` thread: messages go through the tokenizer's chat
template (:func:`p2pllm.engine.chat.render`) and the reply ends at the template's end ids; a
model without a template (the bundled shakespeare models) gets a plain ``role: content``
transcript ending in ``assistant:``. :class:`ReplyText` turns either's tokens into text.

Requests: ``model``, ``messages`` / ``prompt``, ``max_tokens`` / ``max_completion_tokens``
(default: the rest of the context), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string
or up to 4), ``stream``, ``stream_options.include_usage``, ``n`` (1 only). Any other field is
a 400 in OpenAI's error shape naming it (``param``). Unknown model: 404 ``model_not_found``.
A prompt that with ``max_tokens`` does not fit the context: 400
``context_length_exceeded``. With ``--api-key-file`` every route but /health wants
``Authorization: Bearer <key>`` (401 ``invalid_api_key``); a non-loopback --api needs a key
file (config.py). More than ``api_max_pending`` requests admitted at once (running or waiting
for a model's worker): 429 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pllm.daemon.httpd import MAX_HEADERS, MAX_LINE, READ_TIMEOUT, Snapshot, metrics_routes
from p2pllm.daemon.serving import ServedJob
from p2pllm.daemon.worker import RoleWorker
from p2pllm.wire.frame import Frame

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20  # bytes of a request body
MAX_STOPS = 4
RETRY_AFTER_S = 1
DRAIN_S = 30.0  # seconds in-flight requests may take to finish when the daemon stops
# Prometheus histogram buckets (seconds, upper bounds; +Inf is added by the renderer)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "seed", "stop",
                           "stream", "stream_options", "n"})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return web.json_response(body, status=self.status, headers=self.headers)


class _StopString(Exception):
    """A stop string appeared: generation ends there."""


# -- metrics ----------------------------------------------------------------------------------


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics) per label value; thread-safe."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._data: dict[str, tuple[list[int], list[float]]] = {}  # model -> (counts, [sum, n])

    def observe(self, model: str, value: float) -> None:
        with self._lock:
            counts, tot = self._data.setdefault(model, ([0] * len(self.buckets), [0.0, 0.0]))
            for i, le in enumerate(self.buckets):
                if value <= le:
                    counts[i] += 1
            tot[0] += value
            tot[1] += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {m: {"buckets": list(zip(self.buckets, counts, strict=True)), "sum": tot[0],
                        "count": int(tot[1])} for m, (counts, tot) in self._data.items()}


@dataclass
class ApiStats:
    """What /metrics shows of the API (rendered by daemon/metrics.py from ``snapshot()``)."""

    requests: dict[tuple[str, str, int], int] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    pending: int = 0  # admitted requests: running or waiting for their model's worker
    running: int = 0  # generations computing on a worker thread now (counted there)
    cancelled: int = 0  # generations stopped because their client went away
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, endpoint: str, model: str, status: int) -> None:
        key = (endpoint, model, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def started(self) -> None:
        with self.lock:
            self.running += 1

    def finished(self, model: str, prompt: int, completion: int, cancelled: bool) -> None:
        """A generation ended on its worker thread (``completion``: the tokens it drew)."""
        with self.lock:
            self.running -= 1
            self.cancelled += cancelled
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt
            self.completion_tokens[model] = self.completion_tokens.get(model, 0) + completion

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            prompt, completion = dict(self.prompt_tokens), dict(self.completion_tokens)
            running, cancelled = self.running, self.cancelled
        return {
            "requests": [{"endpoint": e, "model": m, "status": s, "count": n}
                         for (e, m, s), n in sorted(self.requests.items())],
            "prompt_tokens": prompt, "completion_tokens": completion,
            "ttft": self.ttft.snapshot(), "itl": self.itl.snapshot(),
            "pending": self.pending, "running": running, "cancelled": cancelled,
        }


# -- requests ---------------------------------------------------------------------------------


@dataclass
class GenRequest:
    """One validated request."""

    endpoint: str  # "chat" | "completions"
    model: str
    messages: list[dict[str, str]] | None
    prompt: str | list[int] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_request(body: Any, endpoint: str) -> GenRequest:
    """Validate a request body; ApiError 400 naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    allowed = CHAT_FIELDS if endpoint == "chat" else COMPLETION_FIELDS
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"unsupported field {key!r}: this server takes "
                           f"{', '.join(sorted(allowed))}", param=key, code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string", param="model",
                       code="missing_required_parameter" if model is None else "invalid_type")
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    if endpoint == "chat":
        messages = _messages(body.get("messages"))
    else:
        prompt = _prompt(body.get("prompt"))
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not _is_int(v) or v < 1:
            raise ApiError(400, f"{key!r} must be an integer >= 1, got {v!r}", param=key,
                           code="invalid_value")
        max_tokens = v if max_tokens is None else max_tokens
    temperature = body.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_num(temperature) or not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be a number in [0, 2], got {temperature!r}",
                       param="temperature", code="invalid_value")
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if not _is_num(top_p) or not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be a number in (0, 1], got {top_p!r}", param="top_p",
                       code="invalid_value")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**63):
        raise ApiError(400, f"'seed' must be a 64-bit integer, got {seed!r}", param="seed",
                       code="invalid_value")
    if seed is not None and seed < 0:
        seed += 2**63  # the engine's seeds are in [0, 2**63)
    stop_v = body.get("stop")
    stops: tuple[str, ...]
    if stop_v is None:
        stops = ()
    elif isinstance(stop_v, str):
        stops = (stop_v,) if stop_v else ()
    elif (isinstance(stop_v, list) and len(stop_v) <= MAX_STOPS
          and all(isinstance(s, str) for s in stop_v)):
        stops = tuple(s for s in stop_v if s)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings",
                       param="stop", code="invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code="invalid_type")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or any(k != "include_usage" for k in opts) \
                or not isinstance(opts.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' takes only include_usage (a boolean)",
                           param="stream_options", code="invalid_value")
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed with stream: true",
                           param="stream_options", code="invalid_value")
        include_usage = bool(opts.get("include_usage", False))
    n = body.get("n", 1)
    if (n is not None and n != 1) or isinstance(n, bool):
        raise ApiError(400, f"only n=1 is supported, got {n!r}", param="n", code="invalid_value")
    return GenRequest(endpoint, model, messages, prompt, max_tokens, float(temperature),
                      float(top_p), seed, stops, stream, include_usage)


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}",
                       param="messages",
                       code="missing_required_parameter" if v is None else "invalid_type")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", param=where, code="invalid_type")
        for k in m:
            if k not in ("role", "content"):
                raise ApiError(400, f"unsupported field {k!r} in {where}", param=f"{where}.{k}",
                               code="unsupported_parameter")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                           param=f"{where}.role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str) and set(part) == {"type", "text"}):
                    raise ApiError(400, f"{where}.content: only text parts are supported",
                                   param=f"{where}.content", code="invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", param=f"{where}.content",
                           code="invalid_type")
        out.append({"role": "system" if role == "developer" else str(role), "content": content})
    return out


def _prompt(v: Any) -> str | list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list) and v and all(_is_int(t) and t >= 0 for t in v):
        return list(v)
    raise ApiError(400, "'prompt' must be a non-empty string (or one string in a list, or a "
                   "list of token ids)", param="prompt",
                   code="missing_required_parameter" if v is None else "invalid_value")


# -- the backends -----------------------------------------------------------------------------


@dataclass
class Prepared:
    prompt_ids: list[int]
    stop_ids: tuple[int, ...]
    context: int


class ReplyText:
    """The text of one reply as its tokens arrive, the same for every backend: pieces decoded
    through a TextStream, cut at the first stop string, a tail that may begin one held back
    until it cannot; ``emit`` gets each piece once it is final. Also times the tokens (TTFT,
    inter-token latency) into the API's histograms."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: Sequence[str],
                 emit: Callable[[str], None] | None, stats: ApiStats, model: str,
                 t_start: float) -> None:
        from p2pllm.engine.generate import TextStream

        self.tokenizer, self.prompt_ids, self.stops, self.emit = tokenizer, prompt_ids, stops, emit
        self.stream = TextStream(tokenizer, prompt_ids)
        self.stats, self.model, self.last = stats, model, t_start
        self.text = ""
        self.sent = 0
        self.tokens = 0  # drawn so far (usage.completion_tokens)

    def push(self, token: int) -> bool:
        """One more token; True when a stop string ended the reply there (text final)."""
        now = time.perf_counter()
        (self.stats.ttft if self.tokens == 0 else self.stats.itl).observe(self.model,
                                                                          now - self.last)
        self.last = now
        self.tokens += 1
        piece = self.stream.push(token)
        return bool(piece) and self._advance(self.text + piece, final=False)

    def finish(self, token_ids: list[int]) -> bool:
        """Every token is in: the whole text, decoded at once, emitted to its end. True when a
        stop string cut it."""
        from p2pllm.engine.generate import continuation_text

        full = continuation_text(self.tokenizer, self.prompt_ids, token_ids)
        return self._advance(full if full.startswith(self.text) else self.text, final=True)

    def _advance(self, text: str, final: bool) -> bool:
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                self.text = text[:i]
                self._send(final=True)
                return True
        self.text = text
        self._send(final=final)
        return False

    def _send(self, final: bool) -> None:
        end = len(self.text) if final else len(self.text) - _held_back(self.text, self.stops)
        if end > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent:end])
            self.sent = end


class _Backend:
    """What every served name has: a tokenizer (loaded on first use, on the name's worker
    thread, which also renders the prompts) and the prompt's stop ids."""

    def __init__(self, name: str, path: Path, stats: ApiStats) -> None:
        self.name, self.path, self.stats = name, path, stats
        self.worker = RoleWorker(f"api-{name}")
        self.tokenizer: Any = None
        self.vocab = 0
        self.context = 0
        self._chat_ends: tuple[int, ...] = ()
        self._plain_ends: tuple[int, ...] = ()

    def _load(self) -> None:  # worker thread: sets the tokenizer (and whatever else)
        raise NotImplementedError

    def _set_tokenizer(self, tokenizer: Any, eos: Sequence[int], vocab: int, context: int) -> None:
        from p2pllm.engine.chat import end_ids

        self.tokenizer, self.vocab, self.context = tokenizer, vocab, context
        self._chat_ends = end_ids(tokenizer, tuple(eos))
        plain = list(eos)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(tok_eos, int) and tok_eos not in plain:
            plain.append(tok_eos)
        self._plain_ends = tuple(plain)

    def prepare(self, req: GenRequest) -> Prepared:
        """Load (once) and tokenise; runs on the worker."""
        from p2pllm.engine.chat import has_chat_template, render

        if self.tokenizer is None:
            self._load()
        tok = self.tokenizer
        if req.messages is not None:
            if has_chat_template(tok):
                ids = render(tok, req.messages)
                stops = self._chat_ends
            else:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in req.messages)
                ids = list(tok(text + "assistant:")["input_ids"])
                stops = self._plain_ends
        else:
            assert req.prompt is not None
            ids = (list(tok(req.prompt)["input_ids"]) if isinstance(req.prompt, str)
                   else list(req.prompt))
            stops = self._plain_ends
            if any(t >= self.vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be below the vocabulary size "
                               f"{self.vocab}", param="prompt", code="invalid_value")
        return Prepared(ids, stops, self.context)

    async def run_generate(self, req: GenRequest, prep: Prepared, max_tokens: int,
                           t_start: float, emit: Callable[[str], None] | None
                           ) -> tuple[str, int, str]:
        """Generate; ``emit`` gets text pieces as they are final. A cancelled await stops the
        generation. Returns (text, tokens, finish_reason)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.worker.aclose()

    def engine_stats(self) -> dict[str, Any] | None:
        return None


class LocalModel(_Backend):
    """One model on the local engine: loaded on first use; its BatchEngine's one thread
    batches every request's tokens."""

    def __init__(self, name: str, path: Path, stats: ApiStats, quant: str = "auto") -> None:
        super().__init__(name, path, stats)
        self.quant = quant
        self.engine: Any = None
        self._engine_lock = threading.Lock()
        self.model: Any = None

    # worker thread only
    def _load(self) -> None:
        import torch

        from p2pllm.engine.loader import load_slice, load_tokenizer

        t0 = time.perf_counter()
        tokenizer = load_tokenizer(self.path)
        self.model = load_slice(self.path, dtype=torch.float32,
                                quant=stored_quant(self.path) if self.quant == "auto"
                                else self.quant)
        cfg = self.model.config
        self._set_tokenizer(tokenizer, cfg.eos_token_ids, cfg.vocab_size,
                            int(cfg.max_position_embeddings))
        log.info("api: loaded %s from %s in %.1f s", self.name, self.path, time.perf_counter() - t0)

    async def run_generate(self, req: GenRequest, prep: Prepared, max_tokens: int,
                           t_start: float, emit: Callable[[str], None] | None
                           ) -> tuple[str, int, str]:
        """One sequence on the batch engine, awaited on the loop (no thread waits for it, so
        every admitted request can be in the batch): the tokens reach ``reply`` on the
        engine's thread; a cancelled await aborts the sequence (its KV blocks free now, or
        right after the running step)."""
        from p2pllm.engine.sampling import SamplingParams, make_generator
        from p2pllm.engine.scheduler import Sequence

        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        reply = ReplyText(self.tokenizer, prep.prompt_ids, req.stop, emit, self.stats,
                          self.name, t_start)

        def on_token(token: int) -> None:  # the engine's thread
            if reply.push(token):
                raise _StopString

        def wake() -> None:
            if not ended.done():
                ended.set_result(None)

        def on_done() -> None:  # the engine's thread
            loop.call_soon_threadsafe(wake)

        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        seq = Sequence(prep.prompt_ids, params, max_tokens, stop_ids=prep.stop_ids,
                       on_token=on_token, generator=make_generator(req.seed), on_done=on_done)
        finish = "length"
        cancelled = False
        self.stats.started()
        try:
            # add() waits while a step runs: on a thread, not the loop
            await asyncio.to_thread(lambda: self._batch_engine().add(seq))
            await ended
            token_ids = seq.result(0)  # raises what on_token raised (_StopString)
            if seq.stop_reason == "cancelled":  # the engine stopped (the daemon is closing)
                raise ApiError(503, "this daemon is shutting down", type_="server_error",
                               code="shutting_down")
            cut = reply.finish(token_ids)
            finish = "stop" if cut or seq.stop_reason == "eos" else "length"
        except _StopString:
            finish = "stop"
        except asyncio.CancelledError:
            cancelled = True
            seq.abort()
            raise
        finally:
            self.stats.finished(self.name, len(prep.prompt_ids), reply.tokens, cancelled)
        return reply.text, reply.tokens, finish

    async def aclose(self) -> None:
        """Stop the worker, then the batch engine (running sequences end "cancelled")."""
        await self.worker.aclose()
        await asyncio.to_thread(self._stop_engine)

    def _batch_engine(self) -> Any:
        with self._engine_lock:
            if self.engine is None:
                from p2pllm.engine.scheduler import BatchEngine

                self.engine = BatchEngine(self.model).start()
            return self.engine

    def _stop_engine(self) -> None:
        with self._engine_lock:
            if self.engine is not None:
                self.engine.stop()  # running sequences end "cancelled"
                self.engine = None

    def engine_stats(self) -> dict[str, Any] | None:
        """The batch engine's stats (running, waiting, blocks_used, blocks_total, last_batch,
        preemptions, steps, tokens), or None before the first generation."""
        eng = self.engine
        return None if eng is None else dict(eng.stats().to_json())


StartJob = Callable[[dict[str, Any]], AsyncGenerator[Frame, None]]


class JobModel(_Backend):
    """A served name of the serve config (daemon/serving.py): each request is one GENERATE
    job this daemon coordinates (``start_job``: its in-process connection's stream, the path
    `p2pllm generate --mode ...` takes); the job's partials carry its tokens. Leaving the
    stream early (a stop string, a client gone) cancels the job."""

    def __init__(self, job: ServedJob, path: Path, stats: ApiStats, start_job: StartJob) -> None:
        super().__init__(job.name, path, stats)
        self.job, self.start_job = job, start_job

    def _load(self) -> None:  # worker thread: the tokenizer and config only, no weights
        from p2pllm.engine.loader import load_config, load_tokenizer

        cfg = load_config(self.path)
        self._set_tokenizer(load_tokenizer(self.path), cfg.eos_token_ids, cfg.vocab_size,
                            int(cfg.max_position_embeddings))

    async def run_generate(self, req: GenRequest, prep: Prepared, max_tokens: int,
                           t_start: float, emit: Callable[[str], None] | None
                           ) -> tuple[str, int, str]:
        from p2pllm.wire.connection import ConnectionClosed, RemoteError

        meta = self.job.meta(prep.prompt_ids, max_tokens, req.temperature, req.top_p, req.seed)
        reply = ReplyText(self.tokenizer, prep.prompt_ids, req.stop, emit, self.stats,
                          self.name, t_start)
        finish = "length"
        cancelled = False
        self.stats.started()
        try:
            async with contextlib.aclosing(self.start_job(meta)) as frames:
                async for frame in frames:
                    if frame.is_partial:
                        if any(reply.push(int(t)) for t in frame.meta.get("token_ids", ())):
                            finish = "stop"  # leaving the stream cancels the job
                            break
                        continue
                    cut = reply.finish([int(t) for t in frame.meta.get("token_ids", ())])
                    if cut or frame.meta.get("stop_reason") == "eos":
                        finish = "stop"
        except RemoteError as e:
            raise _job_error(self.job, e.code, e.message) from None
        except ConnectionClosed as e:
            raise _job_error(self.job, 0, str(e)) from None
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self.stats.finished(self.name, len(prep.prompt_ids), reply.tokens, cancelled)
        return reply.text, reply.tokens, finish


def _job_error(job: ServedJob, code: int, message: str) -> ApiError:
    """A failed job as an API error: a bad request stays the client's (400); a cluster that
    cannot run it now is 503 (retry); anything else is this server's (500)."""
    from p2pllm.wire.messages import ErrorCode

    text = f"the {job.mode} job of {job.name!r} failed: {message}"
    if code == ErrorCode.BAD_REQUEST:
        return ApiError(400, text, code="invalid_value")
    if code in (ErrorCode.REFUSED, ErrorCode.PEER_DOWN, ErrorCode.TIMEOUT, ErrorCode.OVER_LIMIT,
                ErrorCode.SHUTTING_DOWN, 0):
        return ApiError(503, text, type_="server_error", code="backend_unavailable",
                        headers={"Retry-After": "5"})
    return ApiError(500, text, type_="server_error", code="backend_error")


def stored_quant(path: Path) -> str:
    """The weight mode that keeps a model's file as stored: a GGUF whose linears are Q4_x ->
    "int4", Q8_0 -> "int8"; anything else (float GGUF, safetensors) -> "none" (float32)."""
    from p2pllm.engine.gguf import GGUFFile, find_gguf

    gguf = find_gguf(path)
    if gguf is None:
        return "none"
    with GGUFFile(gguf) as f:
        kinds = {f.info(n).type_name for n in f.hf_names() if n.endswith("mlp.down_proj.weight")}
    if kinds and all(k.startswith("Q4") for k in kinds):
        return "int4"
    if kinds and all(k == "Q8_0" for k in kinds):
        return "int8"
    return "none"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# -- the server -------------------------------------------------------------------------------


class ApiServer:
    """The aiohttp app of the API, on the running loop."""

    def __init__(self, list_models: Callable[[], dict[str, Path]], snapshot: Snapshot,
                 api_key: str | None = None, max_pending: int = 64,
                 quant: str = "auto", jobs: Mapping[str, ServedJob] | None = None,
                 start_job: StartJob | None = None) -> None:
        """``jobs``: the serve config's names (daemon/serving.py), run through ``start_job``
        (a GENERATE stream on the daemon's own connection); they shadow local models of the
        same name."""
        self.list_models = list_models
        self.jobs = dict(jobs or {})
        self.start_job = start_job
        if self.jobs and start_job is None:
            raise ValueError("ApiServer: served jobs need start_job")
        self.quant = quant
        self.draining = False
        self._idle = asyncio.Event()  # set when the last admitted request ends
        self.api_key = api_key
        self.max_pending = max_pending
        self.stats = ApiStats()
        self.models: dict[str, _Backend] = {}
        self._known: dict[str, Path] = {}
        self.created = int(time.time())
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        app.add_routes([
            web.get("/health", self.health),
            web.get("/v1/models", self.v1_models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            *metrics_routes(snapshot),
        ])
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
            keepalive_timeout=READ_TIMEOUT, handler_cancellation=True,
            max_line_size=MAX_LINE, max_field_size=MAX_LINE, max_headers=MAX_HEADERS,
        )
        self.host = ""
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0]
        self.host, self.port = str(bound[0]), int(bound[1])
        log.info("OpenAI-compatible API on http://%s/v1", self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        """Drain, then close: new requests get 503 at once, requests admitted before run to
        their end for up to ``drain_s`` seconds; then the listener closes (streams still
        open are cut) and the models' workers stop."""
        self.draining = True
        if self.stats.pending:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_s)
        if self.stats.pending:
            log.warning("api: closing with %d requests still running", self.stats.pending)
        await self._runner.cleanup()
        for m in list(self.models.values()):
            with contextlib.suppress(Exception):
                await m.aclose()

    def metrics(self) -> dict[str, Any]:
        """What /metrics shows of the API (daemon/metrics.py renders it)."""
        snap = self.stats.snapshot()
        models: dict[str, dict[str, Any]] = {}
        for name, m in self.models.items():
            st = m.engine_stats()
            if st is not None:
                models[name] = {"batch_size": st["last_batch"], "running": st["running"],
                                "waiting": st["waiting"], "kv_blocks_used": st["blocks_used"],
                                "kv_blocks_total": st["blocks_total"],
                                "preemptions": st["preemptions"]}
        snap["models"] = models
        return snap

    # -- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if self.api_key is not None and request.path != "/health":
                got = request.headers.get("Authorization", "")
                scheme, _, key = got.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                        key.strip().encode(), self.api_key.encode()):
                    raise ApiError(401, "missing or wrong API key: send Authorization: Bearer "
                                   "<key> (the daemon's --api-key-file)", code="invalid_api_key",
                                   headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status in (404, 405) and request.path.startswith("/v1/"):
                return ApiError(e.status, f"{request.method} {request.path}: {e.reason}",
                                code="not_found" if e.status == 404 else "method_not_allowed"
                                ).response()
            raise

    async def _models(self) -> dict[str, Path]:
        self._known = await asyncio.to_thread(self.list_models)
        return self._known

    async def _model(self, name: str) -> _Backend:
        m = self.models.get(name)
        if m is not None:
            return m
        job = self.jobs.get(name)
        want = job.model if job is not None else name
        known = self._known if want in self._known else await self._models()
        path = known.get(want)
        if path is None and job is not None:
            raise ApiError(500, f"the served name {name!r} runs {job.mode} jobs of the model "
                           f"{job.model!r}, which is not in this daemon's models dirs (the API "
                           "renders prompts with its tokenizer)", type_="server_error",
                           code="model_not_found")
        if path is None:
            raise ApiError(404, f"the model {name!r} does not exist on this daemon (GET "
                           "/v1/models lists them)", param="model", code="model_not_found")
        m = self.models.get(name)  # another request may have made it meanwhile
        if m is None:
            if job is not None:
                assert self.start_job is not None
                m = JobModel(job, path, self.stats, self.start_job)
            else:
                m = LocalModel(name, path, self.stats, self.quant)
            self.models[name] = m
        return m

    # -- routes -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pending": self.stats.pending,
                                  "loaded": sorted(self.models)})

    async def v1_models(self, request: web.Request) -> web.Response:
        models = await self._models()
        backends = {name: "local" for name in models} | {n: j.mode for n, j in self.jobs.items()}
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "p2pllm",
                 "backend": backend} for name, backend in sorted(backends.items())]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        t_start = time.perf_counter()
        model_label = ""
        status = 200
        try:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON: {e}",
                               code="invalid_json") from None
            if self.draining:
                raise ApiError(503, "this daemon is shutting down", type_="server_error",
                               code="shutting_down", headers={"Retry-After": "5"})
            req = parse_request(body, endpoint)
            model = await self._model(req.model)
            model_label = req.model
            if self.stats.pending >= self.max_pending:
                raise ApiError(429, f"{self.stats.pending} requests are already queued or "
                               f"running (the cap is {self.max_pending}); retry later",
                               type_="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
            self.stats.pending += 1
            try:
                return await self._serve(request, req, model, t_start)
            finally:
                self.stats.pending -= 1
                if self.stats.pending == 0:
                    self._idle.set()
        except ApiError as e:
            status = e.status
            return e.response()
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's figure)
            raise
        finally:
            self.stats.request(endpoint, model_label, status)

    async def _serve(self, request: web.Request, req: GenRequest, model: _Backend,
                     t_start: float) -> web.StreamResponse:
        from p2pllm.engine.errors import ModelError

        try:
            prep = await model.worker.run(model.prepare, req)
        except ModelError as e:
            raise ApiError(400, str(e), param="messages" if req.messages is not None
                           else "prompt", code="invalid_value") from None
        n_prompt, ctx = len(prep.prompt_ids), prep.context
        max_tokens = req.max_tokens if req.max_tokens is not None else ctx - n_prompt
        if n_prompt + max_tokens > ctx or max_tokens < 1:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens; the "
                           f"prompt has {n_prompt} tokens and {max_tokens} were asked for "
                           "(max_tokens)", param="messages" if req.messages is not None
                           else "prompt", code="context_length_exceeded")
        rid = ("chatcmpl-" if req.endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not req.stream:
            text, n_gen, finish = await model.run_generate(req, prep, max_tokens, t_start,
                                                           None)
            usage = _usage(n_prompt, n_gen)
            if req.endpoint == "chat":
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                                   "content": text},
                                          "logprobs": None, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return web.json_response({"id": rid, "object": obj, "created": created,
                                      "model": req.model, "choices": [choice], "usage": usage})
        return await self._stream(request, req, model, prep, max_tokens, t_start, rid,
                                  created)

    async def _stream(self, request: web.Request, req: GenRequest, model: _Backend,
                      prep: Prepared, max_tokens: int, t_start: float,
                      rid: str, created: int) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()

        def emit(piece: str) -> None:  # worker thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        chat = req.endpoint == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> bytes:
            if chat:
                d: dict[str, Any] = {}
                if role:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None,
                                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None,
                          "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": req.model,
                    "choices": [choice]}
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if chat:
            await resp.write(chunk("", role=True))
        gen = asyncio.ensure_future(model.run_generate(req, prep, max_tokens, t_start,
                                                       emit))
        try:
            while True:
                get = asyncio.ensure_future(pieces.get())
                done, _ = await asyncio.wait({get, gen}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    await resp.write(chunk(get.result()))
                    continue
                get.cancel()
                break
            text, n_gen, finish = gen.result()
            while not pieces.empty():  # emitted just before the generation returned
                await resp.write(chunk(pieces.get_nowait()))
        except BaseException:
            if not gen.done():
                gen.cancel()  # aborts the sequence (or leaves the job's stream: cancels it)
                with contextlib.suppress(BaseException):
                    await asyncio.shield(gen)
            raise
        await resp.write(chunk(None, finish))
        if req.include_usage:
            usage = {"id": rid, "object": obj, "created": created, "model": req.model,
                     "choices": [], "usage": _usage(len(prep.prompt_ids), n_gen)}
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def served_models(models_dirs: Sequence[str]) -> dict[str, Path]:
    """Name -> folder of every model the local engine can serve (models dirs, pulled, bundled)."""
    from p2pllm.engine.loader import list_models

    return {m.name: m.path for m in list_models(list(models_dirs))}
