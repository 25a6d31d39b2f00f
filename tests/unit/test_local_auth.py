"""`svllm up`'s credentials (AuthSettings.for_local_run): off and said so when none are set; with client keys set,
the internal credentials it lacks are made up for the run, never left empty."""

from __future__ import annotations

from pydantic import SecretStr
from serverless_vllm.config import AuthSettings


def test_no_credentials_turn_authentication_off_with_a_warning() -> None:
    auth, warnings = AuthSettings().for_local_run()
    assert not auth.enabled
    assert len(warnings) == 1 and warnings[0].startswith("authentication is OFF")


def test_client_keys_alone_get_an_admin_key_and_a_worker_token_made_up() -> None:
    auth, warnings = AuthSettings(api_keys=[SecretStr("client")]).for_local_run()
    assert auth.enabled and auth.admin_key is not None and auth.worker_token is not None
    assert len(auth.admin_key.get_secret_value()) >= 32 and auth.admin_key != auth.worker_token
    assert warnings == ["no SVLLM_ADMIN_KEY: a random one is used for this run (register models with --model)"]


def test_credentials_given_are_kept() -> None:
    given = AuthSettings(api_keys=[SecretStr("c")], admin_key=SecretStr("a"), worker_token=SecretStr("w"))
    auth, warnings = given.for_local_run()
    assert auth == given and warnings == []
