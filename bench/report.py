"""Render bench/results/*.json as Markdown tables: bench/results/summary.md (`--quick`: the *_quick results).

.venv/bin/python bench/report.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def table(header: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines: `header` (its column names, separated by " | "), the separator and a line per row
    (cells written as they are)."""
    return [
        f"| {header} |",
        "|" + "---|" * len(header.split(" | ")),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def context(d: dict[str, Any]) -> str:
    q = d.get("quiet", {})
    m = d.get("machine", {})
    return (
        f"_{d.get('started', '')}, {m.get('cores')} cores, load at start {q.get('loadavg_at_start')}, "
        f"quiet: {q.get('quiet')} (waited {q.get('waited_s')} s, {q.get('other_vllm_engines_at_start')} other "
        f"vLLM engines), load at end {[round(x, 2) for x in d.get('loadavg_end', d.get('loadavg_at_end', []))]}. "
        f"Command: `{d.get('command')}`_\n"
    )


def proxy_cpu(cfg: str, cpu: dict[str, float]) -> float:
    """CPU milliseconds a request of `cfg` cost the proxies in front of the engine (router and worker, or the
    Rust router, or nothing for `direct`)."""
    fixed = {
        "direct": 0.0,
        "rust": cpu.get("rust", 0.0),
        "ours_hybrid": cpu.get("worker", 0) + cpu.get("ray", 0),
        "ours_http_base": cpu.get("worker_base", 0) + cpu.get("router_base", 0),
    }
    if cfg in fixed:
        return fixed[cfg]
    router = f"router_{cfg.split('ours_http_')[-1]}" if cfg.startswith("ours_http_") else "router"
    return cpu.get("worker", 0) + cpu.get(router, 0)


def hot_path(d: dict[str, Any], title: str) -> list[str]:
    out = [
        f"## {title}\n",
        context(d),
        f"Engine: {d['settings'].get('engine', 'vLLM CPU, tiny model')}. "
        "Medians over rounds of each run's statistic; ratios are against `direct` and against the Rust router.\n",
    ]
    s = d["summary"]
    out.append("### Non-streaming (hey, 8 output tokens)\n")
    out += table(
        (
            "c | config | p50 ms | p99 ms | req/s | p50 vs direct | req/s vs direct | p50 vs rust"
            " | req/s vs rust | added p50 ms vs direct | CPU ms/request (router+worker or proxy) | errors"
        ),
        (
            (
                c,
                cfg,
                f(r["p50_ms"]),
                f(r["p99_ms"]),
                f(r["rps"]),
                f(r.get("vs_direct", {}).get("p50_ms"), 2),
                f(r.get("vs_direct", {}).get("rps"), 2),
                f(r.get("vs_rust", {}).get("p50_ms"), 2),
                f(r.get("vs_rust", {}).get("rps"), 2),
                f(r.get("added_p50_ms_vs_direct")),
                f(proxy_cpu(cfg, r["cpu_ms_per_request"]), 2),
                r["errors"],
            )
            for c, rows in s["nonstream"].items()
            for cfg, r in rows.items()
        ),
    )
    out.append("\n### Streaming (vLLM's benchmark client, 16 output tokens)\n")
    out += table(
        (
            "c | config | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | e2e p50 ms | req/s"
            " | TTFT p50 vs direct | req/s vs direct | req/s vs rust | failed"
        ),
        (
            (
                c,
                cfg,
                f(r["ttft_p50_ms"]),
                f(r["ttft_p99_ms"]),
                f(r["itl_p50_ms"]),
                f(r["itl_p99_ms"]),
                f(r["e2el_p50_ms"]),
                f(r["rps"]),
                f(r.get("vs_direct", {}).get("ttft_p50_ms"), 2),
                f(r.get("vs_direct", {}).get("rps"), 2),
                f(r.get("vs_rust", {}).get("rps"), 2),
                r["failed"],
            )
            for c, rows in s["stream"].items()
            for cfg, r in rows.items()
        ),
    )
    paired = [
        (kind, c, cfg, r)
        for kind in ("nonstream", "stream")
        for c, rows in s[kind].items()
        for cfg, r in rows.items()
        if "rps_vs_rust_by_round" in r
    ]
    if paired:
        out.append("\n### Requests per second against the Rust router, paired by round\n")
        out.append(
            "Each round measures every configuration within minutes, so a ratio taken inside one round is "
            "free of the drift between rounds that a ratio of medians carries.\n"
        )
        out += table(
            "load | c | config | median of the rounds' ratios | each round",
            (
                (
                    kind,
                    c,
                    cfg,
                    f(r["rps_vs_rust_paired_median"], 2),
                    ", ".join(f(x, 2) for x in r["rps_vs_rust_by_round"]),
                )
                for kind, c, cfg, r in paired
            ),
        )
    if s.get("ab"):
        out += ab_section(d)
    out.append("\n### Chunk gaps seen by the client (64 tokens, concurrency 1)\n")
    out += table(
        "config | gap p50 ms | gap p99 ms | SSE events per read | events per response | TTFT p50 ms",
        (
            (
                cfg,
                f(r["gap_p50_ms"], 2),
                f(r["gap_p99_ms"], 2),
                f(r["events_per_read"], 3),
                f(r["events_per_response"], 0),
                f(r["ttft_p50_ms"], 2),
            )
            for cfg, r in s["chunk_gaps"].items()
        ),
    )
    if "profile" in d:
        out.append("\n### Where the router's and the worker's CPU goes (py-spy, own time by category)\n")
        columns = list(dict.fromkeys(c for t in d["profile"].values() for c, _ in t["own_by_category_pct"]))
        out += table(
            " | ".join(("process", "samples", *columns)),
            (
                (proc, t["busy_samples"], *(f"{dict(t['own_by_category_pct']).get(c, 0)}%" for c in columns))
                for proc, t in d["profile"].items()
            ),
        )
        out.append(
            "\nBy file or package (own time, the top ten; a C call such as a socket write counts for the Python "
            "line that made it):\n"
        )
        for proc, t in d["profile"].items():
            top = ", ".join(f"{name} {pct}%" for name, pct in t.get("own_by_package_pct", [])[:10])
            out.append(f"- {proc}: {top}")
    return out


def ab_section(d: dict[str, Any]) -> list[str]:
    """--baseline-tree: ours_http (this checkout) against ours_http_base (the baseline checkout), same run."""
    base, ours = d["settings"].get("baseline", {}), d["settings"].get("ours", {})
    out = [
        "\n### A/B: this checkout (ours_http) against the baseline checkout (ours_http_base)\n",
        f"Baseline: `{base.get('tree')}` at {base.get('commit')} ({base.get('changed_files')} changed files); "
        f"this checkout at {ours.get('commit')} ({ours.get('changed_files')} changed files). Two complete "
        "plain-HTTP stacks, measured in the same interleaved rounds; a ratio above 1 means this checkout serves "
        "more requests per second.\n",
    ]
    out += table(
        (
            "load | c | req/s ours | req/s base | ours/base, median of the rounds' ratios | each round"
            " | p50 ms (stream: TTFT) ours / base | router+worker CPU ms/request ours / base"
        ),
        (
            (
                kind,
                c,
                f(v["ours_http_rps"]),
                f(v["ours_http_base_rps"]),
                f(v.get("rps_ratio_paired_median"), 3),
                ", ".join(f(x, 2) for x in v.get("rps_ratio_by_round") or []),
                " / ".join(f(x) for x in v.get("p50_ms", v.get("ttft_p50_ms", []))) or "-",
                " / ".join(f(x, 3) for x in v.get("router_worker_cpu_ms_per_request", [])) or "-",
            )
            for kind in ("nonstream", "stream")
            for c, v in d["summary"]["ab"].get(kind, {}).items()
        ),
    )
    return out


def control(d: dict[str, Any]) -> list[str]:
    out = [
        "## Control calls: router -> manager over HTTP and over Ray\n",
        context(d),
        f"Ray round-trip floor (an empty actor method): p50 {f(d['ray_floor_us']['p50'])} us, "
        f"p99 {f(d['ray_floor_us']['p99'])} us.\n",
    ]
    out += table(
        "models | call | HTTP p50 us | HTTP p99 us | Ray p50 us | Ray p99 us | HTTP/Ray (p50)",
        (
            (
                blk["models"],
                op,
                f(blk["http"][op]["p50"]),
                f(blk["http"][op]["p99"]),
                f(blk["ray"][op]["p50"]),
                f(blk["ray"][op]["p99"]),
                f(blk["http_over_ray_p50"][op], 2),
            )
            for blk in d.get("calls", [])
            for op in blk["http"]
        ),
    )
    if "burst" in d:
        b = d["burst"]
        out.append(
            f"\nBurst of inference through a ready model ({b['requests_ok']} requests in {b['burst_s']} s, "
            f"concurrency {b['concurrency']}): manager calls made by the router during the burst: "
            f"`{b['manager_calls_during_burst']}`; manager CPU during the burst: {b['manager_cpu_s_during_burst']} s.\n"
        )
    return out


def cold(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    ref = s["reference_ttft_s"]
    out = [
        "## Cold start\n",
        context(d),
        "Time to the first token of a request to a model at zero replicas, against vLLM started by hand and then "
        "asked; paired ratios per round (ours / by hand).\n",
    ]
    ways = [(way, s[way]) for way in ("ours", "no_standby", "no_uniproc", "neither") if isinstance(s.get(way), dict)]
    out += table(
        " | n | p50 s | min s | max s | paired ratio (median)",
        [
            (
                "vLLM started by hand, then the request",
                ref["n"],
                f(ref["p50"], 2),
                f(ref["min"], 2),
                f(ref["max"], 2),
                1,
            ),
            *(
                (
                    way,
                    v["ttft_s"]["n"],
                    *(f(v["ttft_s"][k], 2) for k in ("p50", "min", "max")),
                    f(v["paired_ratio_median"], 3),
                )
                for way, v in ways
            ),
        ],
    )
    ours = s.get("ours", {})
    out.append(f"\nOur time split (medians): {ours.get('phases_median_s')}. {d.get('gpu_wake_from_sleep', '')}\n")
    return out


def scale(d: dict[str, Any]) -> list[str]:
    out = ["## Manager scale\n", context(d)]
    out += table(
        (
            "workers | models | replicas | heartbeats/s achieved / offered | hb p50 ms | hb p99 ms"
            " | errors or timeouts | registrations failed or late | manager CPU (cores) | manager RSS MB"
            " | workers healthy/unhealthy/dead"
        ),
        (scale_row(st) for st in d.get("steps", [])),
    )
    c = d.get("core")
    if c:
        out.append(
            f"\nIn-process ManagerCore with {c['workers']} workers, {c['models']} models, {c['replicas']} replicas "
            "(milliseconds, p50 / p99):\n"
        )
        # Results of older runs lack the newer measurements.
        measured = [key for key in CORE_OPERATIONS if key in c]
        out += table(
            "operation | p50 ms | p99 ms | n",
            [
                *((key[:-3], f(c[key].get("p50"), 3), f(c[key].get("p99"), 3), c[key].get("n")) for key in measured),
                (f"first reconcile (places {c['replicas']} replicas)", c["first_reconcile_with_placements_ms"], "", 1),
            ],
        )
    return out


CORE_OPERATIONS = (
    "place_ms",
    "capacity_snapshot_ms",
    "heartbeat_in_core_ms",
    "heartbeat_in_core_without_table_rebuild_ms",
    "rebuild_table_ms",
    "reconcile_pass_ms",
    "reconcile_pass_without_table_rebuild_ms",
    "reconcile_with_one_cold_start_ms",
    "metrics_scrape_ms",
    "loop_gap_during_scrapes_ms",
)


def scale_row(st: dict[str, Any]) -> tuple[Any, ...]:
    hb = st["heartbeats"]
    ws = st.get("workers_by_state") or {}
    return (
        st["workers"],
        st["models"],
        st.get("replicas", "-"),
        f"{hb['achieved_rate_per_s']} / {hb['offered_rate_per_s']}",
        f(hb["latency_ms"]["p50"]),
        f(hb["latency_ms"]["p99"]),
        hb["errors_or_timeouts"],
        hb.get("registrations_failed_or_late", "-"),
        st.get("manager_cpu_busy"),
        st.get("manager_rss_mb"),
        f"{ws.get('healthy', '-')}/{ws.get('unhealthy', '-')}/{ws.get('dead', '-')}",
    )


def relay(d: dict[str, Any]) -> list[str]:
    out = [
        "## The relay's HTTP client alone\n",
        context(d),
        "Each client in its own process, POSTing the relay's request to the instant stand-in engine; medians "
        "over rounds.\n",
    ]
    out += table(
        "c | client | CPU ms/request | user ms | system ms | req/s",
        (
            (
                c,
                name,
                f(v["cpu_ms_per_request"], 3),
                f(v["user_ms_per_request"], 3),
                f(v["system_ms_per_request"], 3),
                f(v["rps"], 0),
            )
            for c, clients in d["summary"].items()
            for name, v in clients.items()
        ),
    )
    return out


def lora(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    out = [
        "## LoRA: first request to an adapter, unloaded against loaded\n",
        context(d),
        *table(
            "request | n | p50 ms | p90 ms | max ms",
            (
                (name, s[name]["n"], *(f(s[name][k]) for k in ("p50", "p90", "max")))
                for name in ("base", "unloaded", "loaded")
            ),
        ),
    ]
    out.append(f"\nLoading the adapter adds {f(s.get('load_adds_ms_median'))} ms (median).")
    return out


def lora_fleet(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    out = [
        "## LoRA: 20 adapters on one engine against separate engines\n",
        context(d),
        *table(" | req/s", ((name, f(v, 2)) for name, v in s["rps"].items())),
        "",
        *table(
            "memory | RSS MB | PSS MB",
            (
                (name, f(s[name]["rss_mb"], 0), f(s[name]["pss_mb"], 0))
                for name in (
                    "one_engine_20_adapters_mb",
                    "separate_per_engine_mb",
                    "separate_20_engines_mb_extrapolated",
                )
            ),
        ),
    ]
    return out


def tenant_keys(d: dict[str, Any]) -> list[str]:
    out = [
        "## Keys made at run time: 10,000 keys with limits against credentials off\n",
        context(d),
        "Medians of the rounds' paired ratios; CPU per request in µs (noauth / envkey / keys).\n",
    ]
    configs = ("noauth", "envkey", "keys")
    out += table(
        "c | keys / noauth | envkey / noauth | router CPU | whole stack CPU",
        (
            (
                c,
                f(v["keys_over_noauth_median"], 3),
                f(v["envkey_over_noauth_median"], 3),
                " / ".join(f(v["router_cpu_us_per_request_median"][k], 0) for k in configs),
                " / ".join(f(v["total_cpu_us_per_request_median"][k], 0) for k in configs),
            )
            for c, v in d["summary"].items()
        ),
    )
    return out


def router_instructions(d: dict[str, Any]) -> list[str]:
    v = d["summary"]
    return [
        "## The router's instructions per request, by client credential (callgrind)\n",
        context(d),
        *table(
            "noauth | envkey | keys | keys / noauth | envkey / noauth",
            [
                (
                    *(f(v["median"][k], 0) for k in ("noauth", "envkey", "keys")),
                    f(v["keys_over_noauth"], 3),
                    f(v["envkey_over_noauth"], 3),
                )
            ],
        ),
    ]


def key_table(d: dict[str, Any]) -> list[str]:
    out = [
        "## A key change: the whole key table against the changes\n",
        context(d),
        *table(
            "per router | bytes | parse ms | apply ms | router ms",
            (
                (name, f(v["bytes"], 0), *(f(v[k], 3) for k in ("parse_ms", "apply_ms", "router_ms")))
                for name, v in d["summary"].items()
                if isinstance(v, dict)
            ),
        ),
    ]
    return out


def main() -> None:
    suffix = "_quick" if "--quick" in sys.argv else ""
    lines = [
        "# Benchmark results (generated by bench/report.py from bench/results/*.json)\n",
        "How to read them: docs/benchmarks.md.\n",
    ]
    for name, fn in (
        (f"hot_path{suffix}", lambda d: hot_path(d, "Hot path: vLLM CPU engine (tiny model)")),
        (f"hot_path_fake{suffix}", lambda d: hot_path(d, "Hot path: instant stand-in engine (proxy cost only)")),
        (f"hot_path_ab{suffix}", lambda d: hot_path(d, "Hot path A/B against a baseline checkout: vLLM CPU engine")),
        (
            f"hot_path_ab_fake{suffix}",
            lambda d: hot_path(d, "Hot path A/B against a baseline checkout: instant stand-in engine"),
        ),
        (f"control_calls{suffix}", control),
        (f"cold_start{suffix}", cold),
        (f"manager_scale{suffix}", scale),
        (f"relay_client{suffix}", relay),
        (f"lora{suffix}", lora),
        (f"lora_fleet{suffix}", lora_fleet),
        (f"tenant_keys{suffix}", tenant_keys),
        (f"router_instructions{suffix}", router_instructions),
        (f"key_table{suffix}", key_table),
    ):
        d = load(name)
        if d is None and not suffix:
            # No full run of this one yet: show the smoke run, and say so.
            d = load(f"{name}_quick")
            if d is not None:
                lines.append(f"_{name}: only a `--quick` smoke run exists; treat its numbers as indicative._\n")
        if d is not None and ("summary" in d or "calls" in d or "steps" in d):
            lines += fn(d)
            lines.append("")
    out = RESULTS / f"summary{suffix}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
