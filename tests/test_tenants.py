"""Keys as data, limits, usage and fair queueing, end to end: a real manager, two real routers and a worker with
a real CPU vLLM engine, credentials on; keys made through the router's key API and used with the official `openai`
client.

One stack for the module: router A enforces each key's whole limits and queues at the cap in arrival order
(FAIR_QUEUE=fifo); router B is told two routers share the limits (KEY_LIMIT_ROUTERS=2: it enforces half, rounded
up) and queues fairly between tenants (FAIR_QUEUE=fair).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from .harness import VENV_BIN, Service, free_port, metric_sum, wait_until
from .secure_harness import ADMIN_KEY, API_KEY, WORKER_TOKEN, SecureStack, bearer

ALIAS = "tiny"
CAP = 2  # requests in flight per replica, per router
ENGINE_SEQS = 2  # requests the engine runs at once (vLLM's --max-num-seqs)
# The flood's requests: long enough that one batch of the engine outlasts a loaded machine's delay in the client
# threads that note each answer (at 8 tokens a CI run saw the FIFO baseline's order blur by 6 answers).
FLOOD_TOKENS = 32
LONG_TOKENS = 16000  # the streams that hold slots: minutes of generation, closed (aborted) by the tests
LATE_TOKENS = 64  # the late request's length: the margin between the two first tokens served_first orders
CHAT = [{"role": "user", "content": "Tell me a long story about the sea and its ships."}]
EOS = {"ignore_eos": True}  # every answer as long as asked


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[SecureStack]:
    # Router A waits at a model's cap in arrival order (the baseline), router B fairly between tenants.
    # The engine may run past the tiny model's 2048 positions (random weights: no quality to lose) so that the long
    # streams holding slots cannot end by themselves while a test waits, even on a loaded machine.
    env = {
        "CPU_SLOTS": "1",
        "MAX_INFLIGHT_PER_REPLICA": str(CAP),
        "FAIR_QUEUE": "fifo",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
    }
    s = SecureStack(tmp_path_factory.mktemp("tenants"), env=env).start(workers=1)
    port = free_port()
    router_b = Service(
        "router-b",
        ["router", "--host", "127.0.0.1", "--port", str(port), "--manager-url", s.manager.url],
        port,
        {**s.env, "KEY_LIMIT_ROUTERS": "2", "FAIR_QUEUE": "fair"},
        s.tmp,
    )
    s.workers["router-b"] = router_b  # stopped with the stack
    try:
        router_b.start()
        # Engines schedule by priority (the router passes each key's class on), two requests running at a time:
        # a third waits in the engine, where the priority decides (test_the_engine_serves_a_high_class_first).
        s.register(
            ALIAS,
            tiny_model,
            max_model_len=LONG_TOKENS + 256,
            min_replicas=1,
            max_replicas=1,
            scheduling_policy="priority",
            extra_args=["--max-num-seqs", str(ENGINE_SEQS)],
        )
        s.wait_model(ALIAS, "ready", timeout=300)
        yield s
    finally:
        s.stop()


def router_b(stack: SecureStack) -> str:
    return stack.workers["router-b"].url


def create_key(stack: SecureStack, **spec: Any) -> dict[str, Any]:
    resp = stack.post("/v1/keys", json=spec)
    assert resp.status_code == 200, resp.text
    created: dict[str, Any] = resp.json()
    return created


def client(stack: SecureStack, secret: str, url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url or stack.router.url}/v1", api_key=secret, max_retries=0, timeout=120)


def on_router_b(stack: SecureStack, secret: str) -> openai.OpenAI:
    """A client of router B once B knows the key (learnt by long-poll; no bound is promised but revocation's):
    its first request served, 2 tokens, which counts against the key's limits and usage there."""
    c = client(stack, secret, router_b(stack))
    wait_until(lambda: chat(c, 2).status_code == 200, 30, what="router B knows the key")
    return c


def chat(c: openai.OpenAI, max_tokens: int = 16, **kw: Any) -> Any:
    return c.chat.completions.with_raw_response.create(
        model=ALIAS, messages=CHAT, max_tokens=max_tokens, extra_body=EOS, **kw
    )


def test_create_use_limit_and_revoke_a_key_with_the_openai_client(stack: SecureStack) -> None:
    created = create_key(stack, name="team-a-app", tenant="team-a", limits={"rpm": 3})
    secret = created["secret"]
    assert secret.startswith("sk-svllm-") and created["prefix"] == secret[:13]
    listed = stack.get("/v1/keys").json()["data"]
    shown = next(k for k in listed if k["name"] == "team-a-app")
    assert "secret" not in shown and "digest" not in shown and secret not in json.dumps(listed)

    c = client(stack, secret)
    remaining = []
    for _ in range(3):
        raw = chat(c)
        assert raw.parse().usage.completion_tokens == 16
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as throttled:
        chat(c)
    error = throttled.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    # 3 per minute: the next request is possible in 20 s at most (about 20 s less the time the three took).
    assert 1 <= int(error.response.headers["retry-after"]) <= 20
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    # The openai client's own retry logic reads these headers: with retries allowed it would wait, not fail fast.
    assert c._parse_retry_after_header(error.response.headers) == int(error.response.headers["retry-after-ms"]) / 1000

    resp = httpx.delete(f"{stack.router.url}/v1/keys/team-a-app", headers=bearer(ADMIN_KEY), timeout=30)
    assert resp.status_code == 200 and resp.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as refused:
        chat(c)
    assert refused.value.status_code == 401 and refused.value.code == "revoked_api_key"


def test_bad_input_is_a_clear_400_and_only_the_admin_manages_keys(stack: SecureStack) -> None:
    create_key(stack, name="dup", tenant="t")
    cases = {
        "malformed limits": ({"name": "x1", "tenant": "t", "limits": {"rpm": 0}}, "invalid_request"),
        "limits of the wrong type": ({"name": "x2", "tenant": "t", "limits": {"tpm": "lots"}}, "invalid_request"),
        "an unknown limit": ({"name": "x3", "tenant": "t", "limits": {"rph": 5}}, "invalid_request"),
        "an unknown model": ({"name": "x4", "tenant": "t", "models": [ALIAS, "no-such-model"]}, "unknown_model"),
        "a duplicate name": ({"name": "dup", "tenant": "t"}, "duplicate_key_name"),
        "an expiry in the past": ({"name": "x5", "tenant": "t", "expires_at": 1000.0}, "invalid_expiry"),
        "no models": ({"name": "x6", "tenant": "t", "models": []}, "invalid_request"),
    }
    for case, (body, code) in cases.items():
        resp = stack.post("/v1/keys", json=body)
        assert resp.status_code == 400, (case, resp.text)
        assert resp.json()["error"]["code"] == code, case
    names = {k["name"] for k in stack.get("/v1/keys").json()["data"]}
    assert not names & {"x1", "x2", "x3", "x4", "x5", "x6"}
    # A client key (of the environment, or made here) cannot manage keys.
    made = create_key(stack, name="not-admin", tenant="t")["secret"]
    for key in (API_KEY, made):
        resp = httpx.post(f"{stack.router.url}/v1/keys", json={"name": "y", "tenant": "t"}, headers=bearer(key))
        assert resp.status_code == 401, resp.text
        assert httpx.get(f"{stack.router.url}/v1/keys", headers=bearer(key)).status_code == 401
    assert stack.get("/v1/keys/no-such-key").status_code == 404


def test_a_key_sees_only_its_models_and_an_expired_key_is_refused(stack: SecureStack) -> None:
    outside = client(stack, create_key(stack, name="other-models", tenant="t", models=["other-*"])["secret"])
    with pytest.raises(openai.NotFoundError) as hidden:
        outside.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=4)
    # The same answer as for a model that does not exist: the key does not learn which models are registered.
    with pytest.raises(openai.NotFoundError) as unknown:
        client(stack, API_KEY).chat.completions.create(model="nothing-here", messages=CHAT, max_tokens=4)
    assert hidden.value.code == unknown.value.code == "model_not_found"
    assert hidden.value.message == unknown.value.message.replace("nothing-here", ALIAS)
    assert [m.id for m in outside.models.list()] == []  # its list holds none of the registered models
    with pytest.raises(openai.NotFoundError):
        outside.models.retrieve(ALIAS)
    inside = client(stack, create_key(stack, name="glob", tenant="t", models=["ti*"])["secret"])
    assert chat(inside, 4).parse().usage.completion_tokens == 4
    assert [m.id for m in inside.models.list()] == [ALIAS]
    # A tenant's key is shown what it needs of a model, not the fleet's side of it (workers, engine, log lines).
    shown = inside.models.retrieve(ALIAS)
    assert (shown.id, shown.owned_by, shown.model_extra["state"]) == (ALIAS, "serverless-vllm", "ready")
    assert set(shown.model_extra) == {"state", "phase", "expected_ready_s", "task", "base", "last_error"}
    assert "replicas" in stack.get(f"/v1/models/{ALIAS}").json()  # the admin key's view has them

    expiring = create_key(stack, name="short-lived", tenant="t", expires_at=time.time() + 2.0)
    c = client(stack, expiring["secret"])
    assert chat(c, 4).status_code == 200
    time.sleep(max(0.0, expiring["expires_at"] - time.time()) + 0.1)
    with pytest.raises(openai.AuthenticationError) as expired:
        chat(c, 4)
    assert expired.value.code == "expired_api_key"


def test_tokens_per_minute_count_prompt_and_completion_and_streams_keep_their_shape(stack: SecureStack) -> None:
    # 100 tokens per minute: one request of about 20 prompt tokens and 96 completion tokens takes it below zero.
    c = client(stack, create_key(stack, name="tpm", tenant="team-t", limits={"tpm": 100})["secret"])
    stream = c.chat.completions.create(
        model=ALIAS, messages=CHAT, max_tokens=96, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    # The router asked the engine for usage (to count the tokens) and took the usage event out again: the client
    # did not ask for it.
    assert chunks and all(ch.usage is None and ch.choices for ch in chunks)
    assert sum(1 for ch in chunks if ch.choices[0].delta.content is not None and ch.choices[0].finish_reason is None)
    with pytest.raises(openai.RateLimitError) as throttled:
        chat(c, 4)
    headers = throttled.value.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "100" and headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(headers["retry-after"]) >= 10  # at least the 16+ tokens below zero, refilled at 100 per minute

    # A client that asks for usage gets it, once, at the end.
    asking = client(stack, create_key(stack, name="tpm-asks", tenant="team-t", limits={"tpm": 100_000})["secret"])
    chunks = list(
        asking.chat.completions.create(
            model=ALIAS,
            messages=CHAT,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    with_usage = [ch for ch in chunks if ch.usage is not None]
    assert len(with_usage) == 1 and with_usage[0].usage.completion_tokens == 8 and not with_usage[0].choices


def test_concurrency_limit_holds_while_a_request_is_in_flight(stack: SecureStack) -> None:
    secret = create_key(stack, name="one-at-a-time", tenant="t", limits={"max_concurrent": 1})["secret"]
    c = client(stack, secret)
    # A long stream (minutes of generation) is in flight while the second one comes.
    body = {"model": ALIAS, "messages": CHAT, "max_tokens": LONG_TOKENS, "stream": True, "ignore_eos": True}
    url = f"{stack.router.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=bearer(secret), timeout=120) as first:
        chunks = first.iter_bytes()  # kept: a dropped iterator closes the stream
        assert first.status_code == 200 and next(chunks).startswith(b"data: ")
        with pytest.raises(openai.RateLimitError) as throttled:
            chat(c, 4)
        assert "1 requests in flight" in throttled.value.message
    # The first one was closed by its client: its slot is free again.
    assert wait_until(lambda: chat(c, 4), 30, what="the slot freed").parse().usage.completion_tokens == 4


def test_revocation_reaches_the_second_router_within_2_s(stack: SecureStack) -> None:
    secret = create_key(stack, name="two-routers", tenant="t")["secret"]
    on_router_b(stack, secret)
    resp = httpx.delete(f"{stack.router.url}/v1/keys/two-routers", headers=bearer(ADMIN_KEY), timeout=30)
    assert resp.status_code == 200
    revoked_at = time.monotonic()

    def refused_on_b() -> bool:
        r = httpx.get(f"{router_b(stack)}/v1/models", headers=bearer(secret), timeout=5)
        return r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"

    wait_until(refused_on_b, 2.0, interval=0.05, what="router B refusing the revoked key")
    assert time.monotonic() - revoked_at < 2.0


def test_a_key_changed_through_the_router_keeps_what_was_not_given_and_both_routers_apply_it(
    stack: SecureStack,
) -> None:
    expires_at = time.time() + 3600
    created = create_key(stack, name="changing", tenant="t", limits={"rpm": 100}, priority="low", expires_at=expires_at)
    secret = created["secret"]
    c_a, c_b = client(stack, secret), on_router_b(stack, secret)

    def patch(body: dict[str, Any]) -> httpx.Response:
        return httpx.patch(f"{stack.router.url}/v1/keys/changing", json=body, headers=bearer(ADMIN_KEY), timeout=30)

    # Only the limits: the router passes on the fields given, not a null for every other (which would clear the
    # expiry, and is refused for the tenant and the priority).
    resp = patch({"limits": {"rpm": 1}})
    assert resp.status_code == 200, resp.text
    changed = resp.json()
    assert changed["limits"] == {"rpm": 1, "tpm": None, "max_concurrent": None}
    assert (changed["tenant"], changed["priority"], changed["expires_at"]) == ("t", "low", expires_at)
    assert stack.get("/v1/keys/changing").json() == changed
    # An explicit null expiry is the way to have none; a null tenant is refused.
    resp = patch({"expires_at": None})
    assert resp.status_code == 200 and resp.json()["expires_at"] is None, resp.text
    resp = patch({"tenant": None})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request", resp.text

    # The new limit, with new buckets: one request a minute on this router, and on router B once the key table
    # reaches it (it enforces half of each limit, rounded up: one too).
    assert chat(c_a, 2).headers["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(openai.RateLimitError):
        chat(c_a, 2)

    def limit_on_b() -> str:
        return str(chat(c_b, 2).headers["x-ratelimit-limit-requests"])

    wait_until(lambda: limit_on_b() == "1", 30, interval=0.05, what="router B applying the new limit")
    with pytest.raises(openai.RateLimitError):
        chat(c_b, 2)


def test_a_keys_stored_responses_are_its_own(stack: SecureStack) -> None:
    mine = client(stack, create_key(stack, name="responses-a", tenant="ra")["secret"])
    other = client(stack, create_key(stack, name="responses-b", tenant="rb")["secret"])
    made = mine.responses.create(model=ALIAS, input="Tell me about ships.", max_output_tokens=4)
    assert mine.responses.retrieve(made.id).id == made.id
    # Another tenant's key is told what it would be told of an id that never was: nothing to read, cancel, continue.
    with pytest.raises(openai.NotFoundError) as hidden:
        other.responses.retrieve(made.id)
    assert hidden.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(made.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=ALIAS, input="And then?", previous_response_id=made.id, max_output_tokens=4)
    # Its maker continues it; an environment key (the operator's) reads every response.
    more = mine.responses.create(model=ALIAS, input="And then?", previous_response_id=made.id, max_output_tokens=4)
    assert more.previous_response_id == made.id
    assert client(stack, API_KEY).responses.retrieve(more.id).id == more.id


def test_limits_are_split_between_the_routers_that_share_them(stack: SecureStack) -> None:
    """Router B was told two routers share each key's limits: of 4 requests per minute it lets 2 through."""
    secret = create_key(stack, name="split", tenant="t", limits={"rpm": 4})["secret"]
    c_b = on_router_b(stack, secret)  # 1 of its 2
    raw = chat(c_b, 2)
    assert raw.headers["x-ratelimit-limit-requests"] == "2" and raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        chat(c_b, 2)
    c_a = client(stack, secret)
    assert [chat(c_a, 2).headers["x-ratelimit-limit-requests"] for _ in range(4)] == ["4"] * 4
    with pytest.raises(openai.RateLimitError):
        chat(c_a, 2)


def test_usage_matches_what_the_clients_received(stack: SecureStack) -> None:
    secret = create_key(stack, name="metered", tenant="team-u")["secret"]
    c = client(stack, secret)
    prompt = completion = 0
    for n in (3, 7):
        usage = chat(c, n).parse().usage
        prompt, completion = prompt + usage.prompt_tokens, completion + usage.completion_tokens
    streamed = list(
        c.chat.completions.create(
            model=ALIAS, messages=CHAT, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    last = streamed[-1].usage
    prompt, completion = prompt + last.prompt_tokens, completion + last.completion_tokens
    # Streams whose events are named (`event:` lines): the Responses API's and Anthropic's Messages (the official
    # `anthropic` client, which sends the key as x-api-key).
    events = list(c.responses.create(model=ALIAS, input="tell me", max_output_tokens=6, stream=True))
    done = events[-1].response.usage
    prompt, completion = prompt + done.input_tokens, completion + done.output_tokens
    claude = anthropic.Anthropic(base_url=stack.router.url, api_key=secret, max_retries=0, timeout=120)
    with claude.messages.stream(model=ALIAS, max_tokens=7, messages=CHAT) as stream:
        message = stream.get_final_message()
    prompt, completion = prompt + message.usage.input_tokens, completion + message.usage.output_tokens
    with pytest.raises(openai.BadRequestError):  # the engine refuses more tokens than the context: one error
        c.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=LONG_TOKENS + 1000)

    own = httpx.get(f"{stack.router.url}/v1/usage", headers=bearer(secret), timeout=10).json()["data"]
    assert own == [
        {
            "key_id": own[0]["key_id"],
            "key_name": "metered",
            "tenant": "team-u",
            "model": ALIAS,
            "requests": 6,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "errors": 1,
            "throttled": 0,
        }
    ]
    # The admin key sees every key, or one by its id or name; a key sees its own only.
    everyone = stack.get("/v1/usage").json()["data"]
    assert {r["key_name"] for r in everyone} >= {"metered", "team-a-app"}
    assert stack.get("/v1/usage", params={"key": "metered"}).json()["data"] == own
    assert stack.get("/v1/usage", params={"key": own[0]["key_id"]}).json()["data"] == own
    assert stack.get("/v1/usage", params={"key": "no-such-key"}).status_code == 404
    for asked in ({"key": "team-a-app"}, {"tenant": "team-a"}):
        other = httpx.get(f"{stack.router.url}/v1/usage", params=asked, headers=bearer(secret), timeout=10)
        assert (other.status_code, other.json()["error"]["code"]) == (403, "forbidden"), asked
    assert httpx.get(f"{stack.router.url}/v1/usage?key=metered", headers=bearer(secret)).json()["data"] == own
    assert httpx.get(f"{stack.router.url}/v1/usage", headers=bearer(API_KEY)).status_code == 403
    metrics = httpx.get(f"{stack.router.url}/metrics", timeout=10).text
    assert f'svllm_tenant_prompt_tokens_total{{model="{ALIAS}",tenant="team-u"}} {float(prompt)}' in metrics
    assert f'svllm_tenant_completion_tokens_total{{model="{ALIAS}",tenant="team-u"}} {float(completion)}' in metrics
    assert secret not in metrics and own[0]["key_id"] not in metrics  # tenants and models only
    # The manager's counters: every router's reports summed (the flush before GET /v1/usage sent this one's).
    summed = httpx.get(f"{stack.router.url}/manager/metrics", timeout=10).text
    for name, value in (("requests", 6), ("prompt_tokens", prompt), ("completion_tokens", completion), ("errors", 1)):
        assert f'svllm_usage_{name}_total{{tenant="team-u",model="{ALIAS}"}} {float(value)}' in summed, name
    assert secret not in summed and own[0]["key_id"] not in summed


def usage_of(url: str, secret: str) -> list[tuple[str, int, int, int]]:
    rows = httpx.get(f"{url}/v1/usage", headers=bearer(secret), timeout=10).json()["data"]
    return [(r["key_name"], r["requests"], r["prompt_tokens"], r["completion_tokens"]) for r in rows]


def test_usage_is_summed_over_routers_and_outlives_a_router_restart(stack: SecureStack) -> None:
    """Each router process reports its counts to the manager; GET /v1/usage on either router answers the sum, and
    what router B counted stays after B restarts (it reports a last time as it stops)."""
    secret = create_key(stack, name="two-router-usage", tenant="team-s")["secret"]
    on_router_b(stack, secret)
    total = [1, 0, 0]  # requests, prompt and completion tokens (the first request's tokens are added below)
    first = usage_of(router_b(stack), secret)
    total[1:] = first[0][2:]
    for url, n in ((stack.router.url, 3), (router_b(stack), 5), (stack.router.url, 2)):
        usage = chat(client(stack, secret, url), n).parse().usage
        total = [total[0] + 1, total[1] + usage.prompt_tokens, total[2] + usage.completion_tokens]
    expected = [("two-router-usage", *total)]
    assert first == [("two-router-usage", 1, first[0][2], 2)]
    # Router A's read brings A's counts up to date; B's arrive with its next report (REPORT_INTERVAL, 1 s).
    wait_until(lambda: usage_of(stack.router.url, secret) == expected, 10, what=f"router A showing {expected}")
    usage = chat(client(stack, secret, router_b(stack)), 4).parse().usage
    expected = [("two-router-usage", total[0] + 1, total[1] + usage.prompt_tokens, total[2] + 4)]
    stack.workers["router-b"].stop()  # at once: this request is counted only in B's last report
    stack.workers["router-b"].start()
    assert usage_of(router_b(stack), secret) == expected
    assert usage_of(stack.router.url, secret) == expected
    everyone = {r["key_name"]: r["requests"] for r in stack.get("/v1/usage?tenant=team-s").json()["data"]}
    assert everyone == {"two-router-usage": expected[0][1]}


def test_the_keys_command(stack: SecureStack) -> None:
    env = {"SVLLM_ADMIN_KEY": ADMIN_KEY, "ROUTER_URL": stack.router.url, "PATH": str(VENV_BIN)}
    svllm = [str(VENV_BIN / "svllm"), "keys"]

    def run(*args: str) -> str:
        done = subprocess.run([*svllm, *args], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # A value given is passed on as given: a limit of 0 is refused by the router, not dropped (a key without it).
    done = subprocess.run(
        [*svllm, "create", "--name", "zero", "--tenant", "cli", "--rpm", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1 and done.stderr.startswith("svllm keys create failed (400 invalid_request): limits.rpm")
    secret = run("create", "--name", "cli-key", "--tenant", "cli", "--model", ALIAS, "--rpm", "10").strip()
    assert secret.startswith("sk-svllm-")
    assert chat(client(stack, secret), 2).headers["x-ratelimit-limit-requests"] == "10"
    listing = run("list")
    line = next(row for row in listing.splitlines() if " cli-key " in row)
    assert " active " in line and "rpm=10" in line and secret not in listing
    usage = run("usage", "--tenant", "cli").splitlines()
    assert len(usage) == 2 and usage[1].split()[:4] == ["cli", "cli-key", ALIAS, "1"], usage  # one request so far
    assert json.loads(run("usage", "--tenant", "cli", "--json"))[0]["completion_tokens"] == 2
    assert [r["key_name"] for r in json.loads(run("usage", "--key", "cli-key", "--json"))] == ["cli-key"]
    # An update changes the flags given: a limit given joins the others (the API replaces limits as a whole).
    assert run("update", "cli-key", "--tpm", "5000", "--priority", "high").startswith("updated cli-key (key-")
    shown = json.loads(run("show", "cli-key"))
    assert (shown["limits"], shown["priority"], shown["tenant"]) == (
        {"rpm": 10, "tpm": 5000, "max_concurrent": None},
        "high",
        "cli",
    )
    assert "revoked cli-key" in run("revoke", "cli-key")
    assert " revoked " in next(row for row in run("list").splitlines() if " cli-key " in row)
    with pytest.raises(openai.AuthenticationError):
        chat(client(stack, secret), 2)


def test_a_tenants_limits_are_shared_by_its_keys(stack: SecureStack) -> None:
    resp = httpx.put(
        f"{stack.router.url}/v1/tenants/shared-team", json={"rpm": 2}, headers=bearer(ADMIN_KEY), timeout=30
    )
    assert resp.status_code == 200 and resp.json()["limits"]["rpm"] == 2
    assert {"tenant": "shared-team", "limits": {"rpm": 2, "tpm": None, "max_concurrent": None}} in stack.get(
        "/v1/tenants"
    ).json()["data"]
    first = client(stack, create_key(stack, name="shared-1", tenant="shared-team")["secret"])
    second = client(stack, create_key(stack, name="shared-2", tenant="shared-team", limits={"rpm": 100})["secret"])
    assert chat(first, 2).headers["x-ratelimit-limit-requests"] == "2"  # no limits of its own: the tenant's
    assert chat(second, 2).headers["x-ratelimit-limit-requests"] == "100"  # its own where it has them
    for c in (first, second):  # the tenant's 2 requests per minute are spent by the two keys together
        with pytest.raises(openai.RateLimitError) as throttled:
            chat(c, 2)
        assert "tenant 'shared-team'" in throttled.value.message
    bad = httpx.put(f"{stack.router.url}/v1/tenants/shared-team", json={"rpm": -2}, headers=bearer(ADMIN_KEY))
    assert bad.status_code == 400
    assert httpx.put(f"{stack.router.url}/v1/tenants/x", json={}, headers=bearer(API_KEY)).status_code == 401


def served_ahead(stack: SecureStack, url: str, tag: str) -> tuple[int, float]:
    """The model's CAP slots are taken by long streams of a third tenant; a heavy tenant sends 16 requests at once
    and, once they wait, a light tenant sends one; then the streams end. Returns how many heavy requests were
    answered before the light one, and its latency from the streams' end in seconds (printed, not asserted: the
    machine's speed is not the test's)."""
    heavy = create_key(stack, name=f"heavy-{tag}", tenant=f"heavy-{tag}")["secret"]
    light = create_key(stack, name=f"light-{tag}", tenant=f"light-{tag}")["secret"]
    filler = create_key(stack, name=f"filler-{tag}", tenant=f"filler-{tag}")["secret"]
    # The last key made: once this router has it, it has all three (router B learns them by long-poll).
    known = lambda: httpx.get(f"{url}/v1/models", headers=bearer(filler), timeout=5).status_code == 200  # noqa: E731
    wait_until(known, 30, interval=0.05, what="the router has the keys")
    return asyncio.run(flood(url, heavy, light, filler))


async def flood(url: str, heavy_key: str, light_key: str, filler_key: str) -> tuple[int, float]:
    # One event loop takes every answer, in the order their connections became readable, even while a loaded
    # machine holds it back; clients on threads, each noting its own answer, blurred that order by up to 9 answers
    # in a CI run (a thread woken late notes its answer after ones that came later).
    long_stream = {"model": ALIAS, "messages": CHAT, "max_tokens": LONG_TOKENS, "stream": True, "ignore_eos": True}
    answered: list[tuple[str, float]] = []

    async def one(c: openai.AsyncOpenAI, who: str) -> None:
        await c.chat.completions.create(model=ALIAS, messages=CHAT, max_tokens=FLOOD_TOKENS, extra_body=EOS)
        answered.append((who, time.monotonic()))

    async def until_waiting(http: httpx.AsyncClient, n: int) -> None:
        for _ in range(1200):  # 60 s
            if await fair_queue_waiting(http, url) == n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"never {n} requests waiting at {url}")

    def async_client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)

    heavy, light = async_client(heavy_key), async_client(light_key)
    async with heavy, light, httpx.AsyncClient(timeout=120) as http:
        async with contextlib.AsyncExitStack() as fillers:
            for _ in range(CAP):
                path = f"{url}/v1/chat/completions"
                request = http.stream("POST", path, json=long_stream, headers=bearer(filler_key))
                chunks = (await fillers.enter_async_context(request)).aiter_bytes()
                fillers.push_async_callback(chunks.aclose)
                assert (await anext(chunks)).startswith(b"data: ")
            requests = [asyncio.create_task(one(heavy, "heavy")) for _ in range(16)]
            await until_waiting(http, 16)
            requests.append(asyncio.create_task(one(light, "light")))
            await until_waiting(http, 17)
        released = time.monotonic()  # the streams ended (closed): their slots go to the waiters
        await asyncio.gather(*requests)
    order = [who for who, _ in sorted(answered, key=lambda a: a[1])]
    return order.index("light"), dict(answered)["light"] - released


async def fair_queue_waiting(http: httpx.AsyncClient, url: str) -> float:
    metrics = (await http.get(f"{url}/metrics")).text
    prefix = f'svllm_router_fair_queue_waiting{{model="{ALIAS}",'  # every priority class
    return sum(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(prefix))


def test_a_flooding_tenant_does_not_make_a_light_one_wait_behind_it(stack: SecureStack) -> None:
    fifo_ahead, fifo_s = served_ahead(stack, stack.router.url, "fifo")
    fair_ahead, fair_s = served_ahead(stack, router_b(stack), "fair")
    print(f"light request: fifo {fifo_ahead} heavy answered first, {fifo_s:.2f} s; fair {fair_ahead}, {fair_s:.2f} s")
    # In arrival order the light request starts after the 16 heavy ones queued before it, once all but CAP - 1
    # of them have ended: 15 or 16 are answered first (the baseline is held to most of the flood, 16 - 2 * CAP, as
    # answers that end in the same step of the engine come in either order). Taking turns, the heavy tenant's turn
    # comes first (it was waiting already) and the light one's next: it is the first or second request to start once
    # slots free, so only the heavy request that started before it and the one that started beside it (one batch of
    # the engine) can be answered first.
    assert fifo_ahead >= 16 - 2 * CAP
    assert fair_ahead <= CAP


def engine_requests(stack: SecureStack) -> tuple[float, float]:
    """Requests (running, waiting) in the model's engine, as vLLM counts them."""
    for name, worker in stack.workers.items():
        if name == "router-b":
            continue
        for engine in stack.engines(name):
            if engine["alias"] == ALIAS and engine["state"] == "ready":
                url = f"{worker.url}/engines/{engine['replica_id']}/metrics"
                text = httpx.get(url, headers=bearer(WORKER_TOKEN), timeout=10).text
                return metric_sum(text, "vllm:num_requests_running"), metric_sum(text, "vllm:num_requests_waiting")
    return 0.0, 0.0


def served_first(stack: SecureStack, late_class: str, tag: str) -> list[str]:
    """The engine runs two long low-class streams (through router A); through router B a low-class stream `early`
    and then a `late_class` stream `late` wait in the engine; one running stream is closed (vLLM aborts it): its
    slot goes to one of the waiters. Returns the order in which the two sent their first token.

    Whichever is scheduled first holds the one free slot until it ends: `early` ends at its first token (closed,
    aborted), `late` after LATE_TOKENS, so the other's first token comes at least that many engine steps later and
    the order seen by the clients is the engine's (a short `late` answered whole raced the next first token)."""
    low = create_key(stack, name=f"low-{tag}", tenant="batch", priority="low")["secret"]
    late_key = create_key(stack, name=f"late-{tag}", tenant="interactive", priority=late_class)["secret"]
    url_b = router_b(stack)
    known = lambda: httpx.get(f"{url_b}/v1/models", headers=bearer(late_key), timeout=5).status_code == 200  # noqa: E731
    wait_until(known, 30, interval=0.05, what="router B has the keys")
    long_stream = {"model": ALIAS, "messages": CHAT, "max_tokens": LONG_TOKENS, "stream": True, "ignore_eos": True}
    events: list[str] = []

    def early() -> None:
        with httpx.stream(
            "POST", f"{url_b}/v1/chat/completions", json=long_stream, headers=bearer(low), timeout=120
        ) as stream:
            assert stream.status_code == 200
            next(stream.iter_bytes())
            events.append("early started")  # then closed: vLLM aborts it

    def late() -> None:
        body = {**long_stream, "max_tokens": LATE_TOKENS}
        with httpx.stream(
            "POST", f"{url_b}/v1/chat/completions", json=body, headers=bearer(late_key), timeout=120
        ) as stream:
            assert stream.status_code == 200
            chunks = stream.iter_lines()
            assert next(chunks).startswith("data: ")
            events.append("late started")
            assert [line for line in chunks if line.startswith("data: ")][-1] == "data: [DONE]"

    with ThreadPoolExecutor(2) as pool, contextlib.ExitStack() as last:
        streams = [contextlib.ExitStack() for _ in range(ENGINE_SEQS)]
        for running in streams:
            last.enter_context(running)
            stream = running.enter_context(
                httpx.stream(
                    "POST",
                    f"{stack.router.url}/v1/chat/completions",
                    json=long_stream,
                    headers=bearer(low),
                    timeout=120,
                )
            )
            assert next(running.enter_context(contextlib.closing(stream.iter_bytes()))).startswith(b"data: ")
        futures = [pool.submit(early)]
        # Both streams still running as well: a running stream preempted back to the waiting queue would count as
        # a waiter, and the late request might then not be in the engine yet when the slot is freed.
        wait_until(lambda: engine_requests(stack) == (ENGINE_SEQS, 1), 60, 0.05, what="the early request waiting")
        futures.append(pool.submit(late))
        wait_until(lambda: engine_requests(stack) == (ENGINE_SEQS, 2), 60, 0.05, what="the late request waiting")
        # One running stream ends: its one slot goes to a waiter, the other to the next once that one ends.
        streams[0].close()
        for f in futures:
            f.result(timeout=120)
    return events


def test_the_engine_serves_a_high_class_first(stack: SecureStack) -> None:
    """Where engines schedule by priority (vLLM's --scheduling-policy priority), the router gives each key's request
    its class as `priority`: a high-class request that came last is served before a low-class one waiting since
    before it. The baseline in the same test, a low-class request in its place, is served in arrival order."""
    assert served_first(stack, "low", "same-class") == ["early started", "late started"]
    # Once more if the engine served them in arrival order: a full CI run (2026-11-30 15:16, the 2 cores at their
    # busiest) saw that once in about ten runs of this module, which passed 3 of 3 alone right after. Without the
    # priority passed on, both tries are in arrival order (checked): the test still fails.
    orders = [served_first(stack, "high", "high-class")]
    if orders[0] != ["late started", "early started"]:
        orders.append(served_first(stack, "high", "high-class-again"))
    assert orders[-1] == ["late started", "early started"], orders


def test_a_router_started_while_the_manager_is_away_has_tenants_retry_then_serves_them(stack: SecureStack) -> None:
    """Last in the module: it restarts the manager. Router B, restarted while the manager is down, has no key table:
    a key made at run time is answered 503 with Retry-After (not 401: it is not known to be wrong), which the openai
    client retries, and the same client's request is served once the manager is back."""
    secret = create_key(stack, name="manager-away", tenant="team-m")["secret"]
    on_router_b(stack, secret)
    stack.manager.stop()
    stack.workers["router-b"].stop()
    stack.workers["router-b"].start()
    body = {"model": ALIAS, "messages": CHAT, "max_tokens": 2}
    early = httpx.post(f"{router_b(stack)}/v1/chat/completions", json=body, headers=bearer(secret), timeout=30)
    assert (early.status_code, early.json()["error"]["code"], early.headers.get("retry-after")) == (
        503,
        "keys_not_loaded",
        "2",
    ), early.text
    patient = openai.OpenAI(base_url=f"{router_b(stack)}/v1", api_key=secret, max_retries=15, timeout=120)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: chat(patient, 2))
        time.sleep(3)  # its first tries are refused while the manager is down
        assert not waiting.done()
        stack.manager.start()
        assert waiting.result(timeout=120).status_code == 200
