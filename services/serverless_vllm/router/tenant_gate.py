"""What a request of a key made at run time goes through besides the usual path: its models (a model outside
them is answered 404 like an unregistered one, so a key does not learn which models exist), its limits (429),
its usage (tokens from the answer's `usage`; for a stream the engine is asked for it with
`stream_options.include_usage` and the usage event is taken out again when the client did not ask for it), and
the x-ratelimit-* headers of its limits on the answer; to a model whose engines schedule by priority, its priority
class as the request's `priority`. Requests of environment keys never come here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..dataplane.body import InferenceRequest
from ..dataplane.server_protocol import HeadLines
from ..errors import APIError
from ..schemas.keys import ENGINE_PRIORITY, Priority
from ..security.keys import ActiveKey, hidden_model
from .fair_queue import FairQueue
from .limits import Grant, Limiter
from .table import RouteTable
from .usage import Usage, UsageBook

# Endpoints whose streams report usage when asked with stream_options.include_usage.
_USAGE_OPTION_FAMILIES = frozenset({"chat", "completion"})
# Endpoints whose requests take vLLM's `priority` (the Anthropic, tokenizer and audio ones do not).
_PRIORITY_FAMILIES = frozenset(
    {"chat", "completion", "responses", "embeddings", "pooling", "classify", "score", "rerank"}
)


# Anthropic's `usage` counts the prompt's cached tokens apart from `input_tokens`: the prompt is their sum.
_ANTHROPIC_PROMPT_PARTS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


# More tokens than any one answer has (vLLM's context lengths are far below): a count outside [0, this] is not
# believed, so an upstream's garbage cannot make a usage row the manager's ledger refuses (schemas/usage.py).
MAX_ANSWER_TOKENS = 2**31


def tokens_of(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from an OpenAI `usage`, or from the input/output tokens of the Responses API's
    and Anthropic's; a count that is not a plausible number of tokens is 0."""
    if type(usage) is not dict:
        return 0, 0
    prompt = usage.get("prompt_tokens")
    if prompt is None:
        prompt = sum(_tokens(usage.get(name, 0)) for name in _ANTHROPIC_PROMPT_PARTS)
    completion = usage.get("completion_tokens")
    if completion is None:
        completion = usage.get("output_tokens")
    return _tokens(prompt), _tokens(completion)


def _tokens(value: Any) -> int:
    return value if type(value) is int and 0 <= value <= MAX_ANSWER_TOKENS else 0


def usage_of(document: Any) -> Any:
    if not isinstance(document, dict) or document.get("type") == "message_start":
        return None  # an Anthropic stream's first usage is the prompt's alone: its message_delta has them all
    usage = document.get("usage")
    if usage is None and isinstance(document.get("response"), dict):  # the Responses API's completed event
        usage = document["response"].get("usage")
    return usage


def for_engine(request: InferenceRequest, priority: int | None) -> tuple[InferenceRequest, bool]:
    """The request as the engine gets it: a stream asks for usage (`stream_options.include_usage`, and whether it
    was added, to strip it again), and with `priority` (engines that schedule by priority) the key's class is its
    `priority`, whatever the client sent. Re-encoded only when one of them changes it."""
    payload = request.payload
    options = payload.get("stream_options")
    ask = (
        request.endpoint.family in _USAGE_OPTION_FAMILIES
        and payload.get("stream") is True
        and not (isinstance(options, dict) and options.get("include_usage") is True)
    )
    if not ask and (priority is None or payload.get("priority") == priority):
        return request, False
    changed = dict(payload)
    if ask:
        changed["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    if priority is not None:
        changed["priority"] = priority
    body = json.dumps(changed).encode()
    return InferenceRequest(request.endpoint, body, changed, request.alias, request.content_type), ask


async def scan_events(chunks: AsyncIterable[Any], record: Callable[[Any], None], strip: bool) -> AsyncIterator[bytes]:
    """Pass an event stream on, reading `usage` from its events; `strip`: drop the usage-only event (empty
    choices). Bytes of an event cut across two reads wait for its end (events are delimited by a blank line)."""
    tail = b""
    async for chunk in chunks:
        data = tail + (chunk if isinstance(chunk, bytes) else str(chunk).encode())
        cut = data.rfind(b"\n\n")
        if cut < 0:
            tail = data
            continue
        complete, tail = data[: cut + 2], data[cut + 2 :]
        if b'"usage"' not in complete:
            yield complete
            continue
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            raw = data_of(event) if b'"usage"' in event else None
            if raw is not None:
                try:
                    document = json.loads(raw)
                except ValueError:
                    document = None
                usage = usage_of(document)
                # Counted once: the usage-only event at the end, where a chunk has choices too it is a running
                # total (stream_options.continuous_usage_stats), which that last event repeats.
                if usage and not document.get("choices"):
                    record(usage)
                    if strip and document.get("choices") == []:
                        continue
            kept.append(event + b"\n\n")
        if kept:
            yield b"".join(kept)
    if tail:
        yield tail


def data_of(event: bytes) -> bytes | None:
    """The JSON document of an event (`data: {...}`, after an `event:` line in Anthropic's streams), else None."""
    if event.startswith(b"data: {"):
        return event[6:]
    at = event.find(b"\ndata: {")
    return event[at + 7 :] if at >= 0 else None


def count(row: Usage, usage: Any) -> int:
    """Add an answer's usage to its row; its tokens (prompt + completion)."""
    return add(row, *tokens_of(usage))


def add(row: Usage, prompt: int, completion: int) -> int:
    row.prompt_tokens += prompt
    row.completion_tokens += completion
    return prompt + completion


# The usage object as vLLM's compact JSON writes it (its first three fields; counts up to 9 digits are below
# MAX_ANSWER_TOKENS): nearly every whole answer. Found from the end (an embedding's answer is mostly its vector),
# matched and two ints taken, against a scan that builds the object's dict (docs/benchmarks.md: the answer's side
# 13,900 instructions against 19,200); any other layout is parsed (body_usage).
_VLLM_USAGE_START = b'"usage":{"prompt_tokens":'
_VLLM_USAGE = re.compile(rb'"usage":\{"prompt_tokens":(\d{1,9}),"total_tokens":\d+,"completion_tokens":(\d{1,9})[,}]')


def body_tokens(body: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens of a whole JSON answer's `usage` (0, 0 without one)."""
    at = body.rfind(_VLLM_USAGE_START)
    found = _VLLM_USAGE.match(body, at) if at >= 0 else None
    if found is not None:
        prompt, completion = found.group(1, 2)
        return int(prompt), int(completion)
    return tokens_of(body_usage(body))


def body_usage(body: bytes) -> Any:
    """The `usage` object of a whole JSON answer, parsed alone (vLLM writes it near the end; the rest of the
    answer, possibly large, is not decoded)."""
    at = body.rfind(b'"usage":')
    if at < 0:
        return None
    try:
        return _SCAN(body[at + 8 :].lstrip().decode(), 0)[0]
    except (ValueError, StopIteration):  # not JSON there (the scanner says so with StopIteration)
        return None


# raw_decode without its Python frame: this runs for every answer to a key (typeshed lacks the attribute).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def answered(response: Response, grant: Grant | None, row: Usage, strip: bool, head: HeadLines | None) -> Response:
    """The answer to a key's request: its limits' headers added (handed to the server as lines where it takes
    them); a whole answer's usage is read now and its slot freed (it is complete), a stream is wrapped to read usage
    as it passes and free the slot at its end."""
    if grant is not None:
        if head is not None:
            head.add_head_lines(grant.head)
        else:
            response.raw_headers.extend(grant.raw_headers())
    if response.status_code >= 400:
        row.errors += 1
    if isinstance(response, StreamingResponse):
        return Metered(response, grant, row, strip)
    tokens = add(row, *body_tokens(bytes(response.body))) if response.status_code < 400 else 0
    if grant is not None:
        grant.finish(tokens)
    return response


class Metered(Response):
    """A stream answering a key's request: usage read from its events. Its tokens are taken and its limit slot
    freed when its usage passes (the generation is over then, and its client, which sends its next request once it
    has seen the stream's last event, finds both settled), or else once its last event is out."""

    def __init__(self, inner: StreamingResponse, grant: Grant | None, row: Usage, strip: bool) -> None:
        self._inner = inner
        self._grant = grant
        self._row = row
        # What Starlette and the middlewares may read of a response (its __init__ would render a body: not called).
        self.status_code = inner.status_code
        self.raw_headers = inner.raw_headers
        self.background = None
        inner.body_iterator = self._then_finish(scan_events(inner.body_iterator, self._record, strip))

    def _record(self, usage: Any) -> None:
        tokens = count(self._row, usage)
        if self._grant is not None:
            self._grant.finish(tokens)

    async def _then_finish(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
        self._finish()

    def _finish(self) -> None:
        if self._grant is not None:
            self._grant.finish(0)  # once: a second call does nothing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            self._finish()  # a stream cut short (the client gone, the upstream failed) ends here


class TenantGate:
    def __init__(self, limiter: Limiter, usage: UsageBook) -> None:
        self.limiter = limiter
        self.usage = usage
        self.fair: FairQueue | None = None  # set at startup when FAIR_QUEUE is not off
        self.table: RouteTable | None = None  # set at startup: which models' engines schedule by priority
        self.waited: Callable[[Priority, float], None] | None = None  # told each fair-queue wait (metrics)

    async def serve(
        self,
        key: ActiveKey,
        request: InferenceRequest,
        call: Callable[[InferenceRequest], Awaitable[Response]],
        head: HeadLines | None = None,
    ) -> Response:
        """`head`: the server's HeadLines for this request, where it has them (dataplane/server_protocol.py)."""
        alias = request.alias
        row = key.usage_rows.get(alias)  # only models the key was let use have a row there (a new key, new rows)
        if row is None:
            if not key.allows(alias):
                raise hidden_model(alias)
            row = self.usage.row(key, alias)
        grant = None
        if key.limited:
            try:
                grant = self.limiter.admit(key)
            except APIError:
                row.throttled += 1
                raise
        row.requests += 1
        route = self.table.route(alias) if self.table is not None else None
        by_priority = route is not None and route.priority_scheduling and request.endpoint.family in _PRIORITY_FAMILIES
        priority = ENGINE_PRIORITY[key.priority] if by_priority else None
        strip = False
        if priority is not None or request.payload.get("stream") is True:
            request, strip = for_engine(request, priority)
        try:
            if self.fair is not None:  # FAIR_QUEUE: wait for a slot of the model, by priority, tenants in turn
                since = time.perf_counter()
                await self.fair.turn(alias, key.tenant, key.priority)
                if self.waited is not None:
                    self.waited(key.priority, time.perf_counter() - since)
            response = await call(request)
        except BaseException as exc:
            if isinstance(exc, APIError):
                row.errors += 1
                if grant is not None:
                    exc.headers = {**grant.headers, **exc.headers}
            if grant is not None:
                grant.finish(0)
            raise
        return answered(response, grant, row, strip, head)
