"""Fixtures shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any engine starts: no hub on these machines, and a small CPU KV cache per engine.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
# Services started by tests without credentials run in local-development mode; tests/test_security.py and the
# fault and load tests configure keys explicitly.
os.environ.setdefault("SVLLM_AUTH", "off")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama model (made once per session) that a real vLLM CPU engine can serve."""
    from serverless_vllm.testing.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
