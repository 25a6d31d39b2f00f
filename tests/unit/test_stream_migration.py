"""Stream migration's parts (router/migration.py, router/stream_tap.py): which streams can be continued, the body
that continues one (chat and completions, the max_tokens arithmetic), the body of the first request, and what the
tap relays and counts from vLLM's events. The real-stack test is tests/test_stream_migration.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from serverless_vllm.router.migration import not_migratable, resume_payload, upstream_body
from serverless_vllm.router.stream_tap import StreamTap, Usage

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 100}
COMPLETION = {"model": "m", "prompt": "Once", "stream": True, "max_tokens": 100}


# ------------------------------------------------------------------------------------------ what can be continued


def test_plain_chat_and_completion_streams_can_be_continued() -> None:
    assert not_migratable("chat", CHAT) is None
    assert not_migratable("completion", COMPLETION) is None
    assert not_migratable("completion", {**COMPLETION, "prompt": ["Once"]}) is None
    assert not_migratable("chat", {**CHAT, "tools": [{"type": "function"}], "tool_choice": "none"}) is None
    assert not_migratable("chat", {**CHAT, "response_format": {"type": "text"}, "logprobs": False}) is None


@pytest.mark.parametrize(
    ("family", "payload", "why"),
    [
        ("chat", {**CHAT, "n": 2}, "several choices"),
        ("completion", {**COMPLETION, "best_of": 3}, "several choices"),
        ("chat", {**CHAT, "logprobs": True}, "logprobs"),
        ("chat", {**CHAT, "top_logprobs": 2}, "logprobs"),
        ("completion", {**COMPLETION, "logprobs": 0}, "logprobs"),
        ("chat", {**CHAT, "tools": [{"type": "function"}]}, "tools"),
        ("chat", {**CHAT, "response_format": {"type": "json_object"}}, "structured output"),
        ("completion", {**COMPLETION, "structured_outputs": {"regex": "a+"}}, "structured output"),
        ("completion", {**COMPLETION, "echo": True}, "echo or suffix"),
        ("completion", {**COMPLETION, "prompt": [1, 2, 3]}, "not one text prompt"),
        ("completion", {**COMPLETION, "prompt": ["a", "b"]}, "not one text prompt"),
        ("chat", {**CHAT, "continue_final_message": True}, "continued message without text content"),
        ("responses", {"model": "m", "input": "hi", "stream": True}, "endpoint"),
    ],
)
def test_what_cannot_be_continued_is_not(family: str, payload: dict[str, Any], why: str) -> None:
    assert not_migratable(family, payload) == why


# ------------------------------------------------------------------------------------------ the continuation's body


def test_chat_continues_a_partial_assistant_message() -> None:
    body = resume_payload("chat", CHAT, "Once upon", 30)
    assert body is not None
    assert body["messages"] == [*CHAT["messages"], {"role": "assistant", "content": "Once upon"}]
    assert (body["continue_final_message"], body["add_generation_prompt"]) == (True, False)
    assert body["max_tokens"] == 70
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert CHAT["messages"] == [{"role": "user", "content": "hi"}]  # the client's request is left as it was


def test_chat_max_completion_tokens_and_min_tokens_count_what_was_sent() -> None:
    payload = {**CHAT, "max_tokens": None, "max_completion_tokens": 50, "min_tokens": 40}
    body = resume_payload("chat", payload, "x", 45)
    assert body is not None and (body["max_completion_tokens"], body["min_tokens"]) == (5, 0)
    assert resume_payload("chat", {**CHAT, "max_tokens": None}, "x", 45)["max_tokens"] is None  # type: ignore[index]


def test_chat_that_continued_a_message_itself_goes_on_in_it() -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Dear"}]
    body = resume_payload("chat", {**CHAT, "messages": messages, "continue_final_message": True}, " sir", 1)
    assert body is not None and body["messages"] == [messages[0], {"role": "assistant", "content": "Dear sir"}]


def test_completion_appends_to_the_prompt_and_keeps_the_client_options() -> None:
    payload = {**COMPLETION, "stream_options": {"include_usage": True}, "max_tokens": 8}
    body = resume_payload("completion", payload, " upon", 3)
    assert body is not None and (body["prompt"], body["max_tokens"]) == ("Once upon", 5)
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    listed = resume_payload("completion", {**COMPLETION, "prompt": ["Once"]}, " upon", 3)
    assert listed is not None and listed["prompt"] == ["Once upon"]
    # vLLM's default of 16 tokens for completions counts too.
    default = resume_payload("completion", {"model": "m", "prompt": "a", "stream": True}, "b", 10)
    assert default is not None and default["max_tokens"] == 6


def test_no_token_left_means_no_continuation_and_no_text_means_the_request_again() -> None:
    assert resume_payload("chat", CHAT, "x" * 10, 100) is None
    assert resume_payload("completion", COMPLETION, "x", 100) is None
    again = resume_payload("chat", CHAT, "", 0)
    assert again is not None and again["messages"] == CHAT["messages"] and "continue_final_message" not in again


def test_the_first_request_asks_for_usage_on_every_event_only_when_the_client_asked_for_the_final_usage() -> None:
    final = {**CHAT, "stream_options": {"include_usage": True}}
    assert json.loads(upstream_body(json.dumps(final).encode(), final)) == {
        **CHAT,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    for payload in (CHAT, {**CHAT, "stream_options": {"include_usage": False}}):  # no usage asked: sent as it came
        raw = json.dumps(payload).encode()
        assert upstream_body(raw, payload) is raw


# ------------------------------------------------------------------------------------------ the tap


def event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chat_chunk(content: str, n: int, finish: str | None = None, cid: str = "chatcmpl-1", created: int = 7) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}
    usage = {"prompt_tokens": 5, "total_tokens": 5 + n, "completion_tokens": n}
    return event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": "m",
                  "choices": [choice], "usage": usage})  # fmt: skip


def events(data: bytes) -> list[Any]:
    out = []
    for line in data.split(b"\n\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_the_tap_relays_what_the_client_asked_and_counts_exactly() -> None:
    tap = StreamTap(chat=True, usage=Usage.FINAL)
    role = event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                  "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                  "usage": {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0}})  # fmt: skip
    stream = role + chat_chunk("Once", 1) + chat_chunk(" upon a", 3)  # vLLM merged two tokens into one event
    out = tap.feed(stream[:50]) + tap.feed(stream[50:-10])  # cut mid-event: the partial one is held back
    got = events(out)
    assert [e["choices"][0]["delta"].get("content") for e in got] == ["", "Once"]
    assert all("usage" not in e for e in got)  # the router's own option (every event), cut out of the bytes
    tap.settle()
    assert (tap.text, tap.completion_tokens, tap.prompt_tokens) == ("Once", 1, 5)
    out = tap.feed(stream[-10:])
    assert [e["choices"][0]["delta"] for e in events(out)] == [{"content": " upon a"}]
    tap.settle()
    assert (tap.text, tap.completion_tokens) == ("Once upon a", 3)
    assert tap.id == "chatcmpl-1" and not tap.finished and not tap.done


def test_the_tap_swallows_a_worker_s_interruption_and_rewrites_the_continuation() -> None:
    tap = StreamTap(chat=True, usage=Usage.FINAL)
    tap.feed(chat_chunk("Once", 1))
    cut = event({"error": {"message": "x", "type": "upstream_error", "param": None, "code": "stream_interrupted"}})
    assert tap.feed(cut) == b"" and tap.interrupted
    tap.next_upstream()
    assert not tap.interrupted
    continuation = (
        event({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 9, "model": "m",
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
               "usage": {"prompt_tokens": 7, "total_tokens": 7, "completion_tokens": 0}})
        + chat_chunk(" upon", 1, cid="chatcmpl-2", created=9)
        + chat_chunk(" a", 2, finish="length", cid="chatcmpl-2", created=9)
        + event({"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 9, "model": "m", "choices": [],
                 "usage": {"prompt_tokens": 7, "total_tokens": 9, "completion_tokens": 2}})
        + b"data: [DONE]\n\n"
    )  # fmt: skip
    got = events(tap.feed(continuation))
    assert {(e["id"], e["created"]) for e in got} == {("chatcmpl-1", 7)}
    assert got[0]["choices"][0]["delta"] == {"content": ""}  # the role was said once, by the first upstream
    assert [("usage" in e) for e in got] == [False, False, False, True]
    assert got[-1]["usage"] == {"prompt_tokens": 5, "total_tokens": 8, "completion_tokens": 3}
    assert (tap.text, tap.finished, tap.done) == ("Once upon a", True, True)


def test_an_engine_error_ends_the_stream_and_a_stream_cut_after_its_last_token_is_ended() -> None:
    tap = StreamTap(chat=False, usage=Usage.FINAL)
    first = {"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m",
             "choices": [{"index": 0, "text": "ab", "finish_reason": None}],
             "usage": {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2}}  # fmt: skip
    tap.feed(event(first))
    ending = events(tap.ending())
    assert ending[0]["choices"] == [{"index": 0, "finish_reason": "length", "text": ""}]
    assert ending[1]["usage"] == {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2}
    assert tap.ending().endswith(b"data: [DONE]\n\n")
    error = event({"error": {"message": "boom", "type": "internal", "code": 500}})
    assert tap.feed(error) == error and tap.engine_error


def test_the_text_read_in_batches_is_the_text_sent_whatever_it_holds() -> None:
    tricky = ['say "hi"', "a\\b", "line\nnext", "é漢😀", '"content":"x"', " plain"]
    tap = StreamTap(chat=True, usage=Usage.FINAL)
    stream = b"".join(chat_chunk(t, i + 1) for i, t in enumerate(tricky * 300))  # over one 64 KiB batch
    final = event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [],
                   "usage": {"prompt_tokens": 5, "total_tokens": 1805, "completion_tokens": 1800}})  # fmt: skip
    out = tap.feed(stream + final)
    relayed = events(out)
    assert "".join(e["choices"][0]["delta"]["content"] for e in relayed[:-1]) == "".join(tricky * 300)
    assert relayed[-1]["usage"]["completion_tokens"] == 1800  # asked for: the final usage event stays
    tap.settle()
    assert (tap.text, tap.completion_tokens, tap.finished, tap.blocked) == ("".join(tricky * 300), 1800, False, None)
    # No usage asked: nothing was added to the engine's events, and they are relayed as they came.
    plain = StreamTap(chat=True, usage=Usage.NONE)
    assert plain.feed(stream + final) == stream + final


def test_without_usage_asked_each_event_counts_one_token_and_goes_as_it_came() -> None:
    tap = StreamTap(chat=False, usage=Usage.NONE)
    stream = [event({"id": "c", "choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}) for i in range(5)]
    assert b"".join(tap.feed(e) for e in stream) == b"".join(stream)
    tap.settle()
    assert (tap.text, tap.completion_tokens, tap.prompt_tokens) == ("t0 t1 t2 t3 t4 ", 5, None)


def test_reasoning_sent_blocks_the_continuation_and_the_word_in_text_does_not() -> None:
    for delta, why in [({"reasoning": "hmm"}, "reasoning was being streamed"), ({"content": '"reasoning":"'}, None)]:
        tap = StreamTap(chat=True, usage=Usage.NONE)
        tap.feed(chat_chunk("a", 1))
        tap.feed(event({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": delta}]}))
        tap.settle()
        assert tap.blocked == why
    first = StreamTap(chat=True, usage=Usage.NONE)  # the first event is decoded: a tool call there is seen too
    first.feed(event({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}))
    assert first.blocked == "a tool call was being streamed"


def test_events_that_end_a_stream_are_seen_at_the_end_of_a_chunk_of_many() -> None:
    cut = event({"error": {"message": "x", "type": "upstream_error", "param": None, "code": "stream_interrupted"}})
    tap = StreamTap(chat=True, usage=Usage.NONE)
    tap.feed(chat_chunk("a", 1))
    out = tap.feed(b"".join(chat_chunk(f"t{i}", i + 2) for i in range(40)) + cut)
    assert len(events(out)) == 40 and b"error" not in out and tap.interrupted
    tap.settle()
    assert tap.completion_tokens == 41 and tap.text == "a" + "".join(f"t{i}" for i in range(40))
    done = StreamTap(chat=True, usage=Usage.NONE)
    done.feed(chat_chunk("a", 1))
    assert done.feed(chat_chunk("b", 2) + b"data: [DONE]\n\n").endswith(b"data: [DONE]\n\n") and done.done
