"""The registration rules of LoRA adapters that need the registry: an adapter's base exists and can take adapters;
a base with adapters is not deleted alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import APIError
from ..schemas import ModelSpec, ModelTask

if TYPE_CHECKING:
    from .registry import ModelRecord


def check_base(spec: ModelSpec, models: Mapping[str, ModelRecord]) -> None:
    """An adapter's base is a registered model of task generate, not itself an adapter (400 otherwise)."""
    if spec.base is None:
        return
    base = models.get(spec.base)
    if base is None:
        raise APIError(400, f"base '{spec.base}' of adapter '{spec.alias}' is not a registered model", "base_not_found")
    if base.spec.base is not None:
        raise APIError(400, f"base '{spec.base}' is itself an adapter: an adapter's base is a model", "invalid_base")
    if base.engine().task is not ModelTask.GENERATE:
        raise APIError(400, f"base '{spec.base}' is not a generative model: LoRA adapters need one", "invalid_base")


def check_no_adapters(alias: str, models: Mapping[str, ModelRecord]) -> None:
    """A base with adapters registered is not deleted alone (409): `?cascade=true` deletes them first."""
    mine = sorted(a for a, m in models.items() if m.spec.base == alias)
    if mine:
        raise APIError(
            409,
            f"model '{alias}' is the base of adapter(s) {', '.join(mine)}: delete them first, or delete with "
            "?cascade=true (`svllm delete --cascade`)",
            "model_has_adapters",
        )
