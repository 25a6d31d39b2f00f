"""Placement: memory-aware GPU sharing, CPU fallback, explained rejections, LRU eviction."""

import pytest
from serverless_vllm.manager.gpu_memory import foreign_memory_mb
from serverless_vllm.manager.placement import (
    EvictionCandidate,
    PlacementError,
    WorkerCapacity,
    claim,
    place,
    plan_eviction,
)
from serverless_vllm.schemas import EngineArgs, EngineStatus, GPUInfo, PlacementRejection, ReplicaState


def gpu_worker(wid: str, n: int = 2, claims: dict[int, float] | None = None, healthy: bool = True) -> WorkerCapacity:
    return WorkerCapacity(worker_id=wid, healthy=healthy, gpu_indices=list(range(n)), gpu_claims=dict(claims or {}))


def cpu_worker(wid: str, slots: int = 2, used: int = 0) -> WorkerCapacity:
    return WorkerCapacity(worker_id=wid, healthy=True, gpu_indices=[], cpu_slots=slots, cpu_used=used)


def test_fractions_share_a_gpu_until_full() -> None:
    workers = [gpu_worker("w1", n=1)]
    engine = EngineArgs(gpu_memory_utilization=0.3)
    for _ in range(3):
        p = place("m", engine, workers)
        assert p.worker_id == "w1" and p.gpus == [0]
        claim(workers, p, "m")
    # 0.9 claimed: a fourth 0.3 does not fit, and the reason says what is free.
    with pytest.raises(PlacementError) as err:
        place("m", engine, workers)
    assert "w1" in str(err.value) and "0.10" in str(err.value)


def test_rounding_does_not_reject_an_exact_fit() -> None:
    workers = [gpu_worker("w1", n=1, claims={0: 0.1 + 0.2})]
    assert place("m", EngineArgs(gpu_memory_utilization=0.7), workers).gpus == [0]


def test_tensor_parallel_needs_that_many_gpus_each_with_room() -> None:
    workers = [gpu_worker("small", n=1), gpu_worker("big", n=4, claims={0: 0.8, 1: 0.8})]
    p = place("m", EngineArgs(tensor_parallel_size=2, gpu_memory_utilization=0.5), workers)
    assert p.worker_id == "big" and p.gpus == [2, 3]


def test_best_fit_keeps_a_whole_gpu_free() -> None:
    workers = [gpu_worker("w1", n=2, claims={0: 0.5})]
    assert place("m", EngineArgs(gpu_memory_utilization=0.4), workers).gpus == [0]


def test_prefers_gpu_workers_then_cpu_when_no_gpu_fits() -> None:
    workers = [cpu_worker("laptop"), gpu_worker("gpu", n=1)]
    assert place("m", EngineArgs(gpu_memory_utilization=0.9), workers).worker_id == "gpu"
    workers[1].gpu_claims[0] = 0.9
    p = place("m", EngineArgs(gpu_memory_utilization=0.9), workers)
    assert p.worker_id == "laptop" and p.gpus == []


def test_replicas_spread_over_workers() -> None:
    workers = [cpu_worker("a"), cpu_worker("b")]
    first = place("m", EngineArgs(), workers)
    claim(workers, first, "m")
    second = place("m", EngineArgs(), workers)
    assert {first.worker_id, second.worker_id} == {"a", "b"}


def test_every_rejection_is_explained() -> None:
    workers = [gpu_worker("sick", healthy=False), cpu_worker("full", slots=1, used=1), gpu_worker("one", n=1)]
    with pytest.raises(PlacementError) as err:
        place("m", EngineArgs(tensor_parallel_size=2), workers)
    reasons = {r.worker_id: r.reason for r in err.value.rejections}
    assert reasons["sick"] == "not healthy"
    assert "CPU-only" in reasons["full"]
    assert "tensor_parallel_size=2" in reasons["one"]


def test_no_workers_at_all() -> None:
    with pytest.raises(PlacementError, match="no workers registered"):
        place("m", EngineArgs(), [])


def test_eviction_frees_least_recently_used_first() -> None:
    workers = [gpu_worker("w", n=1, claims={0: 0.8})]
    candidates = [
        EvictionCandidate("new", "w", [0], 0.4, last_used=200.0),
        EvictionCandidate("old", "w", [0], 0.4, last_used=100.0),
    ]
    plan = plan_eviction("m", EngineArgs(gpu_memory_utilization=0.5), workers, candidates)
    assert plan is not None
    placement, evicted = plan
    assert placement.worker_id == "w" and evicted == ["old"]


def test_eviction_gives_up_when_nothing_helps() -> None:
    workers = [gpu_worker("w", n=1, claims={0: 0.9})]
    candidates = [EvictionCandidate("r", "w", [0], 0.2, last_used=1.0)]
    assert plan_eviction("m", EngineArgs(gpu_memory_utilization=0.5), workers, candidates) is None


def test_placement_error_names_at_most_ten_workers() -> None:
    """The message goes into the model's error and every router's table: at fleet scale it stays short."""
    rejections = [PlacementRejection(worker_id=f"w{i}", reason="not healthy") for i in range(15)]
    message = str(PlacementError("big", rejections))
    assert "w9: not healthy" in message and "w10" not in message
    assert message.endswith("and 5 other worker(s)")
    assert str(PlacementError("big", [])) == "cannot place 'big': no workers registered"


# An H100 as NVML reports it, and the default GPU_ENGINE_OVERHEAD_MB: one engine's memory outside its claim.
H100_MB, OVERHEAD_MB = 81559, 1024


def shared_gpu(wid: str = "w1") -> WorkerCapacity:
    return WorkerCapacity(
        worker_id=wid, healthy=True, gpu_indices=[0], engine_overhead_mb=OVERHEAD_MB, gpu_total_mb={0: H100_MB}
    )


def test_a_shared_gpu_keeps_each_engines_memory_outside_the_claims() -> None:
    """vLLM starts an engine only if the memory free then, after its own CUDA context and with the other engines'
    in use, is at least its fraction of the GPU: two engines of 0.5 never both start on one GPU."""
    workers = [shared_gpu()]
    claim(workers, place("a", EngineArgs(gpu_memory_utilization=0.5), workers), "a")
    with pytest.raises(PlacementError) as err:
        place("b", EngineArgs(gpu_memory_utilization=0.5), workers)
    assert "GPU_ENGINE_OVERHEAD_MB" in str(err.value) and "gpu0: 0.47" in str(err.value)  # 1 - 0.5 - 2 x 1 GiB
    assert place("b", EngineArgs(gpu_memory_utilization=0.47), workers).gpus == [0]
    # One engine's overhead for each engine on the GPU and the newcomer: three of 0.32 fit, a fourth of 0.24 not.
    workers = [shared_gpu()]
    for alias in ("a", "b", "c"):
        claim(workers, place(alias, EngineArgs(gpu_memory_utilization=0.32), workers), alias)
    assert workers[0].gpu_engines == {0: 3}
    with pytest.raises(PlacementError):
        place("d", EngineArgs(gpu_memory_utilization=0.24), workers)  # 0.28 unclaimed, less 4 x 0.0126


def test_a_gpu_alone_takes_any_fraction_and_an_eviction_frees_the_overhead() -> None:
    """A lone engine is checked by vLLM against its own GPU as it would be started by hand: no overhead kept."""
    workers = [shared_gpu()]
    p = place("a", EngineArgs(gpu_memory_utilization=1.0), workers)
    assert p.gpus == [0]
    claim(workers, p, "a")
    candidates = [EvictionCandidate("a-1", "w1", [0], 1.0, last_used=1.0)]
    plan = plan_eviction("b", EngineArgs(gpu_memory_utilization=1.0), workers, candidates)
    assert plan is not None and plan[1] == ["a-1"]  # the GPU alone again once `a` goes: 1.0 fits


def test_memory_others_use_is_not_free() -> None:
    """Another job's 60 GB on GPU 0: a replica of 0.5 goes to GPU 1 (by the claims alone, best fit takes GPU 0),
    a fraction that fits beside it still goes to GPU 0, and a rejection says how much others use."""
    foreign = WorkerCapacity(
        worker_id="w1",
        healthy=True,
        gpu_indices=[0, 1],
        engine_overhead_mb=OVERHEAD_MB,
        gpu_total_mb={0: H100_MB, 1: H100_MB},
        gpu_foreign_mb={0: 60_000},
    )
    assert place("a", EngineArgs(gpu_memory_utilization=0.5), [foreign]).gpus == [1]
    assert place("a", EngineArgs(gpu_memory_utilization=0.26), [foreign]).gpus == [0]  # 1 - 60,000 / 81,559: 0.264
    with pytest.raises(PlacementError) as err:
        place("a", EngineArgs(gpu_memory_utilization=0.5, tensor_parallel_size=2), [foreign])
    assert "gpu0: 0.26 (60000 MiB in use outside our engines), gpu1: 1.00" in str(err.value)


def gpu_at(index: int, used_mb: int) -> GPUInfo:
    return GPUInfo(
        index=index, name="NVIDIA H100", uuid=f"GPU-{index}", memory_total_mb=H100_MB, memory_free_mb=H100_MB - used_mb
    )


def test_foreign_memory_is_what_our_engines_cannot_hold() -> None:
    """NVML's used memory less, per engine of ours on the GPU, its claim and its memory outside it (asleep too: what it
    keeps then is not reported); an engine the manager does not know counts as another's, a failed one holds
    nothing."""
    fractions = {"a": 0.5, "b": 0.25, "failed": 0.2}
    half = int(0.5 * H100_MB)

    def engine(rid: str, state: ReplicaState, gpus: list[int]) -> EngineStatus:
        return EngineStatus(replica_id=rid, alias=rid, state=state, gpus=gpus)

    def foreign(gpus: list[GPUInfo], *engines: EngineStatus) -> dict[int, int]:
        return foreign_memory_mb(gpus, engines, fractions, OVERHEAD_MB)

    # No engine of ours: all of it (here an idle GPU's 500 MiB and another job's 20,000).
    assert foreign([gpu_at(0, 500), gpu_at(1, 20_500)]) == {0: 500, 1: 20_500}
    # An engine serving with its whole claim and its context: nothing is another's; 30,000 MiB more is.
    serving = engine("a", ReplicaState.READY, [0])
    assert foreign([gpu_at(0, half + 900)], serving) == {}
    assert foreign([gpu_at(0, half + 900 + 30_000)], serving) == {
        0: int(half + 900 + 30_000 - 0.5 * H100_MB - OVERHEAD_MB)
    }
    # Asleep it holds less (and its claim is kept for its wake): counted as its claim all the same.
    asleep = engine("a", ReplicaState.SLEEPING, [0])
    assert foreign([gpu_at(0, 3000 + 30_000)], asleep) == {}
    assert foreign([gpu_at(0, half + 900 + 30_000)], asleep) == foreign([gpu_at(0, half + 900 + 30_000)], serving)
    # Tensor-parallel engines count on each of their GPUs; a stray engine's memory is another's; a failed engine's
    # process is gone: nothing of it is subtracted.
    tp = engine("b", ReplicaState.STARTING, [0, 1])
    stray = engine("stray", ReplicaState.READY, [1])
    quarter = int(0.25 * H100_MB)
    used = [gpu_at(0, quarter + 1000), gpu_at(1, quarter + 1000 + 7000)]
    assert foreign(used, tp, stray, engine("failed", ReplicaState.FAILED, [1])) == {
        1: int(quarter + 8000 - 0.25 * H100_MB - OVERHEAD_MB)
    }
