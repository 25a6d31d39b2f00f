"""The model registry: every registered model (`ModelRecord`) by alias, in registration order, and its durable
copy in SQLite (store.py); the validation of registrations, patches and deletions; what its starts took (learnt,
kept with it); the `ModelInfo` answer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..config import ManagerSettings
from ..errors import APIError, validation_message
from ..schemas import (
    EngineArgs,
    ModelInfo,
    ModelPatch,
    ModelPhase,
    ModelPolicy,
    ModelSpec,
    ModelState,
    ReplicaInfo,
    ReplicaState,
    StartTimes,
)
from ..security.models import check_registration
from .adapter_rules import check_base, check_no_adapters
from .autoscale import ScaleState
from .replicas import Replica
from .store import ModelStore

log = logging.getLogger(__name__)

# The weight of a new measurement in a model's moving average of start times: the plain mean of its first few
# starts, then an exponential average that follows a change (another GPU type, a warm page cache) within a few.
_MIN_WEIGHT = 0.3


@dataclass
class ModelRecord:
    spec: ModelSpec
    created_at: float
    scale: ScaleState = field(default_factory=ScaleState)
    last_error: str | None = None
    start_times: StartTimes = field(default_factory=StartTimes)
    failed_at: float | None = None  # monotonic; the model is FAILED for failed_retry_after_s after this
    # (spec, its policy, its engine args): derived once per spec, not per reconcile pass or heartbeat reply
    # (each derivation is a pydantic dump and validation, and a pass asks for 10,000 models' policies).
    _derived: tuple[ModelSpec, ModelPolicy, EngineArgs] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def _derive(self) -> tuple[ModelSpec, ModelPolicy, EngineArgs]:
        if self._derived is None or self._derived[0] is not self.spec:  # `spec` is replaced by PATCH
            self._derived = (self.spec, self.spec.policy(), self.spec.engine_args())
        return self._derived

    def policy(self) -> ModelPolicy:
        """spec.policy(), cached: callers must not mutate it."""
        return self._derive()[1]

    def engine(self) -> EngineArgs:
        """spec.engine_args(), cached: callers must not mutate it."""
        return self._derive()[2]


class ModelRegistry:
    """The registered models, loaded from SQLite at construction and written through on every change."""

    def __init__(self, settings: ManagerSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._store = ModelStore(settings.db_path)
        self._models: dict[str, ModelRecord] = {}
        # Stored registrations that no longer pass (alias -> why): not served, their engines not adopted (so
        # stopped), kept in the file until registered again or deleted.
        self.refused: dict[str, str] = {}
        now = clock()
        times = self._store.load_start_times()
        for alias, stored, created_at in self._store.load():
            spec = self._recheck(alias, stored)
            if spec is None:
                continue
            # After a restart every model counts as just used, so adopted engines are not dropped at once.
            self._models[spec.alias] = ModelRecord(
                spec=spec,
                created_at=created_at,
                scale=ScaleState(target=spec.min_replicas, last_active=now),
                start_times=times.get(spec.alias) or StartTimes(),
            )

    def _recheck(self, alias: str, stored: str) -> ModelSpec | None:
        """A stored registration checked as a new one would be (the schema, and what a registration may run under
        this manager's settings: SVLLM_MODEL_DIRS may have narrowed, a flag been denied since); None if refused."""
        try:
            spec = ModelSpec.model_validate_json(stored)
            check_registration(spec, self._settings.model_dirs)
        except ValidationError as exc:
            reason = validation_message(exc)
        except APIError as exc:
            reason = exc.message
        else:
            return spec
        self.refused[alias] = reason
        log.error(
            "stored registration of %s refused: %s; not served, its engines stopped (register it again or delete it)",
            alias,
            reason,
        )
        return None

    @property
    def models(self) -> Mapping[str, ModelRecord]:
        """alias -> record, in registration order: the live dict, read-only. The other components keep this
        reference and ask it at dict speed (a table rebuild and a pass each go over 10,000 models)."""
        return self._models

    def get(self, alias: str) -> ModelRecord | None:
        return self._models.get(alias)

    def require(self, alias: str) -> ModelRecord:
        record = self._models.get(alias)
        if record is None:
            why = " (its stored registration was refused at the manager's start: see its log)"
            why = why if alias in self.refused else ""
            raise APIError(404, f"The model '{alias}' does not exist{why}", "model_not_found")
        return record

    def register(self, spec: ModelSpec) -> bool:
        """Add a model; False when the same spec is already registered (idempotent), 400 for another spec."""
        check_registration(spec, self._settings.model_dirs)  # hub ids or allowed dirs only; no unsafe engine flags
        check_base(spec, self._models)  # a LoRA adapter's base is a registered model
        existing = self._models.get(spec.alias)
        if existing is not None:
            if existing.spec == spec:
                return False  # idempotent re-registration
            raise APIError(
                409,
                f"alias '{spec.alias}' is already registered with different settings "
                f"(delete it first; a policy is changed with PATCH /v1/models/{spec.alias} or `svllm patch`)",
                "alias_exists",
            )
        now = self._clock()
        created = self._store.save(spec)  # over a refused registration's row too
        self.refused.pop(spec.alias, None)
        # An adapter has no replica of its own (manager/adapters.py puts it on its base's).
        target = 0 if spec.base is not None else max(spec.min_replicas, 1 if spec.preload else 0)
        self._models[spec.alias] = ModelRecord(
            spec=spec, created_at=created, scale=ScaleState(target=target, last_active=now)
        )
        log.info("registered model %s -> %s (preload=%s)", spec.alias, spec.model_name, spec.preload)
        return True

    def preload(self, alias: str) -> bool:
        """A registration repeated with `preload` loads the model again, as its first one did (`svllm up` run again
        finds its models cold): a replica is asked for when none is. False when nothing changed."""
        record = self.require(alias)
        if record.spec.base is not None or not record.spec.preload or record.scale.target > 0:
            return False
        record.scale.target = 1
        record.scale.last_active = self._clock()
        return True

    def patch(self, alias: str, patch: ModelPatch) -> ModelRecord:
        record = self.require(alias)
        changes = patch.model_dump(exclude_none=True)
        try:
            spec = ModelSpec.model_validate({**record.spec.model_dump(), **changes})
        except ValidationError as exc:
            raise APIError(400, validation_message(exc), "invalid_policy") from exc
        self._store.save(spec, record.created_at)
        record.spec = spec
        record.scale.target = min(max(record.scale.target, spec.min_replicas), spec.max_replicas)
        return record

    def forget_refused(self, alias: str) -> bool:
        """Delete a refused registration's row; False when `alias` is not one."""
        if self.refused.pop(alias, None) is None:
            return False
        self._store.delete(alias)
        return True

    def delete(self, alias: str) -> None:
        """Forget the model (404 if unknown, 409 for a base with adapters); its replicas are the caller's to remove."""
        self.require(alias)
        check_no_adapters(alias, self._models)
        self._store.delete(alias)
        del self._models[alias]

    def learn_start(self, alias: str, seconds: float, wake: bool) -> None:
        """One start (or wake) of `alias` took `seconds`: folded into its moving average, and saved."""
        record = self._models.get(alias)
        if record is None:
            return
        times = record.start_times
        if wake:
            times.wakes += 1
            times.wake_s = _average(times.wake_s, seconds, times.wakes)
        else:
            times.starts += 1
            times.start_s = _average(times.start_s, seconds, times.starts)
        self._store.save_start_times(alias, times)

    def failed_recently(self, model: ModelRecord, now: float) -> bool:
        return model.failed_at is not None and now - model.failed_at < self._settings.failed_retry_after_s

    def close(self) -> None:
        self._store.close()


def _average(mean: float | None, seconds: float, count: int) -> float:
    if mean is None:
        return round(seconds, 3)
    return round(mean + max(1 / count, _MIN_WEIGHT) * (seconds - mean), 3)


def expected_ready_at(replicas: list[Replica]) -> float | None:
    """When the first of a loading model's replicas is expected ready (unix seconds); None when none is known."""
    times = [
        r.ready_at for r in replicas if r.ready_at is not None and not r.asleep and r.state is not ReplicaState.READY
    ]
    return min(times) if times else None


def _phase(replicas: list[Replica]) -> ModelPhase:
    waking = (ReplicaState.WAKING, ReplicaState.SLEEPING)  # asleep no more, its engine not awake yet
    return ModelPhase.WAKING if any(r.state in waking and not r.asleep for r in replicas) else ModelPhase.STARTING


def model_info(alias: str, record: ModelRecord, replicas: list[Replica], state: ModelState) -> ModelInfo:
    """The API's view of a model: `replicas` are its desired replicas, `state` its route's (see RoutingPublisher)."""
    spec = record.spec
    phase, expected = None, None
    if state is ModelState.LOADING:
        phase = _phase(replicas)
        ready_at = expected_ready_at(replicas)
        expected = None if ready_at is None else round(max(0.0, ready_at - time.time()), 1)
    return ModelInfo(
        alias=alias,
        model_name=spec.model_name,
        state=state,
        phase=phase,
        expected_ready_s=expected,
        start_times=record.start_times.model_copy(),
        engine=record.engine(),
        policy=record.policy(),
        desired_replicas=record.scale.target,
        replicas=replica_infos(replicas),
        last_error=record.last_error,
        created_at=record.created_at,
    )


def replica_infos(replicas: list[Replica]) -> list[ReplicaInfo]:
    return [
        ReplicaInfo(
            replica_id=r.replica_id,
            worker_id=r.worker_id,
            gpus=r.gpus,
            state=r.state,
            asleep=r.asleep,
            sleep_level=r.sleep_level if r.asleep else None,
            error=r.error,
        )
        for r in replicas
    ]
