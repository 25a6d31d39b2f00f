"""How the test command hands modules to its two pytest-xdist processes (tests/conftest.py): a module per unit, the
three modules of the shared credentialed stack as one, so one process starts that stack. Driven through xdist's own
scheduler with two stand-in nodes (they only record the tests they are sent), so an xdist that stopped calling the
scope hook would split the three again and fail this."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tests.conftest import pytest_xdist_make_scheduler

COLLECTION = [
    "tests/test_fuzz.py::test_a",
    "tests/test_fuzz.py::test_b[x]",
    "tests/test_load.py::test_c",
    "tests/test_security.py::test_d",
    "tests/test_security.py::test_e",
    "tests/test_lora.py::test_f",
    "tests/test_lora.py::test_g",
    "tests/test_up.py::test_h",
]


class _Config:
    """What the scheduler reads of pytest's config: the distribution mode, the processes (`-n 2`) and the test
    command's `--no-loadscope-reorder`."""

    def __init__(self, dist: str) -> None:
        self.values: dict[str, Any] = {"dist": dist, "tx": ["2*popen"]}
        self.option = SimpleNamespace(loadscopereorder=False)

    def getoption(self, name: str) -> Any:
        return self.values[name]

    getvalue = getoption


class _Node:
    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.sent: list[str] = []
        self.shutting_down = False
        self.ran = 0

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent.extend(COLLECTION[i] for i in indices)

    def shutdown(self) -> None:
        pass


def _modules(node: _Node) -> set[str]:
    return {nodeid.split("::")[0].rsplit("/", 1)[1] for nodeid in node.sent}


def test_the_shared_stacks_modules_go_to_one_process_and_every_other_module_stays_whole() -> None:
    scheduler = pytest_xdist_make_scheduler(_Config("loadfile"), None)  # type: ignore[arg-type]
    nodes = [_Node("gw0"), _Node("gw1")]
    for node in nodes:
        scheduler.add_node(node)
    for node in nodes:
        scheduler.add_node_collection(node, COLLECTION)
    scheduler.schedule()
    done = 0
    while done < sum(len(node.sent) for node in nodes):  # each node runs what it was sent, and is sent more
        for node in nodes:
            for nodeid in node.sent[node.ran :]:
                node.ran += 1
                done += 1
                scheduler.mark_test_complete(node, COLLECTION.index(nodeid))

    assert sorted(nodeid for node in nodes for nodeid in node.sent) == sorted(COLLECTION)  # every test, once
    shared = {"test_fuzz.py", "test_load.py", "test_security.py"}
    holders = [node for node in nodes if _modules(node) & shared]
    assert len(holders) == 1 and shared <= _modules(holders[0]), [node.sent for node in nodes]
    for module in ("test_lora.py", "test_up.py"):
        assert sum(module in _modules(node) for node in nodes) == 1, [node.sent for node in nodes]


def test_other_distribution_modes_are_xdists_own() -> None:
    assert pytest_xdist_make_scheduler(_Config("load"), None) is None  # type: ignore[arg-type]
