"""What the router makes when it starts, as one object: its routes read it through `AppState[RouterState].get`."""

from __future__ import annotations

from dataclasses import dataclass

from ..dataplane.relay import UpstreamClient
from ..manager.protocol import ManagerAPI
from .proxy import Forwarder
from .responses import ResponsesRouter
from .sync import ManagerSync
from .table import RouteTable


@dataclass(frozen=True, slots=True)
class RouterState:
    manager: ManagerAPI  # the manager's API: HTTP client, or the Ray actor's handle in hybrid mode
    table: RouteTable  # the local routing table and in-flight counters
    sync: ManagerSync  # keeps `table` in step with the manager, reports load
    client: UpstreamClient  # pooled connections to the workers
    forwarder: Forwarder  # the hot path: pick a replica (or hold), relay, retry once
    responses: ResponsesRouter  # stored Responses: to the replica that holds them
