"""The garbage collector and a long-running service: what was built at startup is not scanned again."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Call once a service has started. Its startup objects (the app, its routes, pydantic's schemas, the
    libraries' module state: about 60,000 in the router) move to the collector's permanent generation, so a
    full collection while serving scans only what serving allocated, not them too: about 24 ms less per full
    collection on these machines, a pause every request in flight waits for. Objects frozen are still freed
    when their references go; only a reference cycle among them would stay. vLLM and Ray Serve do the same
    after their own startup (vllm.utils.gc_utils.freeze_gc_heap, RAY_SERVE_FREEZE_GC_ON_STARTUP)."""
    gc.collect()
    gc.freeze()
