"""Prefix-aware routing (`routing: prefix`) against least-loaded routing on real CPU vLLM engines (issue 21).

One plain-HTTP stack (`svllm manager`, `svllm router`, one `svllm worker` with CPU_SLOTS 2) serves one model with
two replicas: a random Llama made here like the tests' tiny model (its tokenizer, a bigger network), large enough
that a 1,500-token prefill takes far longer than the rest of a request on these CPUs. The model's routing is
switched with `PATCH /v1/models/{alias}` between runs, and the two policies alternate (prefix first in even rounds,
least_loaded first in odd ones), so a slow phase of a noisy machine hits both alike; each run has prompts of its
own (fresh random text, same shape), so no run finds another's prefixes in the engines' caches. Workloads:

  system         8 system prompts of about 1,500 tokens, each with several short user turns, in random order
  conversations  8 conversations that grow: a ~600-token opening, then turns that each add a canned assistant
                 answer and a short user message; turn after turn, the conversations interleaved
  unique         prompts of about 1,500 tokens that share no prefix

Each run sends its requests from `--concurrency` clients (closed loop), streaming, and measures the time to the
first event (TTFT). A round's ratio is mean TTFT with prefix / mean TTFT with least_loaded; the summary gives the
median of the rounds' ratios (paired), and the pooled means. Per run, the engines' own prefix-cache hit rate
(vllm:prefix_cache_hits / queries, summed over both replicas, read through the worker) and, for prefix runs, the
router's (svllm_router_prefix_hit_blocks / blocks). `--kv-blocks N` gives each engine N cache blocks of 128 tokens
(`--num-gpu-blocks-override`; 0: the 1 GiB default, which holds every prompt of a run many times over).

A last part needs no engine: several routers that each learn on their own (as the hybrid mode's router replicas
and gunicorn processes do), fed the system workload's requests through a random load balancer: how many
(prompt, replica) first prefills that costs against one router (or routers that would share their knowledge).

    .venv/bin/python bench/prefix_routing.py --quick      # smoke run
    .venv/bin/python bench/prefix_routing.py              # the run in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CACHE,
    SVLLM,
    Procs,
    base_env,
    free_port,
    http_ok,
    log,
    machine_info,
    median,
    ratio,
    summary,
    tiny_model,
    wait_for_quiet,
    wait_until,
    write_result,
)

ALIAS = "pfx"
POLICIES = ("prefix", "least_loaded")
WORKLOADS = ("system", "conversations", "unique")
BLOCK_TOKENS = 128  # the CPU engine's cache block


# --------------------------------------------------------------------------- the model


def make_model(run_dir: Path, hidden: int, layers: int, max_len: int) -> Path:
    """A random Llama with the tiny model's tokenizer (vocabulary 512) and a bigger network, made once per shape in
    the cache and copied under this run's directory (the run's engines are then recognisable by their command line)."""
    name = f"prefix-llama-h{hidden}-l{layers}"
    cached = CACHE / name
    if not (cached / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        tiny = tiny_model(run_dir)
        staging = CACHE / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny)
        tokenizer.model_max_length = max_len
        tokenizer.save_pretrained(staging)
        heads = hidden // 64  # head_dim 64: the CPU attention kernels refuse smaller heads
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 11 // 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 4),
            head_dim=64,
            max_position_embeddings=max_len,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            torch_dtype="bfloat16",
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(staging, safe_serialization=True)
        staging.rename(cached)
    path = run_dir / "models" / name
    if not path.exists():
        shutil.copytree(cached, path)
    return path


def parameters(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h


# --------------------------------------------------------------------------- prompts


class Text:
    """Random text of a given length in tokens, from a seeded source (each run its own)."""

    def __init__(self, model: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        self._tok = PreTrainedTokenizerFast.from_pretrained(model)
        rng = random.Random(12345)
        letters = "etaoinshrdlucmfwypvbgkqjxz"
        self._words = ["".join(rng.choices(letters[:18], k=rng.randint(2, 7))) for _ in range(3000)]
        sample = " ".join(rng.choices(self._words, k=2000))
        self.chars_per_token = len(sample) / len(self._tok(sample)["input_ids"])

    def __call__(self, rng: random.Random, tokens: int) -> str:
        words, chars, target = [], 0, tokens * self.chars_per_token
        while chars < target:
            word = rng.choice(self._words)
            words.append(word)
            chars += len(word) + 1
        return " ".join(words)

    def tokens(self, text: str) -> int:
        return len(self._tok(text)["input_ids"])


def system_workload(
    text: Text, rng: random.Random, prompts: int, turns: int, tokens: int
) -> list[list[dict[str, str]]]:
    systems = [f"System prompt {i}. " + text(rng, tokens) for i in range(prompts)]
    requests = [(s, t) for s in range(prompts) for t in range(turns)]
    rng.shuffle(requests)
    return [
        [{"role": "system", "content": systems[s]}, {"role": "user", "content": f"Turn {t}: " + text(rng, 24)}]
        for s, t in requests
    ]


def conversation_workload(
    text: Text, rng: random.Random, conversations: int, turns: int, opening: int
) -> list[list[dict[str, str]]]:
    histories = [
        [
            {"role": "system", "content": f"Conversation {c}. " + text(rng, opening)},
            {"role": "user", "content": text(rng, 24)},
        ]
        for c in range(conversations)
    ]
    out = []
    for _ in range(turns):
        order = list(range(conversations))
        rng.shuffle(order)
        for c in order:
            out.append([dict(m) for m in histories[c]])
            histories[c] += [
                {"role": "assistant", "content": text(rng, 48)},
                {"role": "user", "content": text(rng, 24)},
            ]
    return out


def unique_workload(text: Text, rng: random.Random, count: int, tokens: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "system", "content": f"{rng.random()} " + text(rng, tokens)}, {"role": "user", "content": "Go on."}]
        for _ in range(count)
    ]


# --------------------------------------------------------------------------- the stack


class Stack:
    def __init__(self, procs: Procs, model: Path, args: argparse.Namespace) -> None:
        self.procs, self.model, self.args = procs, model, args
        env = {
            **base_env(procs.tmp),
            "SVLLM_AUTH": "off",
            "CPU_SLOTS": "2",
            "STANDBY_ENGINES": "0",
            # Let the OS schedule both engines' threads (vLLM's auto binding would pin both to the same core).
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        }
        mport, rport, wport = free_port(), free_port(), free_port()
        self.url, self.worker_url = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{wport}"
        manager = procs.start("manager", [SVLLM, "manager", "--host", "127.0.0.1", "--port", str(mport)], env)
        wait_until(lambda: manager.check() or http_ok(f"http://127.0.0.1:{mport}/health"), 60, what="manager")
        manager_url = f"http://127.0.0.1:{mport}"
        router = procs.start(
            "router", [SVLLM, "router", "--host", "127.0.0.1", "--port", str(rport), "--manager-url", manager_url], env
        )
        wait_until(lambda: router.check() or http_ok(f"{self.url}/health"), 60, what="router")
        worker = procs.start(
            "worker",
            [
                SVLLM,
                "worker",
                "--worker-id",
                "w1",
                "--host",
                "127.0.0.1",
                "--port",
                str(wport),
                "--manager-url",
                manager_url,
            ],
            env,
        )
        wait_until(lambda: worker.check() or http_ok(f"{self.worker_url}/health"), 60, what="worker")
        self.procs_by_name = {"router": router, "worker": worker}

    def register(self) -> None:
        a = self.args
        extra = ["--enable-prompt-tokens-details"]
        if a.kv_blocks:
            extra += ["--num-gpu-blocks-override", str(a.kv_blocks)]
        spec = {
            "alias": ALIAS,
            "model_name": str(self.model),
            "max_model_len": a.max_len,
            "dtype": a.dtype,
            "min_replicas": 2,
            "max_replicas": 2,
            "idle_timeout_s": 7 * 24 * 3600,
            "target_concurrency": 1000,
            "routing": "prefix",
            "extra_args": extra,
        }
        resp = httpx.post(f"{self.url}/v1/models/register", json=spec, timeout=60)
        resp.raise_for_status()
        t0 = time.monotonic()
        wait_until(self._ready, 900, interval=1, what="two ready replicas")
        log(f"two replicas ready after {time.monotonic() - t0:.0f} s")

    def _ready(self) -> bool:
        for proc in self.procs_by_name.values():
            proc.check()
        info = httpx.get(f"{self.url}/v1/models/{ALIAS}", timeout=10).json()
        if info["state"] == "failed":
            raise RuntimeError(f"model failed: {info.get('last_error')}")
        return [r["state"] for r in info["replicas"]] == ["ready", "ready"]

    def replicas(self) -> list[str]:
        info = httpx.get(f"{self.url}/v1/models/{ALIAS}", timeout=10).json()
        return sorted(r["replica_id"] for r in info["replicas"])

    def set_routing(self, routing: str) -> None:
        resp = httpx.patch(f"{self.url}/v1/models/{ALIAS}", json={"routing": routing}, timeout=30)
        resp.raise_for_status()
        assert resp.json()["policy"]["routing"] == routing
        time.sleep(1.0)  # the router's long-poll brings the new route within milliseconds

    def engine_counters(self) -> dict[str, dict[str, float]]:
        out = {}
        for rid in self.replicas():
            text = httpx.get(f"{self.worker_url}/engines/{rid}/metrics", timeout=30).text
            out[rid] = {
                name: sum(float(v) for v in re.findall(rf"^vllm:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
                for name in ("prefix_cache_hits_total", "prefix_cache_queries_total", "request_success_total")
            }
        return out

    def router_counters(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out = {}
        for name in ("svllm_router_prefix_blocks_total", "svllm_router_prefix_hit_blocks_total"):
            m = re.search(rf'^{name}{{model="{ALIAS}"}} (\S+)$', text, re.M)
            out[name] = float(m.group(1)) if m else 0.0
        return out


# --------------------------------------------------------------------------- load


async def one_request(
    client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": ALIAS,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft": ttft if ttft is not None else time.perf_counter() - t0,
        "latency": time.perf_counter() - t0,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "cached_tokens": details.get("cached_tokens") or 0,
    }


async def drive(
    url: str, requests: list[list[dict[str, str]]], concurrency: int, max_tokens: int
) -> list[dict[str, Any]]:
    """Closed loop: `concurrency` clients take the requests in order; a request of a conversation is sent only after
    the clients took every request before it, as a user answers after reading."""
    results: list[dict[str, Any]] = [{} for _ in requests]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await one_request(client, url, requests[i], max_tokens)

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return results


def build(workload: str, text: Text, rng: random.Random, a: argparse.Namespace) -> list[list[dict[str, str]]]:
    if workload == "system":
        return system_workload(text, rng, a.prompts, a.turns, a.system_tokens)
    if workload == "conversations":
        return conversation_workload(text, rng, a.prompts, a.conversation_turns, a.opening_tokens)
    return unique_workload(text, rng, a.unique, a.system_tokens)


def run_once(stack: Stack, text: Text, workload: str, policy: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    stack.set_routing(policy)
    requests = build(workload, text, random.Random(seed), a)
    engines0, router0 = stack.engine_counters(), stack.router_counters()
    t0 = time.monotonic()
    results = asyncio.run(drive(stack.url, requests, a.concurrency, a.max_tokens))
    wall = time.monotonic() - t0
    engines1, router1 = stack.engine_counters(), stack.router_counters()
    d = {rid: {k: engines1[rid][k] - engines0[rid][k] for k in engines1[rid]} for rid in engines1}
    hits = sum(v["prefix_cache_hits_total"] for v in d.values())
    queries = sum(v["prefix_cache_queries_total"] for v in d.values())
    blocks = router1["svllm_router_prefix_blocks_total"] - router0["svllm_router_prefix_blocks_total"]
    hit_blocks = router1["svllm_router_prefix_hit_blocks_total"] - router0["svllm_router_prefix_hit_blocks_total"]
    ttfts = [r["ttft"] for r in results]
    out = {
        "workload": workload,
        "policy": policy,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "ttft_mean_s": round(statistics.fmean(ttfts), 4),
        "ttft": summary(ttfts, 1.0, 4),
        "prompt_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in results), 1),
        "cached_tokens_share": ratio(
            sum(r["cached_tokens"] for r in results), sum(r["prompt_tokens"] for r in results)
        ),
        "engine_prefix_hit_rate": ratio(hits, queries),
        "router_prefix_hit_ratio": ratio(hit_blocks, blocks) if policy == "prefix" else None,
        "requests_per_replica": sorted(int(v["request_success_total"]) for v in d.values()),
        "ttft_s": [round(t, 3) for t in ttfts],
        "cached_tokens": [r["cached_tokens"] for r in results],
        "prompt_tokens": [r["prompt_tokens"] for r in results],
    }
    log(
        f"{workload:13s} {policy:12s} mean TTFT {out['ttft_mean_s']:.3f} s (p50 {out['ttft']['p50']:.3f}), "
        f"engine hit rate {out['engine_prefix_hit_rate']}, router {out['router_prefix_hit_ratio']}, "
        f"per replica {out['requests_per_replica']}, {wall:.0f} s"
    )
    return out


def probe_prefill(stack: Stack, text: Text, a: argparse.Namespace) -> dict[str, Any]:
    """How long a ~1,500-token prefill takes against a short one, each alone on an idle engine (fresh prompts)."""
    rng = random.Random(999)
    out = {}
    for label, tokens in (("long", a.system_tokens), ("short", 40)):
        times = []
        for _ in range(3):
            messages = [{"role": "user", "content": f"{rng.random()} " + text(rng, tokens)}]
            times.append(asyncio.run(drive(stack.url, [messages], 1, a.max_tokens))[0])
        out[label] = {
            "prompt_tokens": times[0]["prompt_tokens"],
            "ttft_s": [round(t["ttft"], 3) for t in times],
            "latency_s": [round(t["latency"], 3) for t in times],
        }
    log(f"prefill probe: {out}")
    return out


# --------------------------------------------------------------------------- several routers, simulated


def simulate_routers(
    a: argparse.Namespace, replicas: int = 4, routers_list: tuple[int, ...] = (1, 2, 4, 8)
) -> dict[str, Any]:
    """Routers that each learn on their own, behind a random load balancer, on the system workload's sequence
    (prompts of a.system_tokens * 4 characters, one request at a time): the router-side hit ratio and the
    (prompt, replica) first prefills it leads to, against one router (which is what routers sharing their index
    would behave like)."""
    from serverless_vllm.router.policy import RequestKey
    from serverless_vllm.router.prefix import PrefixAffinity
    from serverless_vllm.schemas import Endpoint

    eps = [Endpoint(replica_id=f"r{i}", worker_id="w", url="u") for i in range(replicas)]
    idle = {e.replica_id: 0 for e in eps}
    out = {}
    for n in routers_list:
        rng = random.Random(n)
        routers = [PrefixAffinity(rng=random.Random(i)) for i in range(n)]
        systems = [f"system {i} " + "".join(rng.choices("abcdefgh ", k=a.system_tokens * 4)) for i in range(a.prompts)]
        placed: set[tuple[int, str]] = set()
        blocks = hits = 0
        for _ in range(a.prompts * 20):
            s = rng.randrange(a.prompts)
            key = RequestKey(None, {"messages": [{"role": "system", "content": systems[s]}]}, "chat")
            router = rng.choice(routers)
            before = router.stats.get(ALIAS)
            b0, h0 = (before.blocks, before.hit_blocks) if before else (0, 0)
            chosen = router.pick(ALIAS, eps, idle, key)
            after = router.stats[ALIAS]
            blocks, hits = blocks + after.blocks - b0, hits + after.hit_blocks - h0
            placed.add((s, chosen.replica_id))
        out[str(n)] = {"replicas": replicas, "first_prefills": len(placed), "router_hit_ratio": ratio(hits, blocks)}
    log(f"routers learning on their own: {out}")
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one round, small workloads")
    p.add_argument("--rounds", type=int, default=3, help="rounds (each: every workload under both policies)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--kv-blocks", type=int, default=0, help="cache blocks (128 tokens) per engine; 0: 1 GiB")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="system prompts, and conversations")
    p.add_argument("--turns", type=int, default=4, help="user turns per system prompt, per run")
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--opening-tokens", type=int, default=600)
    p.add_argument("--conversation-turns", type=int, default=4)
    p.add_argument("--unique", type=int, default=12, help="requests of the unique workload, per run")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--quiet-wait", type=float, default=0, help="seconds to wait for a quiet machine first")
    p.add_argument("--tag", default="", help="results in bench/results/prefix_routing_TAG.json")
    p.add_argument("--resummarize", type=Path, help="recompute the summary of a results file, and exit")
    a = p.parse_args()
    if a.resummarize:
        data = json.loads(a.resummarize.read_text())
        data["summary"] = summarize(data["runs"], data["args"]["workloads"].split(","))
        a.resummarize.write_text(json.dumps(data, indent=2) + "\n")
        log(json.dumps(data["summary"], indent=1))
        return
    if a.quick:
        a.rounds, a.prompts, a.turns, a.conversation_turns, a.unique = 1, 4, 2, 3, 4
    workloads = [w for w in a.workloads.split(",") if w]
    quiet = wait_for_quiet(a.quiet_wait)
    procs = Procs("prefix")
    result: dict[str, Any] = {"args": vars(a), "machine": machine_info(), "quiet": quiet, "runs": []}
    t_start = time.monotonic()
    try:
        model = make_model(procs.tmp, a.hidden, a.layers, a.max_len)
        result["model"] = {"hidden": a.hidden, "layers": a.layers, "parameters_m": round(parameters(model) / 1e6, 1)}
        text = Text(model)
        result["chars_per_token"] = round(text.chars_per_token, 3)
        stack = Stack(procs, model, a)
        stack.register()
        result["prefill_probe"] = probe_prefill(stack, text, a)
        for rnd in range(a.rounds):
            for w, workload in enumerate(workloads):
                order = POLICIES if (rnd + w) % 2 == 0 else tuple(reversed(POLICIES))
                for k, policy in enumerate(order):
                    seed = 1000 * rnd + 10 * w + k
                    run = run_once(stack, text, workload, policy, seed, a)
                    run["round"] = rnd
                    result["runs"].append(run)
        result["routers"] = simulate_routers(a)
    finally:
        procs.stop_all()
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    result["summary"] = summarize(result["runs"], workloads)
    log(json.dumps(result["summary"], indent=1))
    write_result("prefix_routing" + ("_quick" if a.quick else "") + (f"_{a.tag}" if a.tag else ""), result)


def uncached(runs: list[dict[str, Any]], policy: str) -> float | None:
    """Prompt tokens the engines computed per request (not served from their cache): the work the routing saves,
    which the machine's noise does not blur as it blurs TTFT."""
    pairs = [
        (p, c)
        for r in runs
        if r["policy"] == policy
        for p, c in zip(r["prompt_tokens"], r["cached_tokens"], strict=True)
    ]
    return round(statistics.fmean(p - c for p, c in pairs), 1) if pairs else None


def summarize(runs: list[dict[str, Any]], workloads: list[str]) -> dict[str, Any]:
    out = {}
    for workload in workloads:
        mine = [r for r in runs if r["workload"] == workload]
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in mine:
            by_round.setdefault(r["round"], {})[r["policy"]] = r
        paired = [
            ratio(v["prefix"]["ttft_mean_s"], v["least_loaded"]["ttft_mean_s"])
            for v in by_round.values()
            if len(v) == 2
        ]

        def pooled(policy: str, field: str, runs_of: list[dict[str, Any]] = mine) -> float | None:
            values = [r[field] for r in runs_of if r["policy"] == policy and r[field] is not None]
            return round(statistics.fmean(values), 4) if values else None

        work = {pol: uncached(mine, pol) for pol in POLICIES}

        out[workload] = {
            "ttft_ratio_per_round": paired,
            "ttft_ratio_median": median(paired),
            "ttft_mean_s": {pol: pooled(pol, "ttft_mean_s") for pol in POLICIES},
            "engine_prefix_hit_rate": {pol: pooled(pol, "engine_prefix_hit_rate") for pol in POLICIES},
            "router_prefix_hit_ratio": pooled("prefix", "router_prefix_hit_ratio"),
            "uncached_prompt_tokens_per_request": work,
            "uncached_ratio": ratio(work["prefix"], work["least_loaded"]),
        }
    return out


if __name__ == "__main__":
    main()
