"""What stream migration adds to relaying one chunk of a stream (router/migration.py, router/stream_tap.py), in process.

The router's relay of an upstream event stream (dataplane/relay.RelayResponse) against the same relay with migration
on (router/migration.MigratingStream with its StreamTap), both fed the same chunks from a stand-in upstream that
answers at once, for chat and completion events as vLLM writes them: one event per chunk (a real engine's pace) and
30 per chunk (an engine faster than the reader), for a client that asked for no usage (`none`: the events go as
they came) and one that asked for the final usage only (`final`: the router asks for usage on every event and cuts it
out again). CPU time of this process (time.process_time:
a busy machine's preemption does not count), best of `--repeat` runs of `--chunks` chunks, in alternating order. The
whole path's cost per event (router and worker, HTTP included) is in bench/hot_path.py `--stream-cpu-requests`.

    .venv/bin/python bench/stream_tap.py
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, machine_info, write_result
from serverless_vllm.dataplane.body import InferenceRequest
from serverless_vllm.dataplane.endpoints import BY_PATH
from serverless_vllm.dataplane.relay import RelayResponse
from serverless_vllm.router.migration import MigratingStream
from serverless_vllm.router.stream_tap import StreamTap, Usage

USAGE = b',"usage":{"prompt_tokens":26,"total_tokens":39,"completion_tokens":13,"completion_tokens_details":null}'
EVENTS = {
    "chat": b'data: {"id":"chatcmpl-5b3c0f8e2d7a4c1e9f6b0a3d8c2e7f14","object":"chat.completion.chunk",'
    b'"created":1764470000,"model":"tiny","choices":[{"index":0,"delta":{"content":" tok12"},"logprobs":null,'
    b'"finish_reason":null}]%s}\n\n',
    "completion": b'data: {"id":"cmpl-5b3c0f8e2d7a4c1e9f6b0a3d8c2e7f14","object":"text_completion",'
    b'"created":1764470000,"model":"tiny","choices":[{"index":0,"text":" tok12","logprobs":null,'
    b'"finish_reason":null,"stop_reason":null}]%s}\n\n',
}


class Upstream:
    """A stand-in UpstreamResponse: `chunks` copies of one chunk, then `[DONE]`."""

    status = 200
    headers = {"content-type": "text/event-stream"}

    def __init__(self, chunk: bytes, chunks: int) -> None:
        self.chunk, self.count = chunk, chunks

    async def chunks(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            yield self.chunk
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        pass


async def cpu_per_chunk(make: Callable[[], RelayResponse], chunks: int) -> float:
    response = make()
    start = time.process_time()
    async for _ in response.body_iterator:
        pass
    return (time.process_time() - start) / chunks * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=9)
    a = p.parse_args()
    rows: list[dict[str, Any]] = []
    for family, template in EVENTS.items():
        plain, with_usage = template % b"", template % USAGE
        path = "/v1/chat/completions" if family == "chat" else "/v1/completions"
        request = InferenceRequest(BY_PATH[path], b"{}", {"model": "tiny", "stream": True}, "tiny", "application/json")
        for per_chunk in (1, 30):
            for usage in (Usage.NONE, Usage.FINAL):
                cases: dict[str, Callable[[], RelayResponse]] = {
                    "relay": lambda c=plain * per_chunk: RelayResponse(Upstream(c, a.chunks)),  # type: ignore[arg-type]
                    # Only a client that asked for the final usage has the router ask for it on every event.
                    "migrating": lambda c=(with_usage if usage is Usage.FINAL else plain) * per_chunk, u=usage, r=request, chat=family == "chat": (
                        MigratingStream(
                            None,  # type: ignore[arg-type]  # no cut here: the migration itself is never asked
                            r,
                            RelayResponse(Upstream(c, a.chunks)),  # type: ignore[arg-type]
                            set(),
                            None,
                            StreamTap(chat, u),
                        )
                    ),
                }
                best = {name: float("inf") for name in cases}
                for _ in range(a.repeat):
                    for name, make in cases.items():
                        best[name] = min(best[name], asyncio.run(cpu_per_chunk(make, a.chunks)))
                row = {
                    "family": family,
                    "events_per_chunk": per_chunk,
                    "client_usage": usage.name.lower(),
                    "relay_us_per_chunk": round(best["relay"], 3),
                    "migrating_us_per_chunk": round(best["migrating"], 3),
                    "added_us_per_event": round((best["migrating"] - best["relay"]) / per_chunk, 3),
                }
                rows.append(row)
                log(str(row))
    write_result("stream_tap", {"benchmark": "stream_tap", "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
