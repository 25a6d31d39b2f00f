"""Keys as data and their limits, in process: the manager's key registry (hashes only, errors, the long-poll), the
router's key ring (digest lookup, revoked, expired, models), token buckets and the in-flight count on a settable
clock, the guard with run-time keys, and the usage read from (and taken out of) event streams."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from serverless_vllm.config import AuthSettings
from serverless_vllm.errors import APIError, install_error_handlers
from serverless_vllm.manager.keys import KeyRegistry
from serverless_vllm.router.key_sync import KeySync
from serverless_vllm.router.limits import Limiter, duration
from serverless_vllm.router.tenant_gate import _VLLM_USAGE, body_tokens, scan_events, tokens_of
from serverless_vllm.schemas import KeyLimits, KeyPatch, KeySpec, KeyTable, Priority
from serverless_vllm.security import auth as auth_module
from serverless_vllm.security.auth import install_guard, router_policy
from serverless_vllm.security.keys import KEY_SCOPE, ActiveKey, KeyRing
from starlette.responses import JSONResponse


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def registry(tmp_path: Path, clock: Clock | None = None) -> KeyRegistry:
    return KeyRegistry(str(tmp_path / "m.db"), "epoch1", lambda: {"tiny", "big"}, clock or Clock())


def test_the_secret_is_returned_once_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    keys = registry(tmp_path)
    created = keys.create(KeySpec(name="a", tenant="t", models=["tiny"], limits=KeyLimits(rpm=5)))
    assert created.secret.startswith("sk-svllm-") and len(created.secret) > 40
    assert "secret" not in keys.get("a").model_dump()
    rows = sqlite3.connect(tmp_path / "m.db").execute("SELECT record FROM api_keys").fetchall()
    assert len(rows) == 1 and created.secret not in rows[0][0]
    assert hashlib.sha256(created.secret.encode()).hexdigest() in rows[0][0]
    keys.close()
    again = registry(tmp_path)  # durable: a restarted manager has the key
    assert again.get(created.id).name == "a" and again.table().keys[0].digest in rows[0][0]


def test_registry_errors(tmp_path: Path) -> None:
    clock = Clock()
    keys = registry(tmp_path, clock)
    keys.create(KeySpec(name="a", tenant="t"))
    cases = {
        "duplicate_key_name": lambda: keys.create(KeySpec(name="a", tenant="u")),
        "unknown_model": lambda: keys.create(KeySpec(name="b", tenant="t", models=["tiny", "nope"])),
        "invalid_expiry": lambda: keys.create(KeySpec(name="c", tenant="t", expires_at=clock.now - 1)),
        "key_not_found": lambda: keys.revoke("zzz"),
    }
    for code, call in cases.items():
        with pytest.raises(APIError) as err:
            call()
        assert (err.value.status, err.value.code) == (404 if code == "key_not_found" else 400, code)
    assert keys.create(KeySpec(name="d", tenant="t", models=["no-such-*"])).models == ["no-such-*"]  # a pattern
    with pytest.raises(ValidationError):
        KeyLimits(rpm=0)
    with pytest.raises(ValidationError):
        KeySpec(name="e", tenant="t", models=[])
    with pytest.raises(ValidationError):
        KeySpec(name="bad name!", tenant="t")
    for null in ("models", "limits", "tenant", "priority"):
        with pytest.raises(APIError) as err:
            keys.update("a", KeyPatch.model_validate({null: None}))
        assert (err.value.status, err.value.message) == (400, f"{null} cannot be null (send limits {{}} for none)")
    expiring = keys.update("a", KeyPatch(expires_at=clock.now + 60))
    assert keys.update("a", KeyPatch.model_validate({"expires_at": None})).expires_at is None and expiring.expires_at
    keys.revoke("a")
    with pytest.raises(APIError) as err:
        keys.update("a", KeyPatch(limits=KeyLimits(rpm=1)))
    assert err.value.code == "key_revoked"


def test_the_long_poll_returns_on_a_change(tmp_path: Path) -> None:
    keys = registry(tmp_path)

    async def scenario() -> KeyTable:
        version = keys.table().version
        waiting = asyncio.create_task(keys.wait(version, "epoch1", 30.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        keys.create(KeySpec(name="a", tenant="t"))
        return await asyncio.wait_for(waiting, 5.0)

    table = asyncio.run(scenario())
    assert [k.name for k in table.keys] == ["a"]
    # Another epoch (a restarted manager) or an older version: answered at once.
    assert asyncio.run(keys.wait(table.version, "other", 30.0)).version == table.version


def ring_with(tmp_path: Path, clock: Clock, share: float = 1.0, **spec: object) -> tuple[KeyRing, str, KeyRegistry]:
    keys = registry(tmp_path, clock)
    secret = keys.create(KeySpec.model_validate({"name": "k", "tenant": "t", **spec})).secret
    ring = KeyRing(share, clock)
    ring.update(keys.table())
    return ring, secret, keys


def test_the_ring_finds_keys_by_digest_and_refuses_revoked_and_expired_ones(tmp_path: Path) -> None:
    clock = Clock()
    ring, secret, keys = ring_with(tmp_path, clock, expires_at=clock.now + 10)
    key = ring.check(secret.encode())
    assert isinstance(key, ActiveKey) and key.tenant == "t"
    assert ring.check(b"sk-svllm-wrong") is None
    clock.now += 10
    expired = ring.check(secret.encode())
    assert isinstance(expired, APIError) and (expired.status, expired.code) == (401, "expired_api_key")
    clock.now -= 5
    keys.revoke("k")
    ring.update(keys.table())
    revoked = ring.check(secret.encode())
    assert isinstance(revoked, APIError) and (revoked.status, revoked.code) == (401, "revoked_api_key")


@pytest.mark.parametrize("incremental", [False, True], ids=["whole-table", "changes-only"])
def test_a_reload_keeps_the_objects_of_unchanged_keys(tmp_path: Path, incremental: bool) -> None:
    """Each change reaches the ring (as the whole table, or as the keys changed since the ring's version); keys it
    did not touch stay the same objects (no heap churn, their caches and limit states kept), a changed key, or one
    whose tenant's limits changed, is made again."""
    clock = Clock()
    keys = registry(tmp_path, clock)
    secrets = [keys.create(KeySpec(name=n, tenant=n, limits=KeyLimits(rpm=50))).secret for n in ("a", "b", "c")]
    ring = KeyRing(1.0, clock)
    ring.update(keys.table())

    def load() -> None:
        ring.update(keys.changes(ring.version) if incremental else keys.table())
        assert ring.version == keys.table().version

    a, b, c = (ring.check(s.encode()) for s in secrets)
    keys.update("b", KeyPatch(limits=KeyLimits(rpm=60)))
    keys.set_tenant_limits("c", KeyLimits(rpm=5))
    keys.create(KeySpec(name="d", tenant="d"))
    load()
    a2, b2, c2 = (ring.check(s.encode()) for s in secrets)
    assert a2 is a and len(ring) == 4
    assert isinstance(b2, ActiveKey) and b2 is not b and b2.limits.rpm == 60
    assert isinstance(c2, ActiveKey) and c2 is not c and c2.tenant_limits == KeyLimits(rpm=5)
    assert ring.tenants() == {"c": KeyLimits(rpm=5)}
    keys.set_tenant_limits("c", KeyLimits())  # no limits: the tenant's keys lose them
    load()
    c3 = ring.check(secrets[2].encode())
    assert isinstance(c3, ActiveKey) and c3.tenant_limits is None and ring.check(secrets[0].encode()) is a
    keys.revoke("a")
    load()
    assert isinstance(ring.check(secrets[0].encode()), APIError)
    assert ring.by_id(a.id) is not None and ring.by_id(a.id) is not a  # type: ignore[union-attr]


def test_a_router_with_a_version_gets_only_the_keys_changed_since(tmp_path: Path) -> None:
    keys = registry(tmp_path)
    for name in ("a", "b", "c"):
        keys.create(KeySpec(name=name, tenant="t"))
    since = keys.table().version
    keys.update("b", KeyPatch(priority=Priority.HIGH))

    def wait(after: int, epoch: str = "epoch1") -> KeyTable:
        return asyncio.run(keys.wait(after, epoch, 0.0))

    changed = wait(since)
    assert (changed.base, [k.name for k in changed.keys], changed.version) == (since, ["b"], since + 1)
    quiet = wait(since + 1)  # a long-poll that timed out: nothing to parse again
    assert (quiet.base, quiet.keys, quiet.version) == (since + 1, [], since + 1)
    for whole in (wait(-1, ""), wait(since, "another-epoch")):  # a new router, or one of a restarted manager's
        assert whole.base is None and sorted(k.name for k in whole.keys) == ["a", "b", "c"]


class KeyTableManager:
    """The manager's wait_keys over a real registry, with a fault injected: `skip` versions are added to the next
    answer's base, as if the router had missed changes (a delta it cannot apply)."""

    def __init__(self, keys: KeyRegistry) -> None:
        self.keys = keys
        self.skip = 0
        self.asked: list[int] = []

    async def wait_keys(self, after_version: int, epoch: str, timeout: float) -> KeyTable:
        self.asked.append(after_version)
        table = await self.keys.wait(after_version, epoch, timeout)
        if self.skip and table.base is not None:
            table = table.model_copy(update={"base": table.base + self.skip})
            self.skip = 0
        return table


async def test_the_key_sync_loads_the_whole_table_when_it_cannot_apply_the_changes(tmp_path: Path) -> None:
    keys = registry(tmp_path)
    keys.create(KeySpec(name="a", tenant="t"))
    manager = KeyTableManager(keys)
    ring = KeyRing()
    sync = KeySync(manager, ring, Limiter())  # type: ignore[arg-type]  # wait_keys only
    assert await sync.refresh() and manager.asked == [-1] and len(ring) == 1
    assert not await sync.refresh()  # nothing new: the empty changes are not applied
    keys.create(KeySpec(name="b", tenant="t"))
    manager.skip = 1
    assert await sync.refresh()
    assert manager.asked == [-1, 2, 2, -1] and len(ring) == 2 and ring.version == keys.table().version


def test_models_by_alias_and_pattern(tmp_path: Path) -> None:
    ring, secret, _ = ring_with(tmp_path, Clock(), models=["big", "ti?y", "llama-*"])
    key = ring.check(secret.encode())
    assert isinstance(key, ActiveKey)
    allowed = {a: key.allows(a) for a in ("big", "tiny", "tidy", "llama-3", "small", "bigger")}
    assert allowed == {"big": True, "tiny": True, "tidy": True, "llama-3": True, "small": False, "bigger": False}


def test_a_share_of_the_limits_is_rounded_up(tmp_path: Path) -> None:
    ring, secret, _ = ring_with(tmp_path, Clock(), share=0.5, limits={"rpm": 5, "tpm": 1000, "max_concurrent": 1})
    key = ring.check(secret.encode())
    assert isinstance(key, ActiveKey) and key.limits == KeyLimits(rpm=3, tpm=500, max_concurrent=1)


def active_key(limits: KeyLimits) -> ActiveKey:
    return ActiveKey("id1", "k", "t", KeySpec(name="k", tenant="t").priority, limits, None, False, frozenset(), ("*",))


def test_requests_per_minute_bucket() -> None:
    clock = Clock()
    limiter, key = Limiter(clock), active_key(KeyLimits(rpm=6))
    grants = [limiter.admit(key) for _ in range(6)]  # a burst of a minute's worth
    assert [g.headers["x-ratelimit-remaining-requests"] for g in grants] == ["5", "4", "3", "2", "1", "0"]
    with pytest.raises(APIError) as err:
        limiter.admit(key)
    assert err.value.status == 429 and err.value.headers["retry-after"] == "10"  # one request per 10 s
    assert err.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 9.9
    with pytest.raises(APIError):
        limiter.admit(key)
    clock.now += 0.1
    assert limiter.admit(key).headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_per_minute_are_taken_after_the_answer() -> None:
    clock = Clock()
    limiter, key = Limiter(clock), active_key(KeyLimits(tpm=600))
    grant = limiter.admit(key)
    assert grant.headers["x-ratelimit-remaining-tokens"] == "600"
    grant.finish(700)  # the answer was bigger than what was left: the bucket goes below zero
    with pytest.raises(APIError) as err:
        limiter.admit(key)
    assert err.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert err.value.headers["retry-after"] == "11"  # 101 tokens to refill at 10 per second
    clock.now += 10.1
    assert limiter.admit(key).headers["x-ratelimit-remaining-tokens"] == "1"


def test_in_flight_count_is_released_once() -> None:
    limiter, key = Limiter(Clock()), active_key(KeyLimits(max_concurrent=2))
    first, _second = limiter.admit(key), limiter.admit(key)
    with pytest.raises(APIError):
        limiter.admit(key)
    first.finish(0)
    first.finish(0)  # a second finish frees nothing more
    limiter.admit(key)
    with pytest.raises(APIError):
        limiter.admit(key)


def test_new_limits_start_new_buckets() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    limiter.admit(active_key(KeyLimits(rpm=1)))
    with pytest.raises(APIError):
        limiter.admit(active_key(KeyLimits(rpm=1)))  # an equal new table: the same bucket
    assert limiter.admit(active_key(KeyLimits(rpm=2))).headers["x-ratelimit-remaining-requests"] == "1"


def test_a_key_remembers_its_states_for_its_own_limiter_only() -> None:
    """The states a key object found are remembered on it (no lookup by name per request), for the limiter that
    made them: another limiter (another router in the same process) keeps its own buckets."""
    first, second, key = Limiter(Clock()), Limiter(Clock()), active_key(KeyLimits(rpm=1))
    first.admit(key)
    assert key.limit_states is not None and key.limit_states[1] == (first.state(key.id, key.limits),)
    second.admit(key)  # its own full bucket
    with pytest.raises(APIError):
        first.admit(key)
    with pytest.raises(APIError):
        second.admit(key)


def test_durations_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0.0201, 1.5, 59.0, 60.0, 360.0)] == ["21ms", "1.5s", "59s", "1m0s", "6m0s"]


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def _scan(parts: list[bytes], strip: bool) -> tuple[bytes, list[object]]:
    seen: list[object] = []

    async def run() -> bytes:
        return b"".join([c async for c in scan_events(_chunks(*parts), seen.append, strip)])

    return asyncio.run(run()), seen


def test_usage_is_read_from_a_stream_and_taken_out_when_the_client_did_not_ask() -> None:
    delta = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    done = b"data: [DONE]\n\n"
    # The usage event cut in two reads, and joined with the end of the stream.
    parts = [delta, usage[:20], usage[20:] + done]
    stripped, seen = _scan(parts, strip=True)
    assert stripped == delta + done and seen == [{"prompt_tokens": 3, "completion_tokens": 2}]
    kept, seen = _scan(parts, strip=False)
    assert kept == delta + usage + done and len(seen) == 1


def test_usage_is_read_from_anthropic_and_responses_streams_whose_events_are_named() -> None:
    # As vLLM writes them: an `event:` line before each `data:` line. Anthropic's message_start carries the
    # prompt's tokens alone, its message_delta all of them (counted once); the prompt includes cached tokens.
    messages = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":"message","role":'
        b'"assistant","content":[],"model":"tiny","usage":{"input_tokens":9,"output_tokens":0}}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
        b'"text":"hi"}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":'
        b'{"input_tokens":6,"cache_read_input_tokens":3,"output_tokens":5}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    relayed, seen = _scan(messages, strip=True)
    assert relayed == b"".join(messages)  # nothing taken out: the client asked for none of it
    assert [tokens_of(u) for u in seen] == [(9, 5)]
    responses = [
        b'event: response.created\ndata: {"type":"response.created","response":{"id":"r","usage":null}}\n\n',
        b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r","usage":'
        b'{"input_tokens":4,"output_tokens":7,"total_tokens":11}}}\n\n',
    ]
    relayed, seen = _scan(responses, strip=True)
    assert relayed == b"".join(responses) and [tokens_of(u) for u in seen] == [(4, 7)]


def test_token_counts_that_no_answer_has_count_nothing() -> None:
    """An upstream's negative, huge or non-integer counts are not added to a key's usage: such a row would be
    refused by the manager's ledger (counts of at most 10^15) and its report sent again forever."""
    assert tokens_of({"prompt_tokens": 7, "completion_tokens": 2**31}) == (7, 2**31)
    assert tokens_of({"prompt_tokens": -5, "completion_tokens": 10**20}) == (0, 0)
    assert tokens_of({"prompt_tokens": 3.5, "completion_tokens": True}) == (0, 0)
    assert tokens_of({"input_tokens": 4, "cache_read_input_tokens": None, "output_tokens": "9"}) == (4, 0)
    assert tokens_of({"input_tokens": 4, "cache_creation_input_tokens": -4, "output_tokens": 1}) == (4, 1)


def test_a_whole_answers_tokens_are_read_in_vllms_layout_and_in_any_other() -> None:
    """vLLM's compact layout (UsageInfo's fields in their order, rendered as vLLM's JSONResponse renders them) is
    found from the end and matched; any other layout is parsed, with the same bounds on the counts. A text that
    spells a usage object is not one (its quotes are escaped)."""
    vllm = {
        "id": "cmpl-1",
        "choices": [
            {
                "index": 0,
                "text": '"usage":{"prompt_tokens":1,"total_tokens":4,"completion_tokens":3},',
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 26, "total_tokens": 34, "completion_tokens": 8, "prompt_tokens_details": None},
        "kv_transfer_params": None,
    }
    body = bytes(JSONResponse(vllm).body)
    assert _VLLM_USAGE.search(body) is not None and body_tokens(body) == (26, 8)
    # The usage's last field, with no details after it: the same.
    vllm["usage"] = {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}
    assert body_tokens(bytes(JSONResponse(vllm).body)) == (3, 2)
    others = {
        # pretty-printed, another order, Anthropic's and the Responses API's names, counts beyond any answer's
        b'{"usage": {"prompt_tokens": 4, "total_tokens": 9, "completion_tokens": 5}}': (4, 5),
        b'{"usage":{"completion_tokens":6,"prompt_tokens":2,"total_tokens":8}}': (2, 6),
        b'{"type":"message","usage":{"input_tokens":6,"cache_read_input_tokens":3,"output_tokens":5}}': (9, 5),
        b'{"object":"response","usage":{"input_tokens":4,"output_tokens":7,"total_tokens":11}}': (4, 7),
        b'{"usage":{"prompt_tokens":12345678901,"total_tokens":12345678902,"completion_tokens":1}}': (0, 1),
        b'{"usage":{"prompt_tokens":-3,"total_tokens":1,"completion_tokens":4}}': (0, 4),
        b'{"id":"x","usage":null}': (0, 0),
        b'{"error":{"message":"no"}}': (0, 0),
        b"not json": (0, 0),
    }
    for other, tokens in others.items():
        assert _VLLM_USAGE.search(other) is None and body_tokens(other) == tokens, other


def _guarded(ring: KeyRing) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    auth = AuthSettings(
        mode="on",
        api_keys=(SecretStr("env-client-key-0123456789"),),
        admin_key=SecretStr("admin-key-0123456789"),
        worker_token=SecretStr("worker-token-0123456789"),
    )
    install_guard(app, auth, "router", router_policy, keys=ring)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, object]:
        key = request.scope.get(KEY_SCOPE)
        return {"key": key.name if isinstance(key, ActiveKey) else None}

    return TestClient(app)


def test_the_guard_accepts_run_time_keys_beside_the_environment_s(tmp_path: Path) -> None:
    ring, secret, keys = ring_with(tmp_path, Clock(1e12))  # far future: the ring's clock, not the wall's
    http = _guarded(ring)

    def post(key: str) -> tuple[int, object]:
        resp = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"})
        return resp.status_code, resp.json().get("key", resp.json().get("error", {}).get("code"))

    assert post(secret) == (200, "k")
    assert post("env-client-key-0123456789") == (200, None)  # an environment key: no limits, no key in scope
    assert post("sk-svllm-unknown") == (401, "invalid_api_key")
    resp = http.post("/v1/keys", headers={"authorization": f"Bearer {secret}"}, json={})
    assert resp.status_code == 401  # the key API is the admin's
    keys.revoke("k")
    ring.update(keys.table())
    assert post(secret) == (401, "revoked_api_key")


def test_before_its_first_key_table_a_router_asks_tenants_to_try_again(tmp_path: Path) -> None:
    """A router started while the manager is away cannot tell a key made at run time from a wrong token: 503 with
    Retry-After (the openai client retries it), not a 401 that ends the client. The environment's keys work."""
    ring = KeyRing()
    http = _guarded(ring)

    def post(headers: dict[str, str]) -> httpx.Response:
        return http.post("/v1/chat/completions", headers=headers)

    early = post({"authorization": "Bearer sk-svllm-made-at-run-time"})
    assert (early.status_code, early.json()["error"]["code"], early.headers["retry-after"]) == (
        503,
        "keys_not_loaded",
        "2",
    )
    assert post({"authorization": "Bearer env-client-key-0123456789"}).json() == {"key": None}
    assert post({"authorization": "Bearer admin-key-0123456789"}).status_code == 200
    missing = post({})
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "missing_api_key")
    ring.update(registry(tmp_path).table())  # the first table (no keys at all): now a wrong token is one
    assert post({"authorization": "Bearer sk-svllm-made-at-run-time"}).json()["error"] == {
        "message": "invalid credentials for this route (it needs an admin or client key)",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }


def test_an_accepted_token_is_hashed_once_and_a_wrong_one_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard remembers the digests of tokens it accepted (a bounded dict), never a wrong token's; a remembered
    token is still refused once its key is revoked, and still needs its role on each route."""
    hashed: list[bytes] = []
    digest = auth_module._digest

    def counting(secret: str | bytes) -> bytes:
        hashed.append(secret if isinstance(secret, bytes) else secret.encode())
        return digest(secret)

    monkeypatch.setattr(auth_module, "_digest", counting)
    monkeypatch.setattr(auth_module, "_KNOWN_TOKENS", 2)
    ring, secret, keys = ring_with(tmp_path, Clock(1e12))
    http = _guarded(ring)
    hashed.clear()  # the environment's secrets, hashed once when the guard was made

    def post(key: str, path: str = "/v1/chat/completions") -> int:
        return http.post(path, headers={"authorization": f"Bearer {key}"}, json={}).status_code

    env_key, admin_key = "env-client-key-0123456789", "admin-key-0123456789"
    for _ in range(3):
        assert post(secret) == 200 and post(env_key) == 200 and post("sk-svllm-wrong") == 401
    assert hashed == [secret.encode(), env_key.encode(), *[b"sk-svllm-wrong"] * 3]
    hashed.clear()
    assert post(secret, "/v1/keys") == 401 and hashed == []  # remembered, and still not the admin's
    assert post(admin_key, "/v1/keys") == 404 and post(admin_key, "/v1/keys") == 404  # let in: this app has no route
    assert hashed == [admin_key.encode()] * 2  # the memory is full (2 tokens): a third is hashed every time
    keys.revoke("k")
    ring.update(keys.table())
    hashed.clear()
    resp = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {secret}"}, json={})
    assert resp.json()["error"]["code"] == "revoked_api_key" and hashed == []  # the digest's lookup said so


def test_a_tenants_limits_hold_for_all_its_keys_together(tmp_path: Path) -> None:
    clock = Clock()
    keys = registry(tmp_path, clock)
    keys.set_tenant_limits("t", KeyLimits(rpm=3, max_concurrent=2))
    secrets = [keys.create(KeySpec(name=n, tenant="t", limits=KeyLimits(rpm=50))).secret for n in ("a", "b")]
    ring = KeyRing(1.0, clock)
    ring.update(keys.table())
    a, b = (ring.check(s.encode()) for s in secrets)
    assert isinstance(a, ActiveKey) and isinstance(b, ActiveKey) and a.limited
    limiter = Limiter(clock)
    first = limiter.admit(a)
    assert first.headers["x-ratelimit-limit-requests"] == "50"  # the key's own limits where it has them
    limiter.admit(b)
    with pytest.raises(APIError) as err:
        limiter.admit(a)  # two in flight: the tenant's max
    assert "tenant 't'" in err.value.message
    first.finish(0)
    limiter.admit(b)
    first.finish(0)
    with pytest.raises(APIError) as err:
        limiter.admit(a)  # three requests this minute: the tenant's rpm
    assert "3 requests per minute" in err.value.message
    keys.set_tenant_limits("t", KeyLimits())  # no values: no limits
    ring.update(keys.table())
    assert ring.tenants() == {} and ring.by_id(a.id) is not None and ring.by_id(a.id).tenant_limits is None  # type: ignore[union-attr]


def test_the_first_request_of_a_new_key_sees_a_full_bucket() -> None:
    """On the real clock: a bucket made a moment after admit read the time is not below full."""
    grant = Limiter().admit(active_key(KeyLimits(rpm=6)))
    assert grant.headers["x-ratelimit-remaining-requests"] == "5"


def test_the_key_api_of_a_router_without_credentials_says_why_it_is_refused() -> None:
    """With SVLLM_AUTH=off no key is checked, so the router starts no key table: its key API answers a clear 400,
    not an internal error."""
    from serverless_vllm.errors import APIError
    from serverless_vllm.router.tenants import Tenants

    with pytest.raises(APIError) as refused:
        Tenants(1.0, str).manager()
    assert refused.value.status == 400 and refused.value.code == "keys_disabled"


class _Lines:
    """What the server protocol gives a request under HEAD_LINES (dataplane/server_protocol.py)."""

    def __init__(self) -> None:
        self.lines = b""

    def add_head_lines(self, lines: bytes) -> None:
        self.lines += lines


def test_a_limited_keys_headers_go_to_the_server_as_lines_or_else_with_the_answer() -> None:
    """Where the server takes header lines (ours), the x-ratelimit-* headers go to it as one block; elsewhere (Ray
    Serve's server) they are the answer's own headers. Either way the client gets the same six."""
    from serverless_vllm.dataplane.body import InferenceRequest
    from serverless_vllm.dataplane.endpoints import ENDPOINTS
    from serverless_vllm.router.tenant_gate import TenantGate
    from serverless_vllm.router.usage import UsageBook
    from starlette.responses import Response

    completion = next(e for e in ENDPOINTS if e.path == "/v1/completions")
    request = InferenceRequest(completion, b"{}", {"model": "m", "prompt": "hi"}, "m", "application/json")
    answer = b'{"choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}}'

    async def call(_: InferenceRequest) -> Response:
        return Response(answer, media_type="application/json")

    gate = TenantGate(Limiter(Clock()), UsageBook(lambda alias: alias))
    key = active_key(KeyLimits(rpm=6, tpm=600, max_concurrent=2))
    key.limited = True  # as security/keys.active() sets it
    lines = _Lines()
    handed = asyncio.run(gate.serve(key, request, call, lines))
    fields = dict(line.decode().split(": ") for line in lines.lines.split(b"\r\n") if line)
    assert fields == {
        "x-ratelimit-limit-requests": "6",
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "10s",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "600",
        "x-ratelimit-reset-tokens": "0ms",
    }
    assert not any(name.startswith(b"x-ratelimit") for name, _ in handed.raw_headers)
    plain = asyncio.run(gate.serve(key, request, call))
    headers = {k.decode(): v.decode() for k, v in plain.raw_headers if k.startswith(b"x-ratelimit")}
    # The second request: one more request taken, and the first answer's 5 tokens.
    assert headers == {
        **fields,
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-remaining-tokens": "595",
        "x-ratelimit-reset-requests": "20s",
        "x-ratelimit-reset-tokens": "500ms",
    }


def test_a_keys_usage_row_follows_its_entry() -> None:
    """Rows are found through the key (one lookup a request); a key whose entry changed (another tenant) is a new
    ActiveKey and counts in its new tenant's row, and a model that is not registered is not remembered."""
    from serverless_vllm.router.usage import UsageBook

    book = UsageBook(lambda alias: alias if alias == "m" else "other")
    key = active_key(KeyLimits())
    row = book.row(key, "m")
    assert key.usage_rows == {"m": row} and book.row(key, "m") is row
    book.row(key, "x")
    assert list(key.usage_rows) == ["m"]  # counted under "other", not remembered under the name a client sent
    moved = ActiveKey("id1", "k", "t2", key.priority, KeyLimits(), None, False, frozenset(), ("*",))
    assert book.row(moved, "m") is not row
    assert set(book.per_tenant()) == {("t", "m"), ("t", "other"), ("t2", "m")}


def test_a_streams_tokens_and_slot_are_settled_before_its_last_event_is_sent() -> None:
    """A client sends its next request once it has seen the stream's last event (the openai client does not wait
    for the end of the body): by then the stream's tokens are taken and its in-flight slot is free."""
    from serverless_vllm.router.tenant_gate import Metered
    from serverless_vllm.router.usage import Usage
    from starlette.responses import StreamingResponse

    limiter = Limiter(Clock())
    key = active_key(KeyLimits(tpm=100, max_concurrent=1))
    grant = limiter.admit(key)
    state = limiter.state(key.id, key.limits)

    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        yield b'data: {"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":96}}\n\n'
        yield b"data: [DONE]\n\n"

    at_end: list[tuple[int, float]] = []
    at_done: list[tuple[int, float]] = []

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            at_end.append((state.in_flight, state.tokens))
        elif b"[DONE]" in message.get("body", b""):  # type: ignore[operator]
            at_done.append((state.in_flight, state.tokens))

    async def receive() -> dict[str, object]:
        await asyncio.sleep(10)  # no disconnect while the stream is sent
        return {"type": "http.disconnect"}

    stream = Metered(StreamingResponse(events(), media_type="text/event-stream"), grant, Usage(), strip=True)
    asyncio.run(stream({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))  # type: ignore[arg-type]
    assert at_done == at_end == [(0, 100 - 116)]  # settled when the usage passed, before the last event


def test_a_stream_with_a_running_total_of_usage_counts_it_once() -> None:
    """stream_options.continuous_usage_stats puts the usage so far in every chunk; the usage-only event at the end
    has the whole: only that one is counted."""
    parts = [
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":9,"completion_tokens":1}}\n\n',
        b'data: {"choices":[{"delta":{"content":"b"}}],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    relayed, seen = _scan(parts, strip=False)
    assert relayed == b"".join(parts) and [tokens_of(u) for u in seen] == [(9, 2)]
