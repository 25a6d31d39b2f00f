"""Shared pieces: exposition (prometheus_client's, and a direct one for large families), buckets, the one-hot
"state" gauge shape."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
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


class TextFamily:
    """One metric family in the Prometheus text format (0.0.4), written straight to strings.

    For the manager's fleet series and cold-start counts, ~50,000 of the ~70,000 a scrape holds with 10,000
    models and 1,000 workers: prometheus_client builds a sample tuple and a labels dict for each (containers
    the garbage collector must track, whose collections stalled the manager's event loop) and validates every
    label name again; here a series is one %-format of a template. Label values are escaped as the format
    requires; `kind` is the TYPE line's ("gauge", "counter": a counter's name carries its `_total`).
    """

    __slots__ = ("_lines", "_template")

    def __init__(self, name: str, kind: str, documentation: str, labels: Sequence[str] = ()) -> None:
        doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
        self._lines = [f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"]
        inner = ",".join(f'{label}="%s"' for label in labels)
        self._template = f"{name}{{{inner}}} %s\n" if labels else f"{name} %s\n"

    def add(self, values: Sequence[str], value: float) -> None:
        # repr() of a float is a number every Prometheus parses (prometheus_client's Go-style formatting differs
        # only in writing 1e+06 where repr writes 1000000.0) at a third of the cost.
        self._lines.append(self._template % (*map(_escape_label_value, values), repr(float(value))))

    def text(self) -> str:
        return "".join(self._lines)


def _escape_label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def one_hot(family: TextFamily, rows: Iterable[tuple[Sequence[str], str]], states: Sequence[str]) -> TextFamily:
    """Fill a gauge with one series per state, 1 for the current state and 0 for the others.

    Every state is always present, so a panel or an alert sees a state go to 0 instead of vanishing.
    `rows` are (label values, current state); the family's last label is the state.
    """
    for values, current in rows:
        for state in states:
            family.add([*values, state], 1.0 if state == current else 0.0)
    return family
