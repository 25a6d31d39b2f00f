"""A client that sees the wait, end to end: manager, router and a worker as real processes, a real CPU vLLM engine
on the tiny model registered at zero replicas, and streaming chat completions held through its cold starts.

The router's keep-alive interval is 1 s here (HOLD_KEEPALIVE_INTERVAL). The raw bytes of one stream (httpx) carry
`: loading model` comments before the first `data:` line; the official `openai` client, streaming at the same time,
skips them and parses the model's chunks. Then the manager knows what that start took, and the next cold start is
announced with its phase and expected ready time (`GET /v1/models/{alias}`, and in the comments).

The tests share one stack and run in file order.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from .harness import Stack, wait_until

ALIAS = "tiny"
MESSAGES = [{"role": "user", "content": "hello there"}]
COMMENT = re.compile(rf"^: loading model '{ALIAS}', (\d+) s(, ready in about (\d+) s)?$")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    # The worker's default fork server (the harness turns it off elsewhere): cold starts as users get them.
    env = {"CPU_SLOTS": "1", "SCALE_DOWN_DELAY": "2", "HOLD_KEEPALIVE_INTERVAL": "1", "ENGINE_FORK_SERVER": "1"}
    s = Stack(tmp_path_factory.mktemp("cold-start-stream"), env=env).start(workers=1)
    try:
        # float32: the CPU build's bf16 kernels once crashed on a short first request (../shared/ENVIRONMENT.md).
        body = {
            "alias": ALIAS,
            "model_name": str(tiny_model),
            "max_model_len": 512,
            "dtype": "float32",
            "preload": False,
            "idle_timeout_s": 3,
        }
        resp = s.post("/v1/models/register", json=body)
        assert resp.status_code == 200, resp.text
        yield s
    finally:
        s.stop()


class RawStream:
    """One streamed chat completion read as raw bytes, each chunk with the time it came."""

    def __init__(self, url: str) -> None:
        body = {"model": ALIAS, "messages": MESSAGES, "max_tokens": 16, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as resp:
            self.status, self.content_type = resp.status_code, resp.headers.get("content-type", "")
            self.chunks = [(time.monotonic(), chunk) for chunk in resp.iter_raw()]
        self.text = b"".join(c for _, c in self.chunks).decode()
        blocks = [b for b in self.text.split("\n\n") if b]
        first = next(i for i, b in enumerate(blocks) if b.startswith("data:"))
        self.comments, self.events = blocks[:first], blocks[first:]

    def content(self) -> str:
        data = [e.removeprefix("data: ") for e in self.events if e != "data: [DONE]"]
        return "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data)


def openai_stream(stack: Stack) -> list[Any]:
    client = stack.openai(timeout=600)
    stream = client.chat.completions.create(model=ALIAS, messages=MESSAGES, max_tokens=16, stream=True)
    return list(stream)


def test_a_held_stream_shows_the_wait_and_the_openai_client_still_parses_it(stack: Stack) -> None:
    assert stack.model(ALIAS)["state"] == "cold"
    with ThreadPoolExecutor(2) as pool:
        raw_future = pool.submit(RawStream, stack.router.url)
        chunks = openai_stream(stack)  # the same cold start, at the same time
        raw = raw_future.result()
    # The raw bytes: 200 at once as an event stream, comments about every second, then the model's events.
    assert raw.status == 200 and raw.content_type.startswith("text/event-stream")
    assert len(raw.comments) >= 3, raw.text[:500]
    assert all(COMMENT.match(c) for c in raw.comments), raw.comments
    held = [int(COMMENT.match(c).group(1)) for c in raw.comments]  # type: ignore[union-attr]
    assert held == sorted(held) and held[-1] >= 3
    assert raw.events[-1] == "data: [DONE]" and not any(e.startswith(":") for e in raw.events)
    assert raw.content()
    arrivals = [t for t, c in raw.chunks if c.startswith(b": loading model")]
    assert max(b - a for a, b in itertools.pairwise(arrivals)) < 5  # none of the gaps a proxy cuts
    # The openai client: the same stream shape, comments skipped, the model's chunks parsed.
    assert chunks and all(c.object == "chat.completion.chunk" and c.model == ALIAS for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_the_next_cold_start_is_announced_with_its_expected_ready_time(stack: Stack) -> None:
    info = stack.model(ALIAS)
    times = info["start_times"]
    assert times["starts"] == 1 and times["start_s"] > 1, info  # learnt from the first start
    assert info["phase"] is None and info["expected_ready_s"] is None  # ready: nothing to wait for
    stack.wait_model(ALIAS, "cold", timeout=120)
    with ThreadPoolExecutor(1) as pool:
        raw_future = pool.submit(RawStream, stack.router.url)
        loading = wait_until(
            lambda: (m := stack.model(ALIAS))["phase"] == "starting" and m, 60, interval=0.2, what="phase starting"
        )
        raw = raw_future.result()
    assert loading["state"] == "loading"
    assert loading["expected_ready_s"] is not None and 0 < loading["expected_ready_s"] <= times["start_s"] + 1
    # The first comments say when the model should be ready (later ones may not, if it takes longer this time; the
    # very first may come before the router has the manager's placement).
    expected = [int(m.group(3)) for c in raw.comments[:3] if (m := COMMENT.match(c)) and m.group(3)]
    assert expected and max(expected) <= times["start_s"] + 2, raw.comments
    assert raw.events[-1] == "data: [DONE]" and raw.content()
    assert stack.model(ALIAS)["start_times"]["starts"] == 2
