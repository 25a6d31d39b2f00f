"""Headers that router and worker exchange on the request path, and the body limit both enforce."""

from __future__ import annotations

# A worker sets this header on a 503 meaning "that replica is not here (any more)": safe to retry elsewhere. Its
# value ADAPTER_MOVED: the replica is here but the LoRA adapter asked for is not loaded in it (any more): the
# adapter may come back to it, so the router skips it only until its routing table changes.
RETRY_HEADER = "x-svllm-retry"
ADAPTER_MOVED = "adapter"
# The router names the replica it chose; the worker serves the request from that engine only.
REPLICA_HEADER = "x-svllm-replica"
# A client's session key: requests with the same key go to the same replica while it exists.
SESSION_HEADER = "x-session-id"
# Inference bodies above this are refused (413) unless a service is configured otherwise (MAX_BODY_BYTES).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
