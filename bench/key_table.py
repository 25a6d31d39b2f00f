"""What one key change costs each router with 10,000 keys: the whole key table (as every change and every quiet
long-poll brought it until 2026-11-30) against only the keys changed since the router's version.

In process, the real parts: the manager's KeyRegistry (SQLite in memory) answers `wait_keys` as it does over HTTP
(the JSON the manager's app sends), and a router's KeyRing parses and applies it as router/key_sync.py does.
Rounds alternate the two ways on the same registry; each round changes one key (a new limit) and times, per way,
the manager's JSON, the router's parse and its update of the ring. Also timed: a quiet long-poll's answer (nothing
changed), which the router used to receive whole every LONG_POLL_S.

    .venv/bin/python bench/key_table.py             # 10,000 keys, 20 rounds
    .venv/bin/python bench/key_table.py --quick     # 2,000 keys, 5 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, median, result_header, write_result
from serverless_vllm.manager.keys import KeyRegistry
from serverless_vllm.schemas import KeyLimits, KeyPatch, KeySpec, KeyTable
from serverless_vllm.security.keys import KeyRing


def timed(ring: KeyRing, table: KeyTable, apply: bool = True) -> dict[str, float]:
    """Milliseconds to write the manager's answer (once per version: its app keeps the whole table's bytes), parse
    it on the router and apply it to the ring (`apply`: a quiet long-poll's answer is only parsed)."""
    t0 = time.perf_counter()
    body = table.model_dump_json().encode()
    t1 = time.perf_counter()
    parsed = KeyTable.model_validate_json(body)
    t2 = time.perf_counter()
    if apply:
        ring.update(parsed)
    t3 = time.perf_counter()
    return {"bytes": len(body), "manager_ms": 1e3 * (t1 - t0), "parse_ms": 1e3 * (t2 - t1), "apply_ms": 1e3 * (t3 - t2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--keys", type=int)
    p.add_argument("--rounds", type=int)
    a = p.parse_args()
    n_keys = a.keys or (2000 if a.quick else 10_000)
    rounds = a.rounds or (5 if a.quick else 20)
    keys = KeyRegistry(":memory:", "epoch", lambda: {"tiny"})
    limits = KeyLimits(rpm=1000, tpm=100_000, max_concurrent=8)
    for i in range(n_keys):
        keys.create(KeySpec(name=f"k-{i}", tenant=f"t-{i % 100}", models=["*"], limits=limits))
    whole_ring, changes_ring = KeyRing(), KeyRing()
    whole_ring.update(keys.table())
    changes_ring.update(keys.table())
    runs: dict[str, list[dict[str, float]]] = {"whole": [], "changes": [], "quiet_whole": [], "quiet_changes": []}
    for r in range(rounds):
        keys.update(f"k-{r % n_keys}", KeyPatch(limits=KeyLimits(rpm=2000 + r)))
        # Alternate which way goes first: the second may find caches warm.
        ways = [("whole", whole_ring), ("changes", changes_ring)]
        for way, ring in ways if r % 2 == 0 else ways[::-1]:
            table = keys.table() if way == "whole" else asyncio.run(keys.wait(ring.version, ring.epoch, 0.0))
            runs[way].append(timed(ring, table))
        assert whole_ring.version == changes_ring.version == keys.table().version
        assert len(whole_ring) == len(changes_ring) == n_keys
        runs["quiet_whole"].append(timed(whole_ring, keys.table(), apply=False))
        quiet = asyncio.run(keys.wait(changes_ring.version, "epoch", 0.0))
        assert quiet.keys == []
        runs["quiet_changes"].append(timed(changes_ring, quiet, apply=False))
    summary: dict[str, Any] = {}
    for way, rows in runs.items():
        summary[way] = {k: round(median(row[k] for row in rows) or 0.0, 3) for k in rows[0]}
        summary[way]["router_ms"] = round(median(row["parse_ms"] + row["apply_ms"] for row in rows) or 0.0, 3)
    summary["router_whole_over_changes"] = round(summary["whole"]["router_ms"] / summary["changes"]["router_ms"], 1)
    log(f"{n_keys} keys, {rounds} rounds, medians: {summary}")
    result = {**result_header("key_table"), "settings": {"keys": n_keys, "rounds": rounds}, "summary": summary}
    write_result("key_table" + ("_quick" if a.quick else ""), result)


if __name__ == "__main__":
    main()
