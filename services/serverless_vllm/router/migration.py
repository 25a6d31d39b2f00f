"""Stream migration: a chat or completion stream whose replica dies mid-generation goes on on another replica.

When the connection to the worker closes before `data: [DONE]` (the worker died), or the worker says its engine's
stream was cut (the engine died), the router sends the request again with the text already sent: for chat as a
partial assistant message that the model continues (`continue_final_message`, without a new generation prompt),
for completions appended to the prompt; `max_tokens` (or `max_completion_tokens`) and `min_tokens` less the tokens
already sent. The new stream is relayed into the same client stream with the first one's `id` and `created`, and
its usage counts the original prompt and every token sent (router/stream_tap.py).

Where it goes: another ready replica of the model, else it waits as a cold start does (Forwarder.hold, bounded by
COLD_START_TIMEOUT). Sampling after the cut is a new draw. Not for what cannot be continued from text: `n` or
`best_of` > 1, beam search, logprobs, structured output, requests with tools, `echo`/`suffix`, token-id prompts,
and a stream cut while it sends a tool call or reasoning; those are cut as before, with a `stream_interrupted`
error event. STREAM_MIGRATION=0 turns it off; then nothing of this runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ..dataplane.body import InferenceRequest
from ..dataplane.relay import RelayResponse, UpstreamError, error_event
from ..errors import APIError
from ..schemas import Endpoint
from .hold_stream import replicas_failed
from .policy import RequestKey
from .stream_tap import StreamTap, Usage

if TYPE_CHECKING:
    from .proxy import Forwarder, Tried

log = logging.getLogger(__name__)

MAX_MOVES = 3  # continuations of one stream, and tries to send each (a replica that failed it waits, see _hold)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions
_FAMILIES = ("chat", "completion")
_STRUCTURED = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
# Usage on every event from the engine: the tokens sent are counted exactly (the client gets what it asked for).
_USAGE_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


def not_migratable(family: str, payload: dict[str, Any]) -> str | None:
    """Why a streaming request to `family` cannot be continued from its text (None: it can)."""
    if family not in _FAMILIES:
        return "endpoint"
    if payload.get("n") not in (None, 1) or payload.get("best_of") not in (None, 1) or payload.get("use_beam_search"):
        return "several choices"
    logprobs = payload.get("logprobs")  # chat: a bool; completions: a number (0 asks for them too)
    if (
        (logprobs is not None and logprobs is not False)
        or payload.get("top_logprobs")
        or payload.get("prompt_logprobs")
    ):
        return "logprobs"
    if payload.get("return_token_ids") or payload.get("return_tokens_as_token_ids"):
        return "token ids"
    response_format = payload.get("response_format")
    if any(payload.get(k) for k in _STRUCTURED) or (
        isinstance(response_format, dict) and response_format.get("type") not in (None, "text")
    ):
        return "structured output"
    if family == "chat":
        messages = payload.get("messages")
        if payload.get("tools") and payload.get("tool_choice") != "none":
            return "tools"
        if payload.get("continue_final_message") and not (
            isinstance(messages, list)
            and messages
            and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant"
            and isinstance(messages[-1].get("content"), str)
        ):
            return "continued message without text content"
        return None
    prompt = payload.get("prompt")
    if payload.get("echo") or payload.get("suffix"):
        return "echo or suffix"
    if not isinstance(prompt, str) and not (
        isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str)
    ):
        return "not one text prompt"
    return None


def upstream_body(body: bytes, payload: dict[str, Any]) -> bytes:
    """The body sent to the first replica: the client's; when it asked for the final usage only, with usage on every
    event (the tokens sent then count exactly, for the usage the client gets; router/stream_tap.py cuts it out)."""
    if Usage.of(payload) is not Usage.FINAL:
        return body
    return json.dumps({**payload, "stream_options": {**payload["stream_options"], **_USAGE_OPTIONS}}).encode()


def resume_payload(family: str, payload: dict[str, Any], text: str, sent: int) -> dict[str, Any] | None:
    """The request that continues a stream after `text` (`sent` tokens); None when no token is left to send."""
    resumed = {**payload}
    if family == "chat" and "max_completion_tokens" in payload:
        key = "max_completion_tokens"
    else:
        key = "max_tokens"
    limit = payload.get(key)
    if limit is None and family == "completion":
        limit = COMPLETION_DEFAULT_MAX_TOKENS
    if limit is not None:
        if limit - sent < 1:
            return None
        resumed[key] = limit - sent
    min_tokens = payload.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens:
        resumed["min_tokens"] = max(0, min_tokens - sent)
    options = payload.get("stream_options")
    resumed["stream_options"] = {**(options if isinstance(options, dict) else {}), **_USAGE_OPTIONS}
    if not text:
        return resumed  # nothing was sent: the request as it was
    if family == "chat":
        messages = list(payload["messages"])
        if payload.get("continue_final_message"):
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + text}
        else:
            messages.append({"role": "assistant", "content": text})
        resumed.update(messages=messages, continue_final_message=True, add_generation_prompt=False)
    else:
        prompt = payload["prompt"]
        resumed["prompt"] = prompt + text if isinstance(prompt, str) else [prompt[0] + text]
    return resumed


class StreamMigration:
    """The Forwarder's sending of streaming requests, with those that can be continued made so."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    async def send(
        self, request: InferenceRequest, endpoint: Endpoint, affinity: RequestKey | None, tried: Tried
    ) -> Response | None:
        forwarder, path, alias = self._forwarder, request.endpoint.path, request.alias
        if not_migratable(request.endpoint.family, request.payload) is not None:
            return await forwarder.send(path, request.body, request.content_type, alias, endpoint, tried=tried)
        body = upstream_body(request.body, request.payload)
        response = await forwarder.send(path, body, request.content_type, alias, endpoint, tried=tried)
        if not isinstance(response, RelayResponse):
            return response
        tap = StreamTap(request.endpoint.family == "chat", Usage.of(request.payload))
        return MigratingStream(self, request, response, {*tried, endpoint.replica_id}, affinity, tap)

    async def resume(
        self, request: InferenceRequest, tap: StreamTap, tried: set[str], affinity: RequestKey | None
    ) -> RelayResponse | None:
        """The continuation's stream on another replica (None: no token is left to send). Raises APIError."""
        payload = resume_payload(request.endpoint.family, request.payload, tap.text, tap.completion_tokens)
        if payload is None:
            return None
        body = json.dumps(payload).encode()
        forwarder, alias = self._forwarder, request.alias
        for _ in range(MAX_MOVES):
            endpoint = forwarder.table.pick(alias, frozenset(tried), affinity)
            if endpoint is None:  # none ready: wait as a cold start does
                endpoint = await self._hold(request, tried, affinity)
            tried.add(endpoint.replica_id)
            response = await forwarder.send(request.endpoint.path, body, request.content_type, alias, endpoint)
            if isinstance(response, RelayResponse):
                log.warning(
                    "stream of %s continued on replica %s after %d tokens", alias, endpoint.replica_id,
                    tap.completion_tokens,
                )  # fmt: skip
                return response
            if response is not None:  # the engine refused the continuation (an error status)
                raise APIError.from_response(response.status_code, bytes(response.body))
        raise replicas_failed(alias)

    async def _hold(self, request: InferenceRequest, tried: set[str], affinity: RequestKey | None) -> Endpoint:
        """Forwarder.hold, where a replica that failed this stream counts again once the table stopped listing it
        as ready (the worker restarted its engine under the same replica id, say): meanwhile it is left out."""
        forgiving = asyncio.ensure_future(self._forgive(request.alias, tried))
        try:
            return await self._forwarder.hold(request.alias, tried, affinity, request.endpoint)
        finally:
            forgiving.cancel()

    async def _forgive(self, alias: str, tried: set[str]) -> None:
        table = self._forwarder.table
        while tried:
            route = table.route(alias)
            tried.intersection_update({e.replica_id for e in route.endpoints} if route is not None else ())
            await table.wait_change()


class MigratingStream(RelayResponse):
    """The client's stream: the first upstream's events, then, if it is cut, a continuation's, and so on."""

    def __init__(
        self,
        migration: StreamMigration,
        request: InferenceRequest,
        first: RelayResponse,
        tried: set[str],
        affinity: RequestKey | None,
        tap: StreamTap,
    ) -> None:
        self._migration = migration
        self._request = request
        self._current = first
        self._tried = tried
        self._affinity = affinity
        self._tap = tap
        super().__init__(first.upstream)  # status and headers of the first upstream; it keeps its own on_done

    async def _chunks(self) -> AsyncIterator[bytes]:
        tap = self._tap
        for moves in range(MAX_MOVES + 1):
            relay = self._current
            try:
                async for chunk in relay.upstream.chunks():
                    out = tap.feed(chunk)
                    if out:
                        yield out
                cause = "the engine's stream was cut" if tap.interrupted else "ended before [DONE]"
            except UpstreamError as exc:
                cause = str(exc)
            finally:
                relay.close_upstream()
            tap.settle()
            if tap.done or tap.engine_error:
                return
            if tap.finished:
                yield tap.ending()  # cut after its last token: ended as the engine would have
                return
            why = tap.blocked or ("moved too often" if moves == MAX_MOVES else None)
            if why is not None:
                log.warning("upstream stream interrupted (%s), not continued: %s", cause, why)
                yield error_event(f"upstream stream interrupted ({cause})")
                return
            log.warning("upstream stream of %s interrupted (%s): continuing it", self._request.alias, cause)
            try:
                resumed = await self._migration.resume(self._request, tap, self._tried, self._affinity)
            except APIError as exc:
                yield error_event(f"upstream stream interrupted ({cause}); not continued: {exc.message}")
                return
            if resumed is None:
                yield tap.ending()  # every token asked for was sent
                return
            self._current = resumed
            tap.next_upstream()

    def close_upstream(self) -> None:
        self._current.close_upstream()
