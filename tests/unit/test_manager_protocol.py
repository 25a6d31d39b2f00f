"""The manager's API is written once (manager/protocol.py); the four adapters are checked against it.

At run time here (every method, its parameters and their types, its return type, async), and statically by mypy
in the test command; the last test shows mypy failing on a deliberately wrong adapter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from serverless_vllm.config import AuthSettings, ManagerSettings
from serverless_vllm.manager.http_app import create_app
from serverless_vllm.manager.http_client import HTTPManagerClient
from serverless_vllm.manager.protocol import (
    HTTP_ROUTES,
    ManagerAPI,
    ManagerService,
    protocol_methods,
    signature_differences,
)
from serverless_vllm.ray_mode.actor import ManagerActor
from serverless_vllm.ray_mode.client import RayManagerClient
from serverless_vllm.schemas import ModelInfo

REPO = Path(__file__).resolve().parents[2]


def test_the_protocol_lists_the_calls() -> None:
    assert set(protocol_methods(ManagerService)) == set(HTTP_ROUTES)
    assert set(protocol_methods(ManagerAPI)) == set(HTTP_ROUTES) | {"close"}


@pytest.mark.parametrize(
    ("implementation", "protocol"),
    [(HTTPManagerClient, ManagerAPI), (RayManagerClient, ManagerAPI), (ManagerActor, ManagerService)],
)
def test_adapters_match_the_protocol(implementation: type, protocol: type) -> None:
    assert signature_differences(implementation, protocol) == []


def test_the_http_app_serves_every_call_where_the_client_sends_it(tmp_path: Path) -> None:
    app = create_app(ManagerSettings(db_path=str(tmp_path / "m.db")), auth=AuthSettings(mode="off"))
    served = {(method, route.path) for route in app.routes for method in getattr(route, "methods", ()) or ()}
    missing = {call: r for call, r in HTTP_ROUTES.items() if (r.method, r.path) not in served}
    assert missing == {}


class _WrongPatch(HTTPManagerClient):
    async def patch_model(self, alias: str) -> ModelInfo:  # type: ignore[override]  # the deliberate mistake
        raise NotImplementedError


class _Missing:
    async def get_model(self, alias: str) -> ModelInfo:
        raise NotImplementedError


def test_a_wrong_signature_or_a_missing_call_is_reported() -> None:
    problems = signature_differences(_WrongPatch, ManagerAPI)
    assert len(problems) == 1 and problems[0].startswith("_WrongPatch.patch_model(alias: str)")
    missing = signature_differences(_Missing, ManagerService)
    assert "_Missing.register_model: missing" in missing and not any("get_model" in p for p in missing)


def test_mypy_fails_on_a_deliberately_wrong_adapter(tmp_path: Path) -> None:
    """What the test command's mypy step does to an adapter whose signature is wrong."""
    bad = tmp_path / "bad_adapter.py"
    bad.write_text(
        textwrap.dedent(
            """
            from serverless_vllm.manager.http_client import HTTPManagerClient
            from serverless_vllm.manager.protocol import ManagerAPI
            from serverless_vllm.schemas import ModelInfo, ModelPatch


            class Adapter(HTTPManagerClient):
                async def patch_model(self, alias: int, patch: ModelPatch) -> ModelInfo:
                    raise NotImplementedError


            conforms: type[ManagerAPI] = Adapter
            """
        )
    )
    good = tmp_path / "good_adapter.py"
    good.write_text(bad.read_text().replace("alias: int", "alias: str"))
    command = [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--follow-imports=silent"]
    failed = subprocess.run([*command, str(bad)], cwd=REPO, capture_output=True, text=True, check=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "patch_model" in failed.stdout
    passed = subprocess.run([*command, str(good)], cwd=REPO, capture_output=True, text=True, check=False)
    assert passed.returncode == 0, passed.stdout + passed.stderr
