"""Credentials, the Ray services and the `svllm` command's own settings (see the package's docstring)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import SecretStr, field_validator, model_validator

from ..ray_mode import DEFAULT_NAMESPACE  # constants only: no Ray import
from ..settings_base import Settings as _Settings
from ..settings_base import setting as _setting


class AuthSettings(_Settings):
    """Credentials of every service (enforced by security/auth.py). Secrets are SecretStr: never in a repr or log.

    mode "on" (the default) needs the credentials of the service's role; "off" is for local development only
    and must be asked for explicitly (SVLLM_AUTH=off; `svllm up` without credentials).
    """

    mode: Literal["on", "off"] = _setting(
        "on", env="SVLLM_AUTH", description="'off' disables credentials (local development only)"
    )
    api_keys_file: str | None = _setting(
        None,
        env="SVLLM_API_KEYS_FILE",
        description="file of more client keys, one per line, '#' comments (missing file: refuse to start)",
    )
    api_keys: tuple[SecretStr, ...] = _setting(
        (), env="SVLLM_API_KEYS", description="client API keys, comma list: inference and model listing"
    )
    admin_key: SecretStr | None = _setting(
        None,
        env="SVLLM_ADMIN_KEY",
        description="admin key: register, patch, delete, /workers, /status; the router's key to the manager",
    )
    worker_token: SecretStr | None = _setting(
        None, env="SVLLM_WORKER_TOKEN", description="worker join token: worker <-> manager, router -> worker"
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        mode = value.strip().lower()
        if mode not in ("on", "off"):
            raise ValueError(f"SVLLM_AUTH must be 'on' or 'off', not {mode!r}")
        return mode

    @field_validator("api_keys_file", "admin_key", "worker_token", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _add_key_file(self) -> Self:
        # After every value validated (a bad SVLLM_AUTH is reported first). A missing or unreadable file raises
        # OSError, not a validation error: fail closed, whatever the caller catches.
        keys = self.api_keys
        if self.api_keys_file:
            lines = Path(self.api_keys_file).read_text().splitlines()
            keys += tuple(SecretStr(s) for s in (line.strip() for line in lines) if s and not s.startswith("#"))
        unique = tuple({k.get_secret_value(): k for k in keys}.values())  # once each: validating a dump adds none
        if unique != self.api_keys:
            self.__dict__["api_keys"] = unique  # frozen once constructed; this is still construction
        return self

    @property
    def enabled(self) -> bool:
        return self.mode == "on"

    @property
    def configured(self) -> bool:
        return bool(self.api_keys or self.admin_key or self.worker_token)

    def worker_headers(self) -> dict[str, str]:
        """What a worker, the manager and the router present to each other (worker token)."""
        return _bearer(self.worker_token) if self.enabled else {}

    def for_local_run(self) -> tuple[AuthSettings, list[str]]:
        """`svllm up`: authentication off unless credentials are set; with client keys set, the internal credentials
        it lacks are made up for this run (all three services live in one process). Returns what to warn about."""
        if not self.configured and "mode" not in self.model_fields_set:  # SVLLM_AUTH not set either
            off = "authentication is OFF (local mode: no SVLLM_API_KEYS, SVLLM_ADMIN_KEY or SVLLM_WORKER_TOKEN set)"
            return self.model_copy(update={"mode": "off"}), [off + "; set them before exposing this beyond loopback"]
        if not self.enabled:
            return self, []
        missing = [k for k in ("admin_key", "worker_token") if getattr(self, k) is None]
        made = {k: SecretStr(secrets.token_urlsafe(32)) for k in missing}
        notes = ["no SVLLM_ADMIN_KEY: a random one is used for this run (register models with --model)"]
        return self.model_copy(update=made), notes if "admin_key" in made else []

    def admin_headers(self) -> dict[str, str]:
        """What the router presents to the manager's HTTP API (the admin key, as a service credential)."""
        return _bearer(self.admin_key) if self.enabled else {}


def _bearer(secret: SecretStr | None) -> dict[str, str]:
    return {"authorization": f"Bearer {secret.get_secret_value()}"} if secret is not None else {}


class RaySettings(_Settings):
    """`svllm ray-services`: the cluster to join and the API's address (ray_mode/services.RayServicesSettings takes
    these with the command's other flags)."""

    address: str | None = _setting(
        None,
        env="RAY_ADDRESS",
        description="Ray cluster to join (unset: a running one, else a new local one; 'local' forces a new one)",
    )
    namespace: str = _setting(
        DEFAULT_NAMESPACE, env="SVLLM_RAY_NAMESPACE", description="Ray namespace of the manager actor"
    )
    host: str = _setting("0.0.0.0", env="SERVE_HOST", description="address of the API in hybrid mode")
    port: int = _setting(8000, env="SERVE_PORT", description="port of the API in hybrid mode")
    replicas: int = _setting(
        1, env="ROUTER_REPLICAS", description="router replicas (direct ingress: at most one per node)"
    )
    ingress: Literal["direct", "proxy"] = _setting(
        "direct",
        env="SERVE_INGRESS",
        description="direct: each router replica serves the API port itself (no proxy hop); "
        "proxy: Serve's proxy on every node forwards to the replicas",
    )
    proxy_port: int = _setting(
        8001, env="SERVE_PROXY_PORT", description="port of Serve's own proxy under direct ingress (head node)"
    )

    @field_validator("address", mode="before")
    @classmethod
    def _blank_address(cls, value: Any) -> Any:
        return value or None


class CliSettings(_Settings):
    """The `svllm` command itself."""

    log_level: str = _setting("info", env="LOG_LEVEL", description="log level (debug adds a line per request)")
    client_timeout_s: float = _setting(
        60.0,
        env="CLIENT_TIMEOUT",
        ge=0,
        description="seconds a client may take to send a request's head, or pause its body (then 408 and the "
        "connection closed), or leave an answer unread (the connection aborted): slow clients (0: no limit)",
    )
    # Longer than the idle expiry of the clients that reuse connections: the official openai and anthropic clients
    # (httpx) drop a connection idle 5 s, and a server that closes at the same 5 s (uvicorn's default) races them:
    # a request sent as the server closes is reset (a busy router's loop runs the due close before it reads the
    # bytes already there). nginx's default; above the 60 s of common load balancers' idle timeouts.
    keep_alive_s: int = _setting(
        75,
        env="KEEP_ALIVE_TIMEOUT",
        ge=1,
        description="seconds an idle keep-alive connection stays open between requests: longer than any "
        "client's or load balancer's idle timeout in front of the service (theirs close first, without a race)",
    )
    router_url: str = _setting(
        "http://127.0.0.1:18000", env="ROUTER_URL", description="the router `svllm register` and `svllm status` talk to"
    )
