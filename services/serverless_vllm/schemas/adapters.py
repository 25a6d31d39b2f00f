"""LoRA adapters registered as models: the registration rules of an adapter (`ModelSpec` with `base` and `adapter`),
and what workers are told and report about the adapters of their engines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import ModelSpec

# The policy fields an adapter's registration may set: its idle timeout (unloaded from every replica after it),
# how many base replicas may hold it (max_replicas) and when a busy one is spread to one more (target_concurrency).
ADAPTER_POLICY = frozenset({"idle_timeout_s", "max_replicas", "target_concurrency", "routing", "preload"})


# An adapter's default `max_replicas`: every ready base replica may hold it when it is busy (a model's default, 1,
# would keep a busy adapter on one replica however many its base has).
ADAPTER_MAX_REPLICAS = 64


def adapter_model_name(data: Any) -> Any:
    """An adapter's registration names its weights once, as `adapter`: `model_name` is set to it."""
    if isinstance(data, dict) and data.get("adapter") is not None:
        if "model_name" not in data:
            data = {**data, "model_name": data["adapter"]}
        if "max_replicas" not in data:
            data = {**data, "max_replicas": ADAPTER_MAX_REPLICAS}
    return data


def check_adapter_spec(spec: ModelSpec) -> None:
    """`base` and `adapter` come together; an adapter sets no engine argument (it runs on its base's engines)."""
    if (spec.base is None) != (spec.adapter is None):
        raise ValueError("an adapter's registration needs both 'base' (a registered alias) and 'adapter' (its weights)")
    if spec.adapter is None:
        return
    if spec.model_name != spec.adapter:
        raise ValueError("an adapter's registration names its weights in 'adapter' only (leave model_name out)")
    if spec.base == spec.alias:
        raise ValueError("an adapter cannot be its own base")
    # Engine arguments are the base's: an adapter's must be left at their defaults (a stored registration, dumped
    # whole and read back, has them all set to those).
    defaults = type(spec).model_fields
    others = sorted(
        name
        for name in spec.model_fields_set - {"alias", "model_name", "base", "adapter"} - ADAPTER_POLICY
        if getattr(spec, name) != defaults[name].get_default(call_default_factory=True)
    )
    if others:
        raise ValueError(
            f"an adapter runs on its base's engines: {', '.join(others)} belong to the base's registration"
        )
