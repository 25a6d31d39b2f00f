"""Shared pieces: exposition, buckets, and the one-hot "state" gauge shape."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.responses import Response

# Requests to LLMs last from tens of milliseconds to minutes (long generations, cold starts behind them).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Loading an engine: seconds for a tiny model on CPU, many minutes for a large one downloaded first.
STARTUP_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 900.0, 1800.0)

# The model label of requests whose model is not a registered alias (typos, probes, malformed bodies).
# Aliases must start with a letter or digit, so this value can never collide with a real one.
UNKNOWN_MODEL = "_unknown"


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


# The classic text format (0.0.4): what generate_latest writes for our legacy-style names, and what every
# Prometheus release parses (the client's "latest" announces 1.0.0, which older servers do not know).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def metrics_response(body: bytes) -> Response:
    return Response(content=body, media_type=CONTENT_TYPE)


def one_hot(name: str, documentation: str, labels: list[str], rows: Iterable[tuple[list[str], str]],
            states: Iterable[str]) -> GaugeMetricFamily:
    """A gauge with one series per state, 1 for the current state and 0 for the others.

    Every state is always present, so a panel or an alert sees a state go to 0 instead of vanishing.
    `rows` are (label values, current state); the `state` label is appended to `labels`.
    """
    family = GaugeMetricFamily(name, documentation, labels=[*labels, "state"])
    all_states = list(states)
    for values, current in rows:
        for state in all_states:
            family.add_metric([*values, state], 1.0 if state == current else 0.0)
    return family
