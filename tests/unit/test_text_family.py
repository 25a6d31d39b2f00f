"""metrics.common.TextFamily: the manager's direct writer of the Prometheus text format, against prometheus_client's
own writer and parser for the same family."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from serverless_vllm.metrics.common import TextFamily, one_hot

ODD = 'a "quoted" back\\slash\nnewline'


def parsed(text: str) -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
    return [
        (f.name, f.type, f.documentation, [(s.name, s.labels, s.value) for s in f.samples])
        for f in text_string_to_metric_families(text)
    ]


def reference(*families: GaugeMetricFamily | CounterMetricFamily) -> str:
    registry = CollectorRegistry()

    class Fixed:
        def collect(self) -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
            return families

    registry.register(Fixed())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_gauge_reads_back_as_prometheus_client_writes_it() -> None:
    ours = TextFamily("svllm_x", "gauge", "Doc with a \\ and\na newline.", ["model", "state"])
    theirs = GaugeMetricFamily("svllm_x", "Doc with a \\ and\na newline.", labels=["model", "state"])
    for values, value in ((("m1", "ready"), 1), (("m2", ODD), 0.5), (("m3", "cold"), 12345678.0)):
        ours.add(values, value)
        theirs.add_metric(list(values), value)
    assert parsed(ours.text()) == parsed(reference(theirs))
    assert '{model="m2",state="a \\"quoted\\" back\\\\slash\\nnewline"} 0.5\n' in ours.text()


def test_counter_and_unlabelled_series() -> None:
    ours = TextFamily("svllm_y_total", "counter", "Things.")
    ours.add((), 3)
    assert ours.text() == "# HELP svllm_y_total Things.\n# TYPE svllm_y_total counter\nsvllm_y_total 3.0\n"
    assert parsed(ours.text()) == parsed(reference(CounterMetricFamily("svllm_y", "Things.", value=3)))


def test_one_hot_writes_every_state() -> None:
    family = one_hot(
        TextFamily("svllm_s", "gauge", "States.", ["worker", "state"]), [(("w1",), "b"), (("w2",), "a")], ["a", "b"]
    )
    assert [(s[1]["worker"], s[1]["state"], s[2]) for s in parsed(family.text())[0][3]] == [
        ("w1", "a", 0.0),
        ("w1", "b", 1.0),
        ("w2", "a", 1.0),
        ("w2", "b", 0.0),
    ]
