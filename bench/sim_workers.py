"""Simulated workers for bench/manager_scale.py: real registrations and heartbeats to a real `svllm manager`.

Each simulated worker has 8 GPUs (80 GB each), its own keep-alive HTTP connection, and heartbeats every
`--interval` seconds as the real worker loop does (the next beat goes out one interval after the previous one
was sent, or at once if the reply came later than that). It runs what it is assigned: assignments from heartbeat
replies and from the manager's pushes (PUT <url>/engines, answered by a small server in this process) are
reported back as ready engines in the next heartbeat. Raw asyncio streams with pre-encoded requests keep the
simulator's own CPU cost low (it shares the machine with the manager).

Prints `WINDOW_START` and `WINDOW_END` lines around the measured window, then writes its statistics as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

GPU_MB = 81_559


def gpus_json(i: int) -> list[dict[str, Any]]:
    return [
        {
            "index": g,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": f"GPU-sim-{i:05d}-{g}",
            "memory_total_mb": GPU_MB,
            "memory_free_mb": GPU_MB - 1024,
            "utilization_pct": 0.0,
        }
        for g in range(8)
    ]


class Conn:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        assert self.reader is not None
        try:
            self.writer.write(head + body)
            await self.writer.drain()
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionError("closed")
            status = int(status_line.split()[1])
            length = 0
            while True:
                line = await self.reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line.split(b":", 1)[1])
            payload = await self.reader.readexactly(length) if length else b""
            return status, payload
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Sim:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.assignments: dict[str, list[dict[str, Any]]] = {}
        self.lat: list[float] = []
        self.reg_lat: list[float] = []
        self.sent = self.errors = self.reregisters = self.pushes = self.late = 0
        self.window = (0.0, 0.0)
        self.sink_port = 0

    def wid(self, i: int) -> str:
        return f"sim-{i:05d}"

    def registration(self, i: int) -> bytes:
        return json.dumps(
            {
                "worker_id": self.wid(i),
                "url": f"http://127.0.0.1:{self.sink_port}/w/{self.wid(i)}",
                "gpus": gpus_json(i),
                "cpu_slots": 0,
                "sleep_supported": True,
                "engines": [],
                "version": "sim",
            }
        ).encode()

    def heartbeat(self, i: int, gpus: list[dict[str, Any]]) -> bytes:
        engines = [
            {
                "replica_id": x["replica_id"],
                "alias": x["alias"],
                "state": "ready",
                "gpus": x["gpus"],
                "model_name": x["model_name"],
                "port": 8000,
                "pid": 1,
            }
            for x in self.assignments.get(self.wid(i), [])
        ]
        return json.dumps({"worker_id": self.wid(i), "gpus": gpus, "engines": engines}).encode()

    async def register(self, i: int, conn: Conn) -> None:
        t0 = time.perf_counter()
        status, payload = await conn.request("POST", "/workers/register", self.registration(i))
        self.reg_lat.append(time.perf_counter() - t0)
        if status != 200:
            raise RuntimeError(f"register {status}: {payload[:300]!r}")
        self.assignments[self.wid(i)] = json.loads(payload).get("assignments", [])

    async def worker(self, i: int, conn: Conn, start: float, end: float) -> None:
        gpus = gpus_json(i)
        interval = self.a.interval
        t_next = start + random.random() * interval
        w0, w1 = self.window
        while True:
            now = time.monotonic()
            if t_next > now:
                await asyncio.sleep(t_next - now)
            t_send = time.monotonic()
            if t_send >= end:
                return
            in_window = w0 <= t_send < w1
            try:
                status, payload = await asyncio.wait_for(
                    conn.request("POST", "/workers/heartbeat", self.heartbeat(i, gpus)), self.a.timeout
                )
                dt = time.monotonic() - t_send
                if status != 200:
                    raise RuntimeError(f"heartbeat {status}")
                reply = json.loads(payload)
                if reply.get("reregister"):
                    if in_window:
                        self.reregisters += 1
                    await self.register(i, conn)
                else:
                    self.assignments[self.wid(i)] = reply.get("assignments", [])
                if in_window:
                    self.sent += 1
                    self.lat.append(dt)
                    self.late += dt > interval
            except Exception:
                conn.close()
                if in_window:
                    self.sent += 1
                    self.errors += 1
            t_next = max(t_send + interval, time.monotonic())

    async def sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """PUT /w/<worker>/engines from the manager: take the assignments, answer 200 []."""
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                path = line.split()[1].decode()
                length = 0
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b""):
                        break
                    if h[:15].lower() == b"content-length:":
                        length = int(h.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                parts = path.split("/")
                if len(parts) >= 4 and parts[3] == "engines" and body:
                    self.assignments[parts[2]] = json.loads(body)
                    self.pushes += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, IndexError):
            pass
        finally:
            writer.close()

    async def run(self) -> dict[str, Any]:
        a = self.a
        server = await asyncio.start_server(self.sink, "127.0.0.1", 0, backlog=4096)
        self.sink_port = server.sockets[0].getsockname()[1]
        conns = [Conn("127.0.0.1", a.port, a.token) for _ in range(a.workers)]
        t0 = time.monotonic()
        sem = asyncio.Semaphore(32)

        failed = 0
        registered: set[int] = set()

        async def reg(i: int) -> None:
            nonlocal failed
            async with sem:
                try:
                    await asyncio.wait_for(self.register(i, conns[i]), a.timeout)
                    registered.add(i)
                except Exception:
                    conns[i].close()
                    failed += 1

        # Bounded: a manager too slow to register everyone in time gets heartbeats from the rest (a worker
        # that is not registered is told to register again by its first heartbeat reply).
        regs = [asyncio.create_task(reg(i)) for i in range(a.workers)]
        _, pending = await asyncio.wait(regs, timeout=a.registration_deadline)
        for t in pending:
            t.cancel()
        failed += len(pending)
        for i in set(range(a.workers)) - registered:
            conns[i].close()
        registration_s = time.monotonic() - t0
        start = time.monotonic()
        self.window = (start + a.warmup, start + a.warmup + a.duration)
        end = self.window[1]
        tasks = [asyncio.create_task(self.worker(i, conns[i], start, end)) for i in range(a.workers)]
        await asyncio.sleep(a.warmup)
        print("WINDOW_START", flush=True)
        await asyncio.sleep(a.duration)
        print("WINDOW_END", flush=True)
        await asyncio.wait(tasks, timeout=a.timeout + 5)
        for t in tasks:
            t.cancel()
        for c in conns:
            c.close()
        server.close()
        lat = sorted(self.lat)

        def p(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1000, 2) if lat else None

        expected = a.workers * a.duration / a.interval
        return {
            "workers": a.workers,
            "interval_s": a.interval,
            "window_s": a.duration,
            "registration_s": round(registration_s, 2),
            "registrations_failed_or_late": failed,
            "registration_ms": {"p50": _p(self.reg_lat, 50), "p99": _p(self.reg_lat, 99)},
            "heartbeats_sent": self.sent,
            "heartbeats_expected": int(expected),
            "achieved_rate_per_s": round(self.sent / a.duration, 1),
            "offered_rate_per_s": a.workers / a.interval,
            "latency_ms": {"p50": p(50), "p90": p(90), "p99": p(99), "max": round(lat[-1] * 1000, 2) if lat else None},
            "late_over_interval": self.late,
            "errors_or_timeouts": self.errors,
            "reregisters": self.reregisters,
            "pushes_received": self.pushes,
            "replicas_reported": sum(len(v) for v in self.assignments.values()),
        }


def _p(values: list[float], q: float) -> float | None:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q / 100 * len(v)))] * 1000, 2) if v else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", default="")
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=10.0, help="per request")
    p.add_argument("--registration-deadline", type=float, default=90.0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(Sim(a).run())
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
    main()
