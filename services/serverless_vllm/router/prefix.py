"""Prefix-aware routing (`routing: prefix`): a prompt goes to the replica that recently served the longest part of
it, whose engine most likely still holds that part in its prefix cache, unless that replica is busier than the
part is worth; a prompt with nothing seen goes to the less loaded of two.

What the router knows is text, not tokens: the prompt (chat and Messages: the messages' roles and text in order,
after the tools or system prompt; completions: the prompt; Responses: instructions and input; nothing
model-specific, no tokenizer, no chat template) is cut into blocks of BLOCK_CHARS characters, and each block's
hash is chained on the one before, as vLLM chains its block hashes: one hash names the whole prompt up to the end
of its block. The chain starts from the model alias and the request's `cache_salt`, so two models, or two salts,
never share an entry (an adapter, once the router routes by adapter, joins the start the same way).

The index (`PrefixIndex`) maps block hash -> {replica id: when it last served a prompt with that prefix}: it is
written when a replica is picked (before the engine has it cached: the next request with the same prefix, even a
concurrent one, goes there too), bounded in blocks (least recently used first out, the deepest blocks of a prompt
before its first ones) and in age (nothing older than the TTL counts; vLLM evicts too, and the router cannot see
it). Each router process learns from its own requests only (see docs/architecture.md: what sharing would cost).

Hashes use Python's `hash`, salted per process: they never leave the process, so that is enough, and it is the
cheapest hash there is. A model whose routing is not `prefix` never reaches this module.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..schemas import Endpoint
from .policy import RequestKey

BLOCK_CHARS = 128  # about 32 tokens of English text: vLLM's CPU blocks are 128 tokens, its GPU blocks 16
MAX_BLOCKS = 256  # the first 32 KiB characters of a prompt are hashed; prompts that agree that far are alike
_SEP, _ROLE = "\x1e", "\x1f"  # between messages, after a role: characters no text part is likely to hold
_NEVER = float("-inf")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "" if value is None else repr(value)  # content parts, items: the parsed JSON, written alike every time


def _messages(head: str, messages: Any) -> str:
    if not isinstance(messages, list):
        return head
    parts = [head]
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(f"{_SEP}{message.get('role')}{_ROLE}{content}")
        else:  # content parts (text, images), tool calls: the message as parsed
            parts.append(_SEP + repr(message))
    return "".join(parts)


def prompt_text(family: str, payload: Mapping[str, Any]) -> str:
    """The text a request's prompt starts with, as the router keys it ("" for an endpoint without a prompt)."""
    if family == "chat":
        return _messages(_text(payload.get("tools")), payload.get("messages"))
    if family == "completion":
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch goes to one replica: keyed by its first prompt
        return _text(prompt)
    if family == "messages":  # Anthropic: tools and the system prompt come first
        return _messages(_text(payload.get("tools")) + _SEP + _text(payload.get("system")), payload.get("messages"))
    if family == "responses":
        return _text(payload.get("instructions")) + _SEP + _text(payload.get("input"))
    return ""


def block_hashes(alias: str, family: str, payload: Mapping[str, Any] | None) -> list[int]:
    """The chained hashes of the prompt's whole blocks (at most MAX_BLOCKS), from a start that names the model and
    the request's cache_salt."""
    if payload is None:
        return []
    text = prompt_text(family, payload)
    end = min(len(text) // BLOCK_CHARS, MAX_BLOCKS) * BLOCK_CHARS
    h = hash((alias, repr(payload.get("cache_salt"))))
    hashes = []
    for start in range(0, end, BLOCK_CHARS):
        h = hash((h, text[start : start + BLOCK_CHARS]))
        hashes.append(h)
    return hashes


class PrefixIndex:
    """Block hash -> {replica id: when it last served a prompt through that block}, bounded in size and age.

    `held[replica]`: the blocks the index credits a replica with (its share of what the router has seen cached),
    which breaks ties between replicas that have no part of a new prompt."""

    def __init__(self, max_blocks: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._max = max_blocks
        self._ttl = ttl_s
        self.clock = clock
        self.held: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: Sequence[int], replicas: Iterable[str], now: float) -> dict[str, int]:
        """For each of `replicas` that served the first block of `hashes` within the TTL: how many leading blocks
        it served (replicas with none are left out)."""
        horizon = now - self._ttl
        depth: dict[str, int] = {}
        live = list(replicas)
        entries = self._entries
        for n, h in enumerate(hashes, 1):
            seen = entries.get(h)
            if seen is None:
                break
            live = [r for r in live if seen.get(r, _NEVER) > horizon]
            if not live:
                break
            for r in live:
                depth[r] = n
        return depth

    def record(self, hashes: Sequence[int], replica: str, now: float) -> None:
        """`replica` was sent a prompt with these blocks: each is credited to it, and is now the most recent."""
        entries, held = self._entries, self.held
        horizon = now - self._ttl
        for h in reversed(hashes):  # the first block last, most recent: the deepest blocks are the first out
            seen = entries.get(h)
            if seen is None:
                seen = entries[h] = {}
            else:
                entries.move_to_end(h)
                if len(seen) > 1:
                    for r in [r for r, t in seen.items() if t <= horizon]:
                        del seen[r]
                        self._release(r)
            if replica not in seen:
                held[replica] = held.get(replica, 0) + 1
            seen[replica] = now
        self._trim(horizon)

    def _trim(self, horizon: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if len(entries) <= self._max and max(oldest.values()) > horizon:
                return
            entries.popitem(last=False)
            for r in oldest:
                self._release(r)

    def _release(self, replica: str) -> None:
        left = self.held[replica] - 1
        if left:
            self.held[replica] = left
        else:
            del self.held[replica]


@dataclass(slots=True)
class PrefixStats:
    """What one model's prefix routing saw (this router): the metrics' hit ratio is hit_blocks / blocks."""

    blocks: int = 0  # whole blocks of the prompts routed
    hit_blocks: int = 0  # of those, the leading blocks the chosen replica had served (as far as the index knows)


class PrefixAffinity:
    """The `prefix` routing policy.

    Each candidate scores `spill * matched / blocks - in_flight`: the fraction of the prompt's blocks it served,
    worth up to `spill` requests in flight. So a replica that holds the whole prompt keeps getting it until it has
    more than `spill` requests in flight beyond the least loaded one; then the prompt spills to a second replica,
    which from then on holds it too, and the two share it by load. Ties: the deeper match, then the replica the
    index credits with fewer blocks, then at random. A prompt no candidate has any part of (or shorter than a
    block) goes to the less loaded of two candidates drawn at random (power of two choices), ties again to the one
    with fewer blocks, so that new prefixes spread over the replicas."""

    def __init__(
        self,
        max_blocks: int = 65536,
        ttl_s: float = 600.0,
        spill: float = 8.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.index = PrefixIndex(max_blocks, ttl_s, clock)
        self.stats: dict[str, PrefixStats] = {}  # by alias: models routed by prefix that this router has seen
        self._spill = spill
        self._rng = rng or random.Random()

    def pick(
        self, alias: str, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], key: RequestKey
    ) -> Endpoint:
        hashes = key.prefix
        if hashes is None:
            hashes = key.prefix = block_hashes(alias, key.family, key.payload)
        if not hashes:
            return self._least_loaded(candidates, in_flight)
        now = self.index.clock()
        depth = self.index.match(hashes, [e.replica_id for e in candidates], now)
        chosen = self._best(candidates, in_flight, depth, len(hashes)) if depth else None
        if chosen is None:
            chosen = self._least_loaded(candidates, in_flight)
        self.index.record(hashes, chosen.replica_id, now)
        stats = self.stats.get(alias)
        if stats is None:
            stats = self.stats[alias] = PrefixStats()
        stats.blocks += len(hashes)
        stats.hit_blocks += depth.get(chosen.replica_id, 0)
        return chosen

    def _best(
        self, candidates: Sequence[Endpoint], in_flight: Mapping[str, int], depth: Mapping[str, int], blocks: int
    ) -> Endpoint:
        held, worth = self.index.held, self._spill / blocks
        best: list[Endpoint] = []
        best_key: tuple[float, int, int] | None = None
        for e in candidates:
            rid = e.replica_id
            matched = depth.get(rid, 0)
            score = (matched * worth - in_flight[rid], matched, -held.get(rid, 0))
            if best_key is None or score > best_key:
                best_key, best = score, [e]
            elif score == best_key:
                best.append(e)
        return best[0] if len(best) == 1 else self._rng.choice(best)

    def _least_loaded(self, candidates: Sequence[Endpoint], in_flight: Mapping[str, int]) -> Endpoint:
        if len(candidates) > 2:
            candidates = self._rng.sample(candidates, 2)
        held = self.index.held
        low = min((in_flight[e.replica_id], held.get(e.replica_id, 0)) for e in candidates)
        tied = [e for e in candidates if (in_flight[e.replica_id], held.get(e.replica_id, 0)) == low]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    def retain(self, aliases: Callable[[str], bool]) -> None:
        """Forget the statistics of models for which `aliases` says no (gone, or routed otherwise now)."""
        for alias in [a for a in self.stats if not aliases(a)]:
            del self.stats[alias]
