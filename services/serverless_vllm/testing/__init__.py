"""Helpers for tests and local demos: things that stand in for what only a real deployment has."""

from __future__ import annotations

from typing import Any

__all__ = ["make_tiny_model"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m serverless_vllm.testing.tiny_model` does not import the module twice.
    if name == "make_tiny_model":
        from .tiny_model import make_tiny_model

        return make_tiny_model
    raise AttributeError(name)
