"""LoRA adapters as models (issue 17) on the real vLLM CPU engine, through the official `openai` client.

One stack (manager, router, one worker; a second worker joins for the affinity test) and one base, the tiny Llama
in float32 (vLLM's CPU LoRA path) with `max_loras` 1, registered cold: the first adapter request starts it. The
adapters are made locally (serverless_vllm/testing/tiny_lora.py): random weights from a seed, so each one's
greedy output differs from the base's and from the others'. Tests run in file order on the shared stack.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serverless_vllm.testing.tiny_lora import make_tiny_lora

from .harness import Stack, wait_until

BASE = "tiny-lora-base"
PROMPT = "Hello, how are you"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "ad-one": make_tiny_lora(root / "one", seed=1),
        "ad-two": make_tiny_lora(root / "two", seed=2),
        "ad-rank": make_tiny_lora(root / "rank16", rank=16, seed=3),  # above the base's max_lora_rank 8
        "ad-other": make_tiny_lora(root / "other", hidden=256, seed=4),  # made for a model of another shape
        "ad-missing": root / "missing",  # under the allowed directories, but nothing there
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, adapters: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("lora"), env={"CPU_SLOTS": "1"}).start(workers=1)
    try:
        base = {
            "alias": BASE,
            "model_name": str(tiny_model),
            "dtype": "float32",  # vLLM's CPU LoRA kernels (/work/shared/ENVIRONMENT.md)
            "max_model_len": 512,
            "enable_lora": True,
            "max_loras": 1,
            "max_lora_rank": 8,
            "preload": False,
            "max_replicas": 2,
        }
        assert s.post("/v1/models/register", json=base).status_code == 200
        for alias, path in adapters.items():
            body = {"alias": alias, "base": BASE, "adapter": str(path), "preload": False}  # by their first request
            resp = s.post("/v1/models/register", json=body)
            assert resp.status_code == 200, resp.text
        yield s
    finally:
        s.stop()


def complete(stack: Stack, model: str) -> str:
    out = stack.openai().completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert out.model == model
    return str(out.choices[0].text)


def metric(stack: Stack, name: str, model: str) -> float:
    text = httpx.get(f"{stack.manager.url}/metrics", timeout=10).text
    match = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def base_replicas(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in stack.model(BASE)["replicas"] if r["state"] == "ready"]


def test_an_adapter_at_a_base_scaled_to_zero_is_held_while_the_base_starts_and_it_loads(stack: Stack) -> None:
    listed = {m.id: m for m in stack.openai().models.list().data}
    assert listed["ad-one"].model_extra is not None and listed["ad-one"].model_extra["parent"] == BASE
    assert "parent" not in (listed[BASE].model_extra or {})
    assert stack.model(BASE)["state"] == "cold" and stack.model("ad-one")["state"] == "cold"

    first = complete(stack, "ad-one")  # held: the base cold-starts, then the adapter loads

    info = stack.model("ad-one")
    assert info["state"] == "ready" and info["base"] == BASE
    assert [r["adapters"] for r in info["replicas"]] == [["ad-one"]]
    assert complete(stack, "ad-one") == first  # greedy: the same again
    assert complete(stack, BASE) != first  # the adapter changes the output


def test_the_first_request_loads_an_adapter_and_later_ones_do_not(stack: Stack) -> None:
    complete(stack, "ad-one")
    loads = metric(stack, "svllm_adapter_loads_total", "ad-one")
    assert loads >= 1
    for _ in range(3):
        # Apart by more than a demand report and a pass: an adapter idle between requests stays loaded (up to
        # its idle_timeout_s), it is not unloaded at the first pass without requests.
        time.sleep(2.5)
        complete(stack, "ad-one")
    assert metric(stack, "svllm_adapter_loads_total", "ad-one") == loads
    assert metric(stack, "svllm_adapter_load_seconds_total", "ad-one") > 0


def test_max_loras_one_two_adapters_alternating_unload_the_least_recently_used(stack: Stack) -> None:
    first = {name: complete(stack, name) for name in ("ad-one", "ad-two")}
    assert first["ad-one"] != first["ad-two"]
    before = {name: metric(stack, "svllm_adapter_loads_total", name) for name in first}
    for name in ("ad-one", "ad-two", "ad-one", "ad-two"):
        assert complete(stack, name) == first[name]
        # max_loras 1: the replica holds only the adapter just asked for (the other was unloaded)
        assert [r["adapters"] for r in base_replicas(stack)] == [[name]]
    after = {name: metric(stack, "svllm_adapter_loads_total", name) for name in first}
    assert after == {name: before[name] + 2 for name in first}  # each unloaded and loaded again, twice
    assert metric(stack, "svllm_adapter_unloads_total", "ad-one") >= 2


def test_two_adapters_asked_at_once_on_one_slot_are_all_served(stack: Stack) -> None:
    """max_loras 1 and both adapters asked without pause for longer than an adapter is held (MIN_HOLD_S): they take
    turns on the one slot, each load unloading the other while requests for it keep coming. None is lost (a request
    reaching the engine after its adapter was unloaded would be vLLM's 404, "does not exist")."""
    expected = {name: complete(stack, name) for name in ("ad-one", "ad-two")}
    before = {name: metric(stack, "svllm_adapter_loads_total", name) for name in expected}
    results: dict[str, list[str]] = {name: [] for name in expected}
    end = time.monotonic() + 14

    def client(name: str) -> None:
        while time.monotonic() < end:
            try:
                results[name].append(complete(stack, name))
            except Exception as exc:  # recorded: the assertion below shows it, a dying thread would not
                results[name].append(repr(exc)[:300])

    threads = [threading.Thread(target=client, args=(name,)) for name in expected for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert {name: set(texts) for name, texts in results.items()} == {name: {text} for name, text in expected.items()}
    loads = {name: metric(stack, "svllm_adapter_loads_total", name) - before[name] for name in expected}
    assert min(loads.values()) >= 1, loads  # they took turns while both were asked


@pytest.mark.parametrize(
    ("alias", "reason"),
    [
        ("ad-missing", "No adapter found"),
        ("ad-rank", "LoRA rank 16 is greater than max_lora_rank 8"),
        ("ad-other", "must match the size of tensor"),
    ],
)
def test_an_adapter_the_engine_refuses_fails_with_its_reason(stack: Stack, alias: str, reason: str) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        complete(stack, alias)
    assert err.value.status_code == 503
    body = err.value.response.json()["error"]
    assert body["code"] == "model_failed" and reason in body["message"]
    info = stack.model(alias)
    assert info["state"] == "failed" and reason in info["last_error"]
    assert complete(stack, "ad-one")  # the engine still serves


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"alias": "x1", "base": "nope", "adapter": "org/adapter"}, 400, "base 'nope' of adapter 'x1' is not"),
        ({"alias": "x2", "base": "ad-one", "adapter": "org/adapter"}, 400, "is itself an adapter"),
        ({"alias": "x3", "base": BASE, "adapter": "/etc/adapter"}, 400, "must lie under one of the allowed"),
        ({"alias": "x4", "base": BASE, "adapter": "org/a", "dtype": "float16"}, 400, "dtype belong to the base's"),
        ({"alias": "x5", "base": BASE, "model_name": "org/x"}, 400, "needs both 'base'"),
    ],
)
def test_a_bad_adapter_registration_is_refused(stack: Stack, body: dict[str, Any], status: int, message: str) -> None:
    resp = stack.post("/v1/models/register", json=body)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]["message"]


def test_clients_never_reach_the_engine_adapter_api(stack: Stack) -> None:
    worker = stack.workers["w1"]
    for url in (stack.router.url, worker.url):
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            resp = httpx.post(f"{url}{path}", json={"lora_name": "x", "lora_path": "/tmp"}, timeout=10)
            assert resp.status_code == 404, (url, path, resp.text)


def test_requests_for_an_adapter_go_to_the_base_replica_that_holds_it(stack: Stack) -> None:
    stack.add_worker("w2")
    resp = httpx.patch(f"{stack.router.url}/v1/models/{BASE}", json={"min_replicas": 2}, timeout=10)
    assert resp.status_code == 200, resp.text
    wait_until(lambda: len(base_replicas(stack)) == 2, 240, interval=0.5, what="two ready base replicas")
    first = complete(stack, "ad-two")
    for _ in range(6):  # a replica without it would answer 404 (vLLM: the model does not exist)
        assert complete(stack, "ad-two") == first
    holders = [r for r in base_replicas(stack) if "ad-two" in r["adapters"]]
    assert len(holders) == 1
    assert [r["replica_id"] for r in stack.model("ad-two")["replicas"]] == [holders[0]["replica_id"]]


def test_deleting_an_adapter_unloads_it_and_a_base_with_adapters_needs_cascade(stack: Stack) -> None:
    complete(stack, "ad-one")
    resp = httpx.delete(f"{stack.router.url}/v1/models/{BASE}", timeout=10)
    assert resp.status_code == 409 and "?cascade=true" in resp.json()["error"]["message"]

    assert httpx.delete(f"{stack.router.url}/v1/models/ad-one", timeout=10).status_code == 200
    wait_until(lambda: all("ad-one" not in r["adapters"] for r in base_replicas(stack)), 30, what="ad-one unloaded")
    with pytest.raises(openai.NotFoundError):
        complete(stack, "ad-one")

    assert httpx.delete(f"{stack.router.url}/v1/models/{BASE}?cascade=true", timeout=30).status_code == 200
    names = {m.id for m in stack.openai().models.list().data}
    assert not names & {BASE, "ad-two", "ad-rank"}


def test_a_preloaded_adapter_is_loaded_before_its_first_request(
    stack: Stack, tiny_model: Path, adapters: dict[str, Path]
) -> None:
    """`preload` (the default for an adapter, as for a model): registered while its base starts, an adapter is put
    in a free slot once the base is ready, with no request; its first request finds it loaded. max_loras 1: the
    second one registered finds the slot taken and is left to its first request (a preload unloads nothing)."""
    base = {
        "alias": "tiny-lora-pre",
        "model_name": str(tiny_model),
        "dtype": "float32",
        "max_model_len": 512,
        "enable_lora": True,
        "max_loras": 1,
        "max_lora_rank": 8,
    }
    assert stack.post("/v1/models/register", json=base).status_code == 200  # preload: it starts now
    for alias, weights in (("pre-one", adapters["ad-one"]), ("pre-two", adapters["ad-two"])):
        resp = stack.post(
            "/v1/models/register", json={"alias": alias, "base": "tiny-lora-pre", "adapter": str(weights)}
        )
        assert resp.status_code == 200, resp.text
    wait_until(lambda: stack.model("pre-one")["state"] == "ready", 240, interval=0.5, what="pre-one preloaded")
    assert metric(stack, "svllm_adapter_loads_total", "pre-one") == 1
    assert stack.model("pre-two")["state"] == "cold"
    first = complete(stack, "pre-one")
    assert metric(stack, "svllm_adapter_loads_total", "pre-one") == 1  # no load of its own: it was there
    assert complete(stack, "pre-two") != first  # its first request loads it, unloading pre-one
    assert metric(stack, "svllm_adapter_loads_total", "pre-two") == 1
