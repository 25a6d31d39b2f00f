"""What a chat or completion event stream has told its client so far (for router/migration.py).

Relaying stays cheap: a chunk of the first upstream is looked at as bytes only and kept as it came; what the kept
chunks say (the text, the token count, a finish) is read in batches, a few regex passes over 64 KiB, and when the
stream is cut. Its last event is checked for `[DONE]`, an error event or the final usage event, which are read one
by one. The tokens sent are counted from the events' usage where they carry it, else one per event (vLLM sends one
token an event, but can merge a few into one under load). A client that asked for the final usage only
(`include_usage`) must get an exact count: the router asks the engine for usage on every event
(`continuous_usage_stats`) and cuts it out of the bytes again (one event: a slice; several: one regex pass). Only
the first event, those at a stream's end and a continuation's events are decoded (a continuation's `id` and
`created` become the first upstream's, its `usage` counts the whole stream). Only complete events are relayed, so
the text kept is exactly the text the client has.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

_USAGE_KEY = b',"usage":{'
# What a batch of kept events says. Keys are found as bytes: inside a JSON string a quote is always escaped.
_TEXT = {
    True: re.compile(rb'"content":"([^"\\]*(?:\\.[^"\\]*)*)"'),
    False: re.compile(rb'"text":"([^"\\]*(?:\\.[^"\\]*)*)"'),
}
_REASONING = re.compile(rb'"reasoning(?:_content)?":"')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":(\d+)')
_SETTLE_BYTES = 64 * 1024
_DATA = b"data: "
_DONE = b"[DONE]"
_DONE_EVENT = _DATA + _DONE
_ERROR_EVENT = b'data: {"error"'
_CHOICELESS = b'"choices":[]'  # the usage event at the end
# The usage object vLLM's compact JSON puts after `choices` (numbers, and at most one level of nested objects).
_USAGE_OBJECT = re.compile(rb',"usage":\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}')
# The code of the error event a worker sends when its engine's stream was cut (dataplane/relay.py).
INTERRUPTED = "stream_interrupted"


class Usage(Enum):
    """The usage the client asked for (`stream_options`)."""

    NONE = 0
    FINAL = 1  # include_usage: one usage event at the end
    CONTINUOUS = 2  # and continuous_usage_stats: usage on every event too

    @classmethod
    def of(cls, payload: dict[str, Any]) -> Usage:
        options = payload.get("stream_options")
        if not isinstance(options, dict) or options.get("include_usage") is not True:
            return cls.NONE
        return cls.CONTINUOUS if options.get("continuous_usage_stats") is True else cls.FINAL


def _encode(obj: dict[str, Any]) -> bytes:
    return _DATA + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class StreamTap:
    """Fed the raw body chunks of the upstreams of one client stream, in order; returns the bytes to relay.
    `settle()` before reading what was sent."""

    def __init__(self, chat: bool, usage: Usage) -> None:
        self.chat = chat
        self.usage = usage
        # The router asked the first upstream for usage on every event (router/migration.py) and cuts it out again.
        self.strip = usage is Usage.FINAL
        self.parts: list[str] = []  # the text sent, in pieces
        self.prompt_tokens: int | None = None  # of the original request
        self.completion_tokens = 0  # sent so far, all upstreams
        self.id: Any = None
        self.created: Any = None
        self.model: Any = None
        self.finished = False  # a finish_reason was sent
        self.done = False  # `data: [DONE]` was sent
        self.engine_error = False  # the engine's own error event was relayed: the stream ends with it
        self.interrupted = False  # the worker said its engine's stream was cut
        self.blocked: str | None = None  # why what was sent cannot be continued (a tool call, reasoning)
        self._base = 0  # completion tokens of the earlier upstreams
        self._events = 0  # events with choices from this upstream (the count when it sends no usage)
        self._continuation = False
        self._buffer = b""
        self._kept: list[bytes] = []  # relayed events not read yet
        self._kept_bytes = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def next_upstream(self) -> None:
        """The next chunks come from a continuation: a partial event of the dead upstream is dropped."""
        self.settle()
        self._base = self.completion_tokens
        self._events = 0
        self._continuation = True
        self._buffer = b""
        self.interrupted = False

    def feed(self, chunk: bytes) -> bytes:
        if not self._buffer and not self._continuation and self.id is not None:
            # The usual chunk at a real engine's pace: one event of the first upstream, not its last.
            if not self.strip:
                if (
                    chunk.endswith(b"}\n\n")
                    and not chunk.startswith(_ERROR_EVENT)
                    and chunk.find(b"\n\n") == len(chunk) - 2
                ):
                    self._keep(chunk)
                    return chunk
            elif chunk.endswith(b"}}\n\n"):  # vLLM's usage its last field: cut out of the bytes
                start = chunk.rfind(_USAGE_KEY)
                if start > 0 and chunk[start - 12 : start] != _CHOICELESS and chunk.rfind(b"\n\n", 0, start) < 0:
                    if chunk.find(b"{", start + len(_USAGE_KEY), len(chunk) - 4) < 0:  # no nested object in it
                        self._keep(chunk)
                        return chunk[:start] + b"}\n\n"
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(b"\n\n") + 2
        if end == 1:  # no event ends in it yet
            self._buffer = data
            return b""
        complete, self._buffer = (data, b"") if end == len(data) else (data[:end], data[end:])
        # `[DONE]`, an error event, the usage event: each ends its chunk or is followed by `[DONE]` only, so the
        # chunk's last event is where to look for them (a blank line never occurs inside an event's JSON).
        before = complete.rfind(b"\n\n", 0, -2)
        last = complete[before + 2 :] if before >= 0 else complete
        if (
            self._continuation
            or self.id is None
            or last.startswith(_DONE_EVENT)
            or last.startswith(_ERROR_EVENT)
            or _CHOICELESS in last
        ):
            return self._each(complete)
        # The usual chunk: whole events of the first upstream, relayed with the usage the router added cut out, kept
        # as they came for settle().
        relayed = complete
        if self.strip:
            start = complete.find(_USAGE_KEY)
            end = complete.find(b"}", start)
            if start < 0:
                if b'"usage"' in complete:  # JSON not as vLLM writes it
                    return self._each(complete)
            elif complete.find(b"{", start + len(_USAGE_KEY), end) < 0 and complete.find(_USAGE_KEY, end) < 0:
                relayed = complete[:start] + complete[end + 1 :]  # one event (the usual chunk): cut out of the bytes
            else:
                relayed = _USAGE_OBJECT.sub(b"", complete)  # several, or a nested object: one regex pass
        self._keep(complete)
        return relayed

    def _each(self, complete: bytes) -> bytes:
        """Whole events, one by one."""
        out = []
        for event in complete.split(b"\n\n")[:-1]:
            relayed = self._event(event) if self._continuation or self.id is None else self._look(event)
            if relayed is not None:
                out.append(relayed)
                out.append(b"\n\n")
        return b"".join(out)

    def _keep(self, events: bytes) -> None:
        self._kept.append(events)
        self._kept_bytes += len(events)
        if self._kept_bytes > _SETTLE_BYTES:
            self.settle()

    def settle(self) -> None:
        """Read the kept events: the text, the counts, a finish, whether it can be continued."""
        if not self._kept:
            return
        kept, self._kept, self._kept_bytes = self._kept, [], 0
        batch = b"\n".join(kept)
        # Each piece is the inside of a JSON string, and so is their concatenation: decoded at once.
        text = b"".join(_TEXT[self.chat].findall(batch))
        self.parts.append(json.loads(b'"' + text + b'"') if b"\\" in text else text.decode())
        if any(b'"finish_reason":"' in event for event in kept[-2:]):  # only a usage event may follow it
            self.finished = True
        if self.chat and _REASONING.search(batch):  # (tool calls: requests with tools are not continued)
            self.blocked = "reasoning was being streamed"
        counts = _COMPLETION_TOKENS.findall(kept[-1])  # usage on every event, or none at all: the last one counts
        if counts:
            self.completion_tokens = self._base + int(counts[-1])
            if self.prompt_tokens is None and (prompt := _PROMPT_TOKENS.search(kept[-1])) is not None:
                self.prompt_tokens = int(prompt.group(1))
        else:  # an upstream that sent no usage: one token an event
            self._events += batch.count(b'"choices":[{')
            self.completion_tokens = self._base + self._events

    def _look(self, event: bytes) -> bytes | None:
        """An event of the first upstream, looked at as bytes only (the first one and errors are decoded)."""
        if event == _DONE_EVENT:
            self.done = True
            return event
        if event.startswith(_ERROR_EVENT):
            return self._event(event)
        self._keep(event)
        if not self.strip:
            return event
        start = event.rfind(_USAGE_KEY)  # vLLM's compact JSON: the usage object cut out of the bytes
        if start < 0:
            return event if b'"usage"' not in event else self._without_usage(event)
        if event[start - 12 : start] == _CHOICELESS:  # the usage event at the end (usage follows choices)
            return event if self.usage is Usage.FINAL else None
        end = event.find(b"}", start)
        if event.find(b"{", start + len(_USAGE_KEY), end) >= 0:  # a nested object
            return self._without_usage(event)
        return event[:start] + event[end + 1 :]

    def _without_usage(self, event: bytes) -> bytes | None:
        """The usage the client did not ask for taken out, the slower way (JSON not as vLLM writes it)."""
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(obj, dict) or "usage" not in obj:
            return event
        if not obj.get("choices"):
            return event if self.usage is Usage.FINAL else None
        del obj["usage"]
        return _encode(obj)

    def ending(self) -> bytes:
        """The end of a stream cut after its last token (or with no tokens left): what vLLM would have sent."""
        out = []
        if not self.finished:
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if self.chat:
                choice["delta"] = {}
            else:
                choice["text"] = ""
            out.append(_encode(self._frame([choice])))
        if self.usage is not Usage.NONE and self.prompt_tokens is not None:
            out.append(_encode({**self._frame([]), "usage": self._usage(self.prompt_tokens)}))
        out.append(_DATA + _DONE)
        return b"\n\n".join(out) + b"\n\n"

    # ------------------------------------------------------------------------------------------ one event

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(_DATA):
            return event  # a comment or another field: as it came
        data = event[6:]
        if data == _DONE:
            self.done = True
            return event
        try:
            obj = json.loads(data)
        except ValueError:
            return event
        if not isinstance(obj, dict):
            return event
        if "error" in obj:
            error = obj["error"]
            if isinstance(error, dict) and error.get("code") == INTERRUPTED:
                self.interrupted = True  # not relayed: the stream goes on elsewhere, or the router says it
                return None
            self.engine_error = True
            return event
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            self._events += 1
            self._read_choice(choices[0])
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._count(usage)
        elif choices:
            self.completion_tokens = self._base + self._events
        if self._continuation:
            return self._rewrite(obj, choices, usage)
        if self.id is None:
            self.id, self.created, self.model = obj.get("id"), obj.get("created"), obj.get("model")
        if usage is None or not self.strip:
            return event
        return self._without_usage(event)

    def _read_choice(self, choice: Any) -> None:
        if not isinstance(choice, dict):
            return
        if self.chat:
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if delta.get("tool_calls"):
                    self.blocked = "a tool call was being streamed"
                elif delta.get("reasoning") or delta.get("reasoning_content"):
                    self.blocked = "reasoning was being streamed"
            else:
                content = None
        else:
            content = choice.get("text")
        if isinstance(content, str) and content:
            self.parts.append(content)
        if choice.get("finish_reason") is not None:
            self.finished = True

    def _count(self, usage: dict[str, Any]) -> None:
        completion = usage.get("completion_tokens")
        if isinstance(completion, int):
            self.completion_tokens = self._base + completion
        prompt = usage.get("prompt_tokens")
        if self.prompt_tokens is None and isinstance(prompt, int):
            # The first upstream's; a continuation's counts the text sent too (only taken when the first said none).
            self.prompt_tokens = prompt

    def _rewrite(self, obj: dict[str, Any], choices: Any, usage: Any) -> bytes | None:
        """A continuation's event, as if the first upstream had sent it."""
        if self.id is not None:
            obj["id"], obj["created"] = self.id, self.created
        if self.chat and choices and isinstance(choices[0], dict) and isinstance(choices[0].get("delta"), dict):
            choices[0]["delta"].pop("role", None)  # said once, by the first upstream
        if usage is not None:
            keep = self.usage is Usage.CONTINUOUS or (self.usage is Usage.FINAL and not choices)
            if not keep:
                del obj["usage"]
                if not choices:
                    return None
            elif self.prompt_tokens is not None:
                obj["usage"] = self._usage(self.prompt_tokens)
        return _encode(obj)

    def _usage(self, prompt: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
        }

    def _frame(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
