"""What routers receive and send: the routing table, and the demand they report."""

from __future__ import annotations

from pydantic import BaseModel, Field

from .models import ModelState, ModelTask, Routing


class Endpoint(BaseModel):
    replica_id: str
    worker_id: str
    url: str


class ModelRoute(BaseModel):
    state: ModelState
    task: ModelTask = ModelTask.GENERATE  # which endpoints it serves: refused at the router otherwise
    # How the router picks among the endpoints; left out of the JSON when it is the default (most routes).
    routing: Routing = Field(default=Routing.SESSION, exclude_if=lambda v: v is Routing.SESSION)
    endpoints: list[Endpoint] = []  # ready replicas only
    error: str | None = None  # why the model is failed (state FAILED)
    created: int = 0  # registration time (unix seconds), for the OpenAI model list
    # Loading: when it is expected ready (unix seconds), from its past starts. Left out of the JSON when unknown (most
    # routes): the table of 10,000 models stays as small as before.
    ready_at: float | None = Field(default=None, exclude_if=lambda v: v is None)
    # A LoRA adapter: its base's alias (OpenAI's and vLLM's `parent`); its endpoints are the base's replicas holding it.
    parent: str | None = Field(default=None, exclude_if=lambda v: v is None)
    # Its engines schedule by priority (vLLM's --scheduling-policy priority): the router passes a key's class on.
    priority_scheduling: bool = Field(default=False, exclude_if=lambda v: not v)


class RoutingTable(BaseModel):
    """What the router needs to serve without asking the manager: every registered alias and its ready replicas."""

    version: int
    epoch: str  # changes when the manager restarts, so routers never mistake an old version for a new one
    models: dict[str, ModelRoute]


class ModelLoad(BaseModel):
    in_flight: int = 0
    queued: int = 0
    requests: int = 0  # requests started since the previous report
    replicas: dict[str, int] = Field(default={}, exclude_if=lambda v: not v)  # replica id -> in flight (busy ones)


class DemandReport(BaseModel):
    """Router -> manager, periodically and on cold start: load per model, off the hot path."""

    router_id: str
    models: dict[str, ModelLoad] = {}
    wake: list[str] = []  # aliases with requests waiting and no ready replica
    failed_endpoints: list[Endpoint] = []  # upstreams that refused connections


class PlacementRejection(BaseModel):
    worker_id: str
    reason: str
