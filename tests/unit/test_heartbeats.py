"""The heartbeat state machine: healthy -> unhealthy -> dead -> forgotten, recovery, and re-registration."""

from serverless_vllm.manager.workers import WorkerRegistry
from serverless_vllm.schemas import Heartbeat, WorkerRegistration, WorkerState


def reg(wid: str = "w1") -> WorkerRegistration:
    return WorkerRegistration(worker_id=wid, url="http://127.0.0.1:7000", cpu_slots=1)


def test_unhealthy_after_timeout_then_dead_after_twice() -> None:
    registry = WorkerRegistry(timeout=10)
    registry.register(reg(), now=0)
    assert registry.sweep(now=9) == []
    changes = registry.sweep(now=11)
    assert [(w.worker_id, s) for w, s in changes] == [("w1", WorkerState.UNHEALTHY)]
    assert registry.healthy() == []
    changes = registry.sweep(now=21)
    assert [(w.worker_id, s) for w, s in changes] == [("w1", WorkerState.DEAD)]
    assert registry.sweep(now=100) == []  # no repeated transitions


def test_heartbeat_restores_an_unhealthy_worker() -> None:
    registry = WorkerRegistry(timeout=10)
    registry.register(reg(), now=0)
    registry.sweep(now=15)
    assert registry.heartbeat(Heartbeat(worker_id="w1"), now=16) is not None
    assert registry.get("w1").state is WorkerState.HEALTHY


def test_unknown_or_dead_worker_is_told_to_register_again() -> None:
    registry = WorkerRegistry(timeout=10)
    assert registry.heartbeat(Heartbeat(worker_id="ghost"), now=0) is None
    registry.register(reg(), now=0)
    registry.sweep(now=25)
    assert registry.heartbeat(Heartbeat(worker_id="w1"), now=26) is None
    registry.register(reg(), now=27)
    assert registry.get("w1").state is WorkerState.HEALTHY


def test_mark_dead_is_immediate_and_once() -> None:
    registry = WorkerRegistry(timeout=10)
    registry.register(reg(), now=0)
    assert registry.mark_dead("w1", now=1) is not None
    assert registry.mark_dead("w1", now=2) is None
    assert registry.get("w1").dead_since == 1


def test_dead_workers_are_forgotten_after_the_retention() -> None:
    registry = WorkerRegistry(timeout=10)
    registry.register(reg("w1"), now=0)
    registry.register(reg("w2"), now=0)
    registry.register(reg("w3"), now=0)
    registry.mark_dead("w3", now=5)  # a refused probe: dead at once
    for t in range(1, 21):
        registry.heartbeat(Heartbeat(worker_id="w2"), now=t)
    assert [w.worker_id for w, _ in registry.sweep(now=21)] == ["w1"]  # dead since 21
    assert registry.expire_dead(now=104, retention=100) == []
    assert [w.worker_id for w in registry.expire_dead(now=105, retention=100)] == ["w3"]
    assert [w.worker_id for w in registry.all()] == ["w1", "w2"]
    assert registry.expire_dead(now=120, retention=100) == []
    assert [w.worker_id for w in registry.expire_dead(now=121, retention=100)] == ["w1"]
    assert [w.worker_id for w in registry.all()] == ["w2"]  # the live one stays, however old
    assert registry.heartbeat(Heartbeat(worker_id="w1"), now=122) is None  # unknown: register again
    registry.register(reg("w1"), now=123)
    assert registry.get("w1").state is WorkerState.HEALTHY and registry.get("w1").dead_since is None
