"""Usage summed over router processes, in process: the manager's ledger (SQLite, each report applied once, kept
across a reopen of the file) and a router's reporter against it, with faults injected between them (a report the
manager never got, and one it applied whose answer was lost). tests/test_tenants.py runs it on the real stack."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from serverless_vllm.errors import APIError
from serverless_vllm.manager.usage_ledger import UsageLedger
from serverless_vllm.router import usage_report
from serverless_vllm.router.usage import UsageBook, UsageCollector
from serverless_vllm.router.usage_report import UsageReporter
from serverless_vllm.schemas import KeyLimits, Priority, UsageReport, UsageRow
from serverless_vllm.security.keys import ActiveKey


def row(key_id: str = "key-1", model: str = "tiny", tenant: str = "t", **counts: int) -> UsageRow:
    return UsageRow(key_id=key_id, key_name=f"name-{key_id}", tenant=tenant, model=model, **counts)


def counts(ledger: UsageLedger, **where: str) -> list[tuple[str, str, int, int, int, int, int]]:
    return [
        (r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.errors, r.throttled)
        for r in ledger.rows(**where)
    ]


def test_a_report_is_applied_once_and_reporters_are_summed(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "m.db"))
    first = UsageReport(reporter="r1/a", seq=1, rows=[row(requests=2, prompt_tokens=10, completion_tokens=5)])
    assert ledger.apply(first)
    assert not ledger.apply(first)  # sent again after its answer was lost
    assert not ledger.apply(UsageReport(reporter="r1/a", seq=1, rows=[row(requests=9)]))
    assert ledger.apply(UsageReport(reporter="r2/b", seq=1, rows=[row(requests=1, errors=1), row("key-2", tenant="u")]))
    assert ledger.apply(UsageReport(reporter="r1/a", seq=2, rows=[row(requests=1, throttled=3, prompt_tokens=4)]))
    assert counts(ledger) == [("key-1", "tiny", 4, 14, 5, 1, 3), ("key-2", "tiny", 0, 0, 0, 0, 0)]
    assert counts(ledger, key_id="key-2") == [("key-2", "tiny", 0, 0, 0, 0, 0)]
    assert counts(ledger, tenant="t") == [("key-1", "tiny", 4, 14, 5, 1, 3)]
    assert counts(ledger, tenant="nobody") == []
    ledger.close()
    reopened = UsageLedger(str(tmp_path / "m.db"))  # the manager restarted: the sums and the numbering stay
    assert counts(reopened) == [("key-1", "tiny", 4, 14, 5, 1, 3), ("key-2", "tiny", 0, 0, 0, 0, 0)]
    assert not reopened.apply(first)


def test_tenant_sums_stay_with_the_tenant_a_request_was_counted_for(tmp_path: Path) -> None:
    """The manager's svllm_usage_* counters read these sums: over every reporter, applied once, and never lower
    than before (a counter that fell would read as a reset to Prometheus), even when a key moves to another
    tenant; a file from before the sums existed gets them from its keys' rows."""
    ledger = UsageLedger(str(tmp_path / "m.db"))
    ledger.apply(
        UsageReport(reporter="r1/a", seq=1, rows=[row(requests=2, prompt_tokens=10), row("key-2", tenant="u")])
    )
    ledger.apply(UsageReport(reporter="r2/b", seq=1, rows=[row(requests=1, completion_tokens=4, errors=1)]))
    assert not ledger.apply(UsageReport(reporter="r2/b", seq=1, rows=[row(requests=1)]))
    assert ledger.tenant_totals() == [("t", "tiny", (3, 10, 4, 1, 0)), ("u", "tiny", (0, 0, 0, 0, 0))]
    # key-1 moved to tenant u: its next requests count for u; t keeps what was counted for it.
    ledger.apply(UsageReport(reporter="r1/a", seq=2, rows=[row(requests=5, tenant="u", throttled=1)]))
    assert ledger.tenant_totals() == [("t", "tiny", (3, 10, 4, 1, 0)), ("u", "tiny", (5, 0, 0, 0, 1))]
    assert counts(ledger, tenant="u") == [("key-1", "tiny", 8, 10, 4, 1, 1), ("key-2", "tiny", 0, 0, 0, 0, 0)]
    ledger.close()
    # A file written before the tenant sums: they start from its keys' rows, under each key's current tenant.
    db = sqlite3.connect(tmp_path / "m.db")
    db.execute("DROP TABLE tenant_usage")
    db.commit()
    db.close()
    reopened = UsageLedger(str(tmp_path / "m.db"))
    assert reopened.tenant_totals() == [("u", "tiny", (8, 10, 4, 1, 1))]  # key-1 and key-2, both in u now
    reopened.close()


def test_reports_refuse_counts_and_numbers_the_ledger_cannot_hold() -> None:
    """Negative, or past SQLite's 64-bit integers (the fuzzer's 2.6e24 prompt tokens were a 500 before)."""
    for bad in (-1, 2661093074530007456415744):
        with pytest.raises(ValidationError):
            row(requests=bad)
        with pytest.raises(ValidationError):
            row(prompt_tokens=bad)
    for seq in (0, 2**63):
        with pytest.raises(ValidationError):
            UsageReport(reporter="r", seq=seq, rows=[])


class LedgerManager:
    """The manager's side of report_usage, over a real ledger, with faults injected: `lose_before` drops the next
    report before the manager sees it, `lose_answer` applies it and then loses the answer."""

    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger
        self.lose_before = False
        self.lose_answer = False
        self.sent: list[tuple[str, int]] = []
        self.rows: list[list[UsageRow]] = []

    async def report_usage(self, report: UsageReport) -> None:
        self.sent.append((report.reporter, report.seq))
        self.rows.append(report.rows)
        if self.lose_before:
            self.lose_before = False
            raise ConnectionError("injected: the report never reached the manager")
        self.ledger.apply(report)
        if self.lose_answer:
            self.lose_answer = False
            raise ConnectionError("injected: the manager applied the report, its answer was lost")


def key(key_id: str) -> ActiveKey:
    return ActiveKey(key_id, f"name-{key_id}", "t", Priority.NORMAL, KeyLimits(), None, False, frozenset(), ("*",))


async def test_a_failed_report_is_sent_again_as_it_was_and_nothing_is_counted_twice(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "m.db"))
    manager = LedgerManager(ledger)
    book = UsageBook(lambda alias: alias)
    reporter = UsageReporter(manager, book, "router-a", 3600.0)  # type: ignore[arg-type]  # report_usage only
    usage = book.row(key("key-1"), "tiny")

    def serve(prompt: int, completion: int) -> None:
        usage.requests += 1
        usage.prompt_tokens += prompt
        usage.completion_tokens += completion

    serve(10, 5)
    manager.lose_answer = True
    with pytest.raises(ConnectionError):
        await reporter.flush()
    serve(7, 3)
    await reporter.flush()  # report 1 again (ignored: applied), then report 2 with the second request
    manager.lose_before = True
    serve(1, 1)
    with pytest.raises(ConnectionError):
        await reporter.flush()
    await reporter.flush()  # report 3 again: applied now
    await reporter.flush()  # nothing new: nothing sent
    assert counts(ledger) == [("key-1", "tiny", 3, 18, 9, 0, 0)]
    seqs = [seq for _, seq in manager.sent]
    assert seqs == [1, 1, 2, 3, 3]
    assert len({name for name, _ in manager.sent}) == 1 and manager.sent[0][0].startswith("router-a/")


async def test_a_new_process_reports_under_a_new_name_and_adds_to_the_sums(tmp_path: Path) -> None:
    ledger = UsageLedger(str(tmp_path / "m.db"))
    manager = LedgerManager(ledger)
    sums: list[Any] = []
    for _ in range(2):  # the same router id, restarted: its second process numbers its reports from 1 again
        book = UsageBook(lambda alias: alias)
        book.row(key("key-1"), "tiny").requests += 2
        await UsageReporter(manager, book, "router-a", 3600.0).flush()  # type: ignore[arg-type]
        sums.append(counts(ledger))
    assert sums == [[("key-1", "tiny", 2, 0, 0, 0, 0)], [("key-1", "tiny", 4, 0, 0, 0, 0)]]
    assert [seq for _, seq in manager.sent] == [1, 1]


async def test_many_rows_go_as_several_reports_each_sent_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage_report, "MAX_ROWS_PER_REPORT", 2)
    ledger = UsageLedger(str(tmp_path / "m.db"))
    manager = LedgerManager(ledger)
    book = UsageBook(lambda alias: alias)
    reporter = UsageReporter(manager, book, "router-a", 3600.0)  # type: ignore[arg-type]  # report_usage only
    for i in range(5):
        book.row(key(f"key-{i}"), "tiny").requests += i + 1
    manager.lose_answer = True  # the first report applied, its answer lost
    with pytest.raises(ConnectionError):
        await reporter.flush()
    book.row(key("key-0"), "tiny").requests += 10  # counted while reports 1-3 wait: sent after them
    await reporter.flush()
    assert [seq for _, seq in manager.sent] == [1, 1, 2, 3, 4]
    assert [len(r) for r in manager.rows] == [2, 2, 2, 1, 1]
    summed = {r.key_id: r.requests for r in ledger.rows()}
    assert summed == {"key-0": 11, "key-1": 2, "key-2": 3, "key-3": 4, "key-4": 5}


async def test_a_flush_under_traffic_ends(tmp_path: Path) -> None:
    """Requests counted while a report is on its way go with the next flush: a flush that took them as well never
    ended under load (bench/tenant_keys.py saw the reporter take 16% of a busy router's samples)."""
    ledger = UsageLedger(str(tmp_path / "m.db"))
    manager = LedgerManager(ledger)
    book = UsageBook(lambda alias: alias)
    usage = book.row(key("key-1"), "tiny")
    traffic = LedgerManager(ledger)

    async def report_while_requests_arrive(report: UsageReport) -> None:
        usage.requests += 1  # a request counted while this report is sent
        await asyncio.sleep(0)  # on its way, as over HTTP: the flush's deadline can fire
        await traffic.report_usage(report)

    manager.report_usage = report_while_requests_arrive  # type: ignore[method-assign]
    reporter = UsageReporter(manager, book, "router-a", 3600.0)  # type: ignore[arg-type]  # report_usage only
    usage.requests += 1
    await asyncio.wait_for(reporter.flush(), 5.0)
    await asyncio.wait_for(reporter.flush(), 5.0)
    assert [seq for _, seq in traffic.sent] == [1, 2] and [r.requests for r in ledger.rows()] == [2]


async def test_a_report_refused_for_good_is_dropped_and_the_next_ones_go_on(tmp_path: Path) -> None:
    """A 4xx (other than 408 and 429) would be refused again at every try: before, it held back every later report
    and made every `GET /v1/usage` fail. It is dropped and counted; a 503 or a 429 is still sent again as it was."""
    ledger = UsageLedger(str(tmp_path / "m.db"))
    manager = LedgerManager(ledger)
    refusals: list[APIError] = []
    apply = manager.report_usage

    async def refusing(report: UsageReport) -> None:
        if refusals:
            manager.sent.append((report.reporter, report.seq))
            raise refusals.pop(0)
        await apply(report)

    manager.report_usage = refusing  # type: ignore[method-assign]
    book = UsageBook(lambda alias: alias)
    reporter = UsageReporter(manager, book, "router-a", 3600.0)  # type: ignore[arg-type]  # report_usage only
    usage = book.row(key("key-1"), "tiny")
    for status in (503, 429, 408):  # the manager away, or asking to wait: kept, and sent again
        usage.requests += 1
        refusals.append(APIError(status, "injected", "injected"))
        with pytest.raises(APIError):
            await reporter.flush()
    assert reporter.dropped == 0
    await reporter.flush()
    assert counts(ledger) == [("key-1", "tiny", 3, 0, 0, 0, 0)]
    usage.requests += 10
    refusals.append(APIError(422, "injected: a manager of another version", "invalid_request"))
    await reporter.flush()  # report 3 refused for good: dropped, and the flush does not fail
    assert reporter.dropped == 1
    usage.requests += 100
    await reporter.flush()  # report 4 goes on
    assert counts(ledger) == [("key-1", "tiny", 103, 0, 0, 0, 0)]
    assert [seq for _, seq in manager.sent] == [1, 1, 1, 1, 2, 3, 4]
    # And Prometheus sees it (router/tenants.py hands the collector the reporter's count).
    collected = {m.name: m for m in UsageCollector(book, dict, lambda: reporter.dropped).collect()}
    dropped = collected["svllm_router_usage_reports_dropped"].samples
    assert [(s.name, s.value) for s in dropped] == [("svllm_router_usage_reports_dropped_total", 1)]
