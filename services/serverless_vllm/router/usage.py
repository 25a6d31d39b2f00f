"""Usage of keys made at run time, counted by this router process: requests, prompt and completion tokens,
errors and throttled requests per key and model. Reported to the manager, which sums every router's
(router/usage_report.py; `GET /v1/usage` answers from there), and served as Prometheus metrics of this process,
summed per tenant and model (bounded labels: tenants and registered aliases, never keys)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..schemas import USAGE_COUNTS, UsageRow
from ..security.keys import ActiveKey


@dataclass(slots=True)
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0  # answered with a status of 400 or more (throttled ones not included)
    throttled: int = 0  # refused with a 429 by the key's limits


# (key id, key name, tenant, model label)
UsageKey = tuple[str, str, str, str]
_FIELDS = tuple(USAGE_COUNTS)
_ZERO = (0,) * len(_FIELDS)
_LABELS = ["tenant", "model"]
_counts = attrgetter(*_FIELDS)  # a row's counts as a tuple, in _FIELDS' order (one C call a row)
_KEY_ROWS = 1024  # rows remembered on each key (security/keys.py)


class UsageBook:
    def __init__(self, model_label: Callable[[str], str]) -> None:
        self._label = model_label  # registered aliases only: a client cannot grow the label set
        self._rows: dict[UsageKey, Usage] = {}
        self._reported: dict[UsageKey, tuple[int, ...]] = {}  # each row's counts as last handed to a report

    def row(self, key: ActiveKey, alias: str) -> Usage:
        label = self._label(alias)
        where = (key.id, key.name, key.tenant, label)
        usage = self._rows.get(where)
        if usage is None:
            usage = self._rows[where] = Usage()
        if label == alias and len(key.usage_rows) < _KEY_ROWS:  # registered models only: a bounded set
            key.usage_rows[alias] = usage  # the next request of this key and model finds it there
        return usage

    def take_increments(self) -> list[UsageRow]:
        """What each row gained since the last call (rows that did not change: none). A pass over every row, made
        once per report rather than a mark per request on the hot path."""
        out: list[UsageRow] = []
        for where, usage in self._rows.items():
            counts = _counts(usage)
            before = self._reported.get(where, _ZERO)
            if counts != before:
                self._reported[where] = counts
                kid, name, tenant, model = where
                gained = dict(zip(_FIELDS, (now - then for now, then in zip(counts, before, strict=True)), strict=True))
                out.append(UsageRow(key_id=kid, key_name=name, tenant=tenant, model=model, **gained))
        return out

    def per_tenant(self) -> dict[tuple[str, str], Usage]:
        totals: dict[tuple[str, str], Usage] = {}
        for (_, _, tenant, model), usage in self._rows.items():
            total = totals.setdefault((tenant, model), Usage())
            for f in _FIELDS:
                setattr(total, f, getattr(total, f) + getattr(usage, f))
        return totals


class UsageCollector(Collector):
    """The book as Prometheus counters, per tenant and model, and the fair queue's waiters (this router process)."""

    def __init__(
        self, book: UsageBook, waiting: Callable[[], dict[tuple[str, str], int]], dropped: Callable[[], int]
    ) -> None:
        self._book = book
        self._waiting = waiting  # the fair queue's waiters by model and priority class (FAIR_QUEUE)
        self._dropped = dropped  # usage reports the manager refused for good (router/usage_report.py)

    def collect(self) -> Iterator[Metric]:
        families = {
            f: CounterMetricFamily(f"svllm_tenant_{f}", f"{doc}, per tenant and model (this router).", labels=_LABELS)
            for f, doc in USAGE_COUNTS.items()
        }
        for (tenant, model), usage in sorted(self._book.per_tenant().items()):
            for f, family in families.items():
                family.add_metric([tenant, model], getattr(usage, f))
        yield from families.values()
        waiting = GaugeMetricFamily(
            "svllm_router_fair_queue_waiting",
            "Requests of keys waiting for a slot of their model (FAIR_QUEUE), by priority class (this router).",
            labels=["model", "priority"],
        )
        for (model, priority), n in sorted(self._waiting().items()):
            waiting.add_metric([model, priority], n)
        yield waiting
        yield CounterMetricFamily(
            "svllm_router_usage_reports_dropped",
            "Usage reports the manager refused as they were (a 4xx), dropped with their rows (this router).",
            value=self._dropped(),
        )
