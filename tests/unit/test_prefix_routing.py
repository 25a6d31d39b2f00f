"""Prefix-aware routing (`routing: prefix`): how prompts are keyed, and the policy's choices."""

from __future__ import annotations

import random
import sys
from typing import Any

import pytest
from serverless_vllm.router.policy import NO_KEY, RequestKey
from serverless_vllm.router.prefix import BLOCK_CHARS, MAX_BLOCKS, PrefixAffinity, block_hashes, prompt_text
from serverless_vllm.schemas import Endpoint

SYSTEM = "You are a careful assistant. " * 40  # about 1,160 characters: 9 whole blocks
OTHER_SYSTEM = "Answer in French, briefly. " * 40


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(replica_id=f"r{i}", worker_id=f"w{i}", url=f"http://w{i}") for i in range(n)]


def chat(system: str, question: str, **extra: Any) -> RequestKey:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return RequestKey(None, {"model": "m", "messages": messages, **extra}, "chat")


def completion(prompt: Any, **extra: Any) -> RequestKey:
    return RequestKey(None, {"model": "m", "prompt": prompt, **extra}, "completion")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def idle(eps: list[Endpoint]) -> dict[str, int]:
    return {e.replica_id: 0 for e in eps}


def policy(**kw: Any) -> PrefixAffinity:
    return PrefixAffinity(rng=random.Random(0), **kw)


# ---------------------------------------------------------------- keying


def test_blocks_are_chained_so_a_shared_prefix_shares_its_leading_hashes() -> None:
    a = block_hashes("m", "chat", chat(SYSTEM, "What is 2 + 2? " * 20).payload)
    b = block_hashes("m", "chat", chat(SYSTEM, "Name a colour and say why. " * 20).payload)
    c = block_hashes("m", "chat", chat(OTHER_SYSTEM, "What is 2 + 2? " * 20).payload)
    text = prompt_text("chat", chat(SYSTEM, "What is 2 + 2? " * 20).payload or {})
    assert len(a) == len(text) // BLOCK_CHARS >= 11
    shared = len(SYSTEM) // BLOCK_CHARS
    assert a[:shared] == b[:shared]
    assert not set(a[shared + 1 :]) & set(b)  # once they differ, every later block differs
    assert not set(a) & set(c)  # chained: the same text after another start is another hash
    assert block_hashes("m", "chat", chat(SYSTEM, "What is 2 + 2? " * 20).payload) == a  # deterministic


def test_chat_keys_the_messages_in_order_and_nothing_model_specific() -> None:
    base = block_hashes("m", "chat", chat(SYSTEM, "hi").payload)
    # Sampling parameters, streaming, the user field: the prompt is the same.
    assert block_hashes("m", "chat", chat(SYSTEM, "hi", temperature=0.2, stream=True, user="u").payload) == base
    # Roles and order are part of it; tools come first (chat templates render them before the messages).
    swapped = {"messages": [{"role": "user", "content": SYSTEM}, {"role": "system", "content": "hi"}]}
    assert block_hashes("m", "chat", swapped)[0] != base[0]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert block_hashes("m", "chat", chat(SYSTEM, "hi", tools=tools).payload)[0] != base[0]
    # Content parts are keyed as parsed: the same parts, the same key.
    parts = [{"type": "text", "text": SYSTEM}]
    with_parts = {"messages": [{"role": "system", "content": parts}, {"role": "user", "content": "hi"}]}
    assert block_hashes("m", "chat", with_parts) == block_hashes("m", "chat", with_parts) != base


def test_completions_key_the_prompt_and_differ_from_chat() -> None:
    prompt = SYSTEM + "Q: what is 2 + 2?"
    hashes = block_hashes("m", "completion", completion(prompt).payload)
    assert len(hashes) == len(prompt) // BLOCK_CHARS
    assert block_hashes("m", "completion", completion([prompt, "another"]).payload) == hashes  # a batch: its first
    assert block_hashes("m", "completion", completion(SYSTEM + "Q: other").payload)[:9] == hashes[:9]
    # The same text as a chat message renders to another prompt in the engine: another key.
    assert not set(hashes) & set(block_hashes("m", "chat", chat(prompt, "").payload))
    # Token ids are a prompt too.
    ids = list(range(400))
    assert (
        block_hashes("m", "completion", completion(ids).payload)[:3]
        == block_hashes("m", "completion", completion([*ids, 7, 8]).payload)[:3]
    )


def test_only_whole_blocks_and_at_most_max_blocks() -> None:
    assert block_hashes("m", "completion", completion("x" * (BLOCK_CHARS - 1)).payload) == []
    assert len(block_hashes("m", "completion", completion("x" * (2 * BLOCK_CHARS + 5)).payload)) == 2
    assert len(block_hashes("m", "completion", completion("x" * (BLOCK_CHARS * (MAX_BLOCKS + 50))).payload)) == (
        MAX_BLOCKS
    )
    assert block_hashes("m", "embeddings", {"input": SYSTEM}) == []  # no prompt to cache: nothing keyed
    assert block_hashes("m", "chat", None) == []


def test_salt_and_model_start_separate_chains() -> None:
    plain = block_hashes("m", "chat", chat(SYSTEM, "hi").payload)
    salted = block_hashes("m", "chat", chat(SYSTEM, "hi", cache_salt="tenant-a").payload)
    other_salt = block_hashes("m", "chat", chat(SYSTEM, "hi", cache_salt="tenant-b").payload)
    other_model = block_hashes("m2", "chat", chat(SYSTEM, "hi").payload)
    chains = [plain, salted, other_salt, other_model]
    for i, x in enumerate(chains):
        for y in chains[i + 1 :]:
            assert not set(x) & set(y)


# ---------------------------------------------------------------- the policy's choices


def test_a_repeated_prefix_stays_on_its_replica() -> None:
    p, eps = policy(), endpoints(4)
    first = p.pick("m", eps, idle(eps), chat(SYSTEM, "one"))
    for user in ("two", "three", "four", "a much longer question about the weather in Lisbon today"):
        assert p.pick("m", eps, idle(eps), chat(SYSTEM, user)).replica_id == first.replica_id
    # The router's hit ratio: every block of the later prompts' shared prefix was a hit.
    stats = p.stats["m"]
    assert stats.hit_blocks >= 4 * (len(SYSTEM) // BLOCK_CHARS) and stats.blocks > stats.hit_blocks


def test_longest_prefix_wins() -> None:
    p, eps = policy(), endpoints(3)
    load = idle(eps)
    doc = "A long shared document, paragraph after paragraph. " * 60  # about 24 blocks
    short = completion(doc[: 4 * BLOCK_CHARS] + "and then something else entirely, " * 8)
    long = completion(doc[: 20 * BLOCK_CHARS] + "and a question at the end of it. " * 4)
    p.index.record(block_hashes("m", "completion", short.payload), "r0", p.index.clock())
    p.index.record(block_hashes("m", "completion", long.payload), "r1", p.index.clock())
    query = completion(doc + "the question")
    assert p.pick("m", eps, load, query).replica_id == "r1"  # 20 blocks beat 4
    # Without r1, the next longest.
    assert p.pick("m", [eps[0], eps[2]], load, completion(doc + "another question")).replica_id == "r0"


def test_load_spills_a_hot_prefix_to_a_second_replica_and_then_both_share_it() -> None:
    p, eps = policy(spill=4), endpoints(2)
    home = p.pick("m", eps, idle(eps), chat(SYSTEM, "warm up")).replica_id
    other = "r1" if home == "r0" else "r0"
    # Up to `spill` more in flight than the other replica: the cache is worth the wait.
    for busy in range(5):
        assert p.pick("m", eps, {home: busy, other: 0}, chat(SYSTEM, f"q{busy}")).replica_id == home
    # Beyond: the prompt goes to the idle replica, which from then on holds it too ...
    hits = p.stats["m"].hit_blocks
    assert p.pick("m", eps, {home: 5, other: 0}, chat(SYSTEM, "spilled")).replica_id == other
    assert p.stats["m"].hit_blocks == hits  # a miss, as the replica chosen sees it
    # ... so the two share it by load.
    assert p.pick("m", eps, {home: 3, other: 1}, chat(SYSTEM, "q")).replica_id == other
    assert p.pick("m", eps, {home: 1, other: 3}, chat(SYSTEM, "q")).replica_id == home


def test_no_match_falls_back_to_least_loaded_and_spreads_new_prefixes() -> None:
    p, eps = policy(), endpoints(2)
    # Least loaded first.
    assert p.pick("m", eps, {"r0": 3, "r1": 1}, chat(SYSTEM, "x")).replica_id == "r1"
    # At equal load, a new prefix goes to the replica credited with fewer blocks: r0 now.
    assert p.pick("m", eps, idle(eps), chat(OTHER_SYSTEM, "x")).replica_id == "r0"
    # Prompts shorter than a block are not keyed: least loaded, nothing recorded.
    before = len(p.index)
    assert p.pick("m", eps, {"r0": 2, "r1": 0}, chat("hi", "there")).replica_id == "r1"
    assert p.pick("m", eps, {"r0": 0, "r1": 2}, NO_KEY).replica_id == "r0"
    assert len(p.index) == before


def test_new_prompts_spread_evenly_over_replicas() -> None:
    p, eps = policy(), endpoints(2)
    chosen = [p.pick("m", eps, idle(eps), completion(f"{i:04d} unrelated prompt " * 30)).replica_id for i in range(40)]
    assert abs(chosen.count("r0") - chosen.count("r1")) <= 2


def test_entries_age_out() -> None:
    clock = Clock()
    p, eps = policy(ttl_s=60, clock=clock), endpoints(2)
    home = p.pick("m", eps, idle(eps), chat(SYSTEM, "one")).replica_id
    other = "r1" if home == "r0" else "r0"
    clock.now += 59
    assert p.pick("m", eps, {home: 1, other: 0}, chat(SYSTEM, "two")).replica_id == home  # still counts
    clock.now += 61  # nothing used for longer than the TTL: the less loaded replica, like any new prompt
    assert p.pick("m", eps, {home: 1, other: 0}, chat(SYSTEM, "three")).replica_id == other
    assert p.stats["m"].hit_blocks == len(SYSTEM) // BLOCK_CHARS  # the second request's hit only
    # Expired entries leave the index as new ones come in.
    clock.now += 61
    p.pick("m", eps, idle(eps), chat(OTHER_SYSTEM, "x"))
    assert len(p.index) == len(block_hashes("m", "chat", chat(OTHER_SYSTEM, "x").payload))


def test_memory_is_bounded_and_the_deepest_blocks_go_first() -> None:
    p, eps = policy(max_blocks=50), endpoints(2)
    for i in range(30):
        p.pick("m", eps, idle(eps), completion(f"prompt {i} " * 200))
        assert len(p.index) <= 50
    assert sum(p.index.held.values()) == len(p.index) == 50
    # 15 blocks a prompt: the last three are fully known; of the one before, its first blocks were kept, its
    # deepest evicted.
    last = block_hashes("m", "completion", completion("prompt 29 " * 200).payload)
    before = block_hashes("m", "completion", completion("prompt 26 " * 200).payload)
    depth = p.index.match(last, ["r0", "r1"], p.index.clock())
    assert max(depth.values()) == len(last)
    kept = max(p.index.match(before, ["r0", "r1"], p.index.clock()).values())
    assert kept == 50 - 3 * len(last) == 5


def test_different_salts_never_share() -> None:
    p, eps = policy(), endpoints(2)
    home = p.pick("m", eps, idle(eps), chat(SYSTEM, "q", cache_salt="tenant-a")).replica_id
    other = "r1" if home == "r0" else "r0"
    # The same prompt with another salt (or none) matches nothing: the idle replica with fewer blocks takes it.
    assert p.pick("m", eps, idle(eps), chat(SYSTEM, "q", cache_salt="tenant-b")).replica_id == other
    assert p.stats["m"].hit_blocks == 0
    assert p.pick("m", eps, idle(eps), chat(SYSTEM, "q2", cache_salt="tenant-a")).replica_id == home
    assert p.stats["m"].hit_blocks > 0


def test_a_retry_reuses_the_hashes_and_records_the_new_replica() -> None:
    p, eps = policy(), endpoints(2)
    key = chat(SYSTEM, "q")
    first = p.pick("m", eps, idle(eps), key)
    hashes = key.prefix
    assert hashes
    second = p.pick("m", [e for e in eps if e.replica_id != first.replica_id], idle(eps), key)
    assert key.prefix is hashes and second.replica_id != first.replica_id
    assert set(p.index.match(hashes, ["r0", "r1"], p.index.clock())) == {"r0", "r1"}


def test_index_memory_per_block_is_what_the_readme_says() -> None:
    """PREFIX_ROUTING_BLOCKS' README line gives the memory per block: about 0.3 KiB."""
    p, eps = policy(max_blocks=10_000), endpoints(2)
    for i in range(100):
        p.pick("m", eps, idle(eps), completion(f"prompt {i} " * 150))
    entries = p.index._entries
    per_block = (sys.getsizeof(entries) + sum(sys.getsizeof(v) + 32 for v in entries.values())) / len(entries)
    assert 200 < per_block < 450, per_block


@pytest.mark.parametrize("family", ["messages", "responses"])
def test_messages_and_responses_are_keyed_too(family: str) -> None:
    body = (
        {"system": SYSTEM, "messages": [{"role": "user", "content": "q"}]}
        if family == "messages"
        else {"instructions": SYSTEM, "input": "q"}
    )
    p, eps = policy(), endpoints(3)
    first = p.pick("m", eps, idle(eps), RequestKey(None, body, family)).replica_id
    assert p.pick("m", eps, idle(eps), RequestKey(None, dict(body), family)).replica_id == first
    assert p.stats["m"].hit_blocks >= len(SYSTEM) // BLOCK_CHARS
