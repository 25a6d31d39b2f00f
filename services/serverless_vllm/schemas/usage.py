"""Usage of keys made at run time, as routers report it to the manager and `GET /v1/usage` shows it: per key and
model, requests, prompt and completion tokens, errors and throttled requests."""

from __future__ import annotations

from pydantic import BaseModel, Field

# Bounds that keep every value and its sums within SQLite's 64-bit integers (the manager's ledger): no router counts
# 10^15 of anything between two reports.
MAX_COUNT = 10**15
MAX_SEQ = 2**62

# A usage row's counts, in this order everywhere (the manager's ledger columns, the routers' and the manager's
# metrics), and what each counts.
USAGE_COUNTS: dict[str, str] = {
    "requests": "Requests of API keys made at run time",
    "prompt_tokens": "Prompt tokens of those requests, from the engines' usage",
    "completion_tokens": "Completion tokens of those requests, from the engines' usage",
    "errors": "Those requests answered with a status of 400 or more (throttled ones not included)",
    "throttled": "Requests refused with 429 by their key's or tenant's limits",
}


class UsageRow(BaseModel):
    key_id: str = Field(max_length=128)
    key_name: str = Field(max_length=128)  # as the key was named and filed when the request was counted
    tenant: str = Field(max_length=128)
    model: str = Field(max_length=256)
    requests: int = Field(0, ge=0, le=MAX_COUNT)
    prompt_tokens: int = Field(0, ge=0, le=MAX_COUNT)
    completion_tokens: int = Field(0, ge=0, le=MAX_COUNT)
    errors: int = Field(0, ge=0, le=MAX_COUNT)  # answered with a status of 400 or more (throttled ones not included)
    throttled: int = Field(0, ge=0, le=MAX_COUNT)  # refused with a 429 by the key's limits


class UsageReport(BaseModel):
    """What one router process counted since its previous report (its rows are increments). `seq` numbers the
    process's reports from 1: the manager applies each (reporter, seq) once, so a report resent after its answer
    was lost is not counted twice."""

    reporter: str = Field(min_length=1, max_length=128)  # one router process, for as long as it runs
    seq: int = Field(ge=1, le=MAX_SEQ)
    rows: list[UsageRow] = Field(max_length=1_000_000)
