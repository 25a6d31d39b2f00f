"""Fixtures shared by every test module."""

from __future__ import annotations

import functools
import importlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .secure_harness import SecureStack

# Set before any engine starts: no hub on these machines, and a small CPU KV cache per engine.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
# One OpenMP thread per CPU engine (the stacks run vLLM's `nobind`, tests/harness.py, where torch would take one per
# core): the tiny model gains nothing from a second thread, and on two cores shared by two pytest processes a
# thread waiting at OpenMP's barrier for its descheduled twin spins. 2,000 tokens with a busy loop beside the
# engine took 40 s and 60 CPU-seconds with two threads, 16 s and 29 with one (idle: 22 s / 43 and 13 s / 26).
os.environ["OMP_NUM_THREADS"] = "1"


def _shared_default(make: Any) -> Any:
    """`make` (a library's create_ssl_context) with its default context made once and then shared."""
    default = functools.cache(make)

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is True and cert is None and trust_env:
            return default()
        return make(verify=verify, cert=cert, trust_env=trust_env)

    return create_ssl_context


def _one_default_tls_context() -> None:
    """Every httpx client (and every `openai.OpenAI`, through its httpx2) loads certifi's CA bundle into a new SSL
    context: 60 ms of CPU a client, and the tests make a client for each call (`httpx.get`, each poll of a /health,
    a client per test). py-spy over a full run put 63% of the pytest processes' CPU there. The tests speak plain
    HTTP on loopback: the default context is made once per process and shared (any other `verify` as asked)."""
    for name in ("httpx._transports.default", "httpx2._transports.default"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.create_ssl_context = _shared_default(module.create_ssl_context)


_one_default_tls_context()

# Services started by tests without credentials run in local-development mode; tests/test_security.py and the
# fault and load tests configure keys explicitly.
os.environ.setdefault("SVLLM_AUTH", "off")


# The modules that share the session's credentialed stack (`secure_stack`): handed out as one unit (below), so one
# process starts that stack (and its engine), not each process that runs one of them; it stops after the last of them.
SHARED_STACK_MODULES = ("test_fuzz.py", "test_load.py", "test_security.py")
SHARED_STACK_GROUP = "secure-stack"


# End-to-end modules by how long they take, longest first: under pytest-xdist (the test command runs two processes,
# each handed the next module as it finishes one) a long module started last would finish alone while the other
# process idles. Seconds from SVLLM_TEST_TIMELINE and junit on a fresh clone (2026-12-03 21:26). The appliance's module
# comes fifth, not first: the test command builds its images ahead, in the background (minutes on a fresh machine),
# and it would otherwise wait for them in one process while the other ran alone.
LONG_MODULES = (
    "test_ray_mode.py",  # 203
    "test_faults.py",  # 189
    "test_lifecycle.py",  # 112
    "test_stream_migration.py",  # 83
    "test_appliance.py",  # 200 with the wait for its images
    "test_fuzz.py",  # 100, with load (51) and security (13): one group, 165 s and one stack start of 25
    "test_load.py",
    "test_security.py",
    "test_e2e_http.py",  # 85
    "test_draining.py",  # 78
    "test_endpoints.py",  # 77
    "test_engine.py",  # 77
    "test_lora.py",  # 66
    "test_tenants.py",  # 62
    "test_model_cache.py",  # 60
    "test_up.py",  # 42
    "test_observability.py",  # 41
    "test_prefetch.py",  # 34
    "test_fork_server.py",  # 31
    "test_cold_start_stream.py",  # 29
    "test_prefix_routing.py",  # 26
    "test_sleep_levels.py",  # 20
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first (seconds), then the end-to-end ones (minutes each), longest first: a broken module fails
    fast. The test command runs two pytest-xdist processes with `--dist loadfile` (a module's tests, and its
    module-scoped stack, stay in one process; the shared stack's modules are one unit: below)."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        if "/tests/unit/" in str(item.path):
            return (0, 0)
        if item.path.name in LONG_MODULES:
            return (1, LONG_MODULES.index(item.path.name))
        return (2, 0)

    items.sort(key=rank)  # stable: the file order is kept within each rank


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile`, with the modules of the shared stack handed out as one unit (xdist's `loadgroup` would
    do it by marks, but pytest 9 ignores the node id it rewrites)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedStackTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return SHARED_STACK_GROUP if Path(module).name in SHARED_STACK_MODULES else module

    return SharedStackTogether(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    """SVLLM_TEST_TIMELINE=FILE: each test's start and end by pytest-xdist process, appended to FILE (to see how
    the two processes share the suite, and what one idles behind)."""
    timeline = os.environ.get("SVLLM_TEST_TIMELINE")
    start = time.time()
    try:
        return (yield)
    finally:
        if timeline:
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            with open(timeline, "a") as out:
                out.write(f"{worker} {start:.1f} {time.time():.1f} {item.nodeid}\n")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama model (made once per session) that a real vLLM CPU engine can serve."""
    from serverless_vllm.testing.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a two-label sequence classifier (vLLM's classify task)."""
    from serverless_vllm.testing.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-classifier", classifier=True)


@pytest.fixture(scope="session")
def secure_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[SecureStack]:
    """Manager, router and one worker with credentials on, serving the tiny model as `tiny` (tests/secure_harness.py
    says with which settings); shared by the security, fuzz and load tests."""
    from .secure_harness import start_shared_stack

    stack = start_shared_stack(tmp_path_factory.mktemp("secure"), tiny_model)
    request.config.stash[_SHARED_STACK] = stack
    try:
        yield stack
    finally:
        stack.stop()


_SHARED_STACK = pytest.StashKey["SecureStack"]()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The shared stack stops after the last test of its modules (one unit, and side by side in LONG_MODULES, so
    they run one after the other), not at the session's end: the modules that follow do not run beside its engine."""
    if item.path.name in SHARED_STACK_MODULES and (nextitem is None or nextitem.path.name not in SHARED_STACK_MODULES):
        stack = item.config.stash.get(_SHARED_STACK, None)
        if stack is not None:
            stack.stop()
