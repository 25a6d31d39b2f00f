"""Bearer credentials for every HTTP service, and a body-size guard, as one pure ASGI middleware.

Roles: client API keys (inference, model listing), the admin key (register, patch, delete, /workers, /status; also the
router's credential to the manager) and the worker token (workers <-> manager, router -> worker). Each app maps
(method, path) to the roles it accepts; anything not mapped needs the admin key (default deny). Health, metrics
and service discovery stay open for probes and Prometheus (read-only, no secrets).

The presented token is hashed once (SHA-256) and looked up by its digest, as keys made at run time are
(security/keys.py): no comparison runs over a secret's characters, so the time taken does not tell how much of a
guess was right. Tokens are never logged. The digests of tokens that were accepted are remembered in memory (a
bounded dict by token: its lookup compares a stored token only with one of the same keyed hash, which a guess cannot
aim at), so a client's next request skips the hash (6,000 instructions, docs/benchmarks.md); a wrong token is never
remembered, and revocation is decided by the digest's lookup as before.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import AuthSettings
from ..dataplane.headers import DEFAULT_MAX_BODY_BYTES
from ..errors import APIError
from .keys import KEY_SCOPE, ActiveKey, KeyRing

log = logging.getLogger(__name__)


class Role(StrEnum):
    CLIENT = "client"
    ADMIN = "admin"
    WORKER = "worker"


class AuthConfigError(ValueError):
    """Authentication is on but a credential this service needs is missing (or two roles share a secret)."""


# (method, route path) -> the roles accepted, or None for a public route.
Policy = Callable[[str, str], frozenset[Role] | None]

CLIENT_OR_ADMIN = frozenset({Role.CLIENT, Role.ADMIN})
ADMIN_ONLY = frozenset({Role.ADMIN})
WORKER_ONLY = frozenset({Role.WORKER})
WORKER_OR_ADMIN = frozenset({Role.WORKER, Role.ADMIN})

# Read-only operational endpoints: liveness probes (compose healthchecks) and Prometheus scrapes / discovery.
OPS_PATHS = frozenset({"/health", "/metrics", "/manager/metrics", "/sd/targets", "/sd/workers"})
WORKER_CALLS = frozenset({"/workers/register", "/workers/heartbeat"})
# The router's operator routes (besides writes under /v1/models): tests/unit/test_endpoints.py fails when the
# router gains a route that is neither here nor an inference, model, ops or worker route.
ROUTER_ADMIN_PATHS = frozenset({"/workers", "/status", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def router_policy(method: str, path: str) -> frozenset[Role] | None:
    if path in OPS_PATHS:
        return None
    if path in WORKER_CALLS:  # passed on to the manager with the router's own credential
        return WORKER_ONLY
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return CLIENT_OR_ADMIN if method in ("GET", "HEAD") else ADMIN_ONLY  # register, patch, delete: admin
    if path in ROUTER_ADMIN_PATHS or path.startswith(("/v1/keys", "/v1/tenants")):
        return ADMIN_ONLY  # the key API: admin only (GET /v1/usage is for keys too: their own usage)
    # Inference, and paths the router does not serve: a valid client key on an unknown route is then told 404
    # by the app (a 401 would send its owner hunting for a key problem); a wrong key is still 401.
    return CLIENT_OR_ADMIN


def manager_policy(method: str, path: str) -> frozenset[Role] | None:
    if path in OPS_PATHS:
        return None
    if path in WORKER_CALLS:  # from workers directly, or from a router passing them on (admin key)
        return WORKER_OR_ADMIN
    return ADMIN_ONLY  # the registry and routing table: only routers (admin key) and operators


def worker_policy(method: str, path: str) -> frozenset[Role] | None:
    if path in OPS_PATHS or (method == "GET" and path.startswith("/engines/") and path.endswith("/metrics")):
        return None
    return WORKER_ONLY  # inference (the router is the only legitimate caller) and /engines (the manager)


# What each service needs configured when authentication is on.
REQUIRED: dict[str, tuple[Role, ...]] = {
    "router": (Role.CLIENT, Role.ADMIN, Role.WORKER),
    "manager": (Role.ADMIN, Role.WORKER),
    "worker": (Role.WORKER,),
}
_ENV = {
    Role.CLIENT: "SVLLM_API_KEYS (or SVLLM_API_KEYS_FILE)",
    Role.ADMIN: "SVLLM_ADMIN_KEY",
    Role.WORKER: "SVLLM_WORKER_TOKEN",
}


def _digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


class Authenticator:
    """The accepted key digests per role; built once per app, read-only afterwards."""

    def __init__(self, settings: AuthSettings, service: str) -> None:
        self.enabled = settings.enabled
        secrets: dict[Role, list[str]] = {
            Role.CLIENT: [k.get_secret_value() for k in settings.api_keys],
            Role.ADMIN: [settings.admin_key.get_secret_value()] if settings.admin_key else [],
            Role.WORKER: [settings.worker_token.get_secret_value()] if settings.worker_token else [],
        }
        if self.enabled:
            missing = [_ENV[r] for r in REQUIRED[service] if not secrets[r]]
            if missing:
                raise AuthConfigError(
                    f"authentication is on but the {service} has no {', '.join(missing)}: set them, or set "
                    "SVLLM_AUTH=off for local development only"
                )
            owners: dict[str, Role] = {}
            for role, values in secrets.items():
                for value in values:
                    if owners.setdefault(value, role) is not role:
                        raise AuthConfigError(
                            f"a {role.value} credential equals a {owners[value].value} "
                            "credential: every role needs its own secret"
                        )
        # Each secret's role by its digest (every role has its own secrets, checked above).
        self._roles = {_digest(v): role for role, values in secrets.items() for v in values}

    def allowed(self, token: bytes | None, roles: frozenset[Role]) -> bool:
        return token is not None and self.allowed_digest(_digest(token), roles)

    def allowed_digest(self, presented: bytes, roles: frozenset[Role]) -> bool:
        """`allowed`, for a token whose SHA-256 the caller has (the guard hashes it once for both kinds of key)."""
        return self._roles.get(presented) in roles


def bearer_token(scope: Scope) -> bytes | None:
    """The presented key: `Authorization: Bearer <key>`, or `x-api-key: <key>` as Anthropic's clients send it."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization" or name == b"x-api-key":
            return _token(name, value)
    return None


def _token(name: bytes, value: bytes) -> bytes | None:
    """The key in a credential header (`name`: authorization or x-api-key)."""
    if name == b"x-api-key":
        return value.strip() or None
    scheme, _, token = value.partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def _presented(headers: dict[bytes, bytes]) -> bytes | None:
    """`bearer_token` from the headers as a dict (Authorization first where a client sent both)."""
    value = headers.get(b"authorization")
    if value is not None:
        return _token(b"authorization", value)
    value = headers.get(b"x-api-key")
    return _token(b"x-api-key", value) if value is not None else None


def _route_path(scope: Scope) -> str:
    # The path the app's router matches (Starlette strips root_path the same way).
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _unauthorized(token: bytes | None, roles: frozenset[Role]) -> APIError:
    needed = " or ".join(sorted(r.value for r in roles))
    if token is None:
        return APIError(
            401,
            f"missing credentials: send 'Authorization: Bearer <key>' or 'x-api-key: <key>' ({needed} key)",
            "missing_api_key",
            {"WWW-Authenticate": "Bearer"},
        )
    return APIError(
        401,
        f"invalid credentials for this route (it needs {'an' if needed[0] in 'aeiou' else 'a'} {needed} key)",
        "invalid_api_key",
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


_KNOWN_ROUTES = 256  # routes whose roles the guard remembers
_KNOWN_TOKENS = 16_384  # accepted tokens whose digests the guard remembers (about 2.5 MB; then new ones are hashed)


class GuardMiddleware:
    """Authentication (before anything is read) and a request body size limit, for every route of an app."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        policy: Policy,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        keys: KeyRing | None = None,
    ) -> None:
        self.app = app
        self._auth = authenticator
        self._policy = policy
        self._limit = max_body_bytes
        self._keys = keys  # client keys made at run time (security/keys.py), on the router only
        self._known_roles: dict[tuple[str, str], frozenset[Role] | None] = {}  # _roles_of
        self._known_digests: dict[bytes, bytes] = {}  # accepted token -> its SHA-256

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self._auth.enabled:
            await send({"type": "websocket.close", "code": 1008})  # no route uses them: refused, not unguarded
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The headers as a dict, made in C, then a lookup for each that matters: cheaper than a loop over them in
        # Python. Two Content-Lengths that differ never get here (the servers refuse them; equal ones h11 merges).
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if self._auth.enabled:
            roles = self._roles_of(scope)
            if roles is not None:
                token = _presented(headers)
                known = self._known_digests.get(token) if token is not None else None
                digest = known or (_digest(token) if token is not None else b"")
                # A key made at run time: one dict lookup by the digest (security/keys.py); then the environment's.
                keys, key = self._keys, None
                if token is not None and keys is not None and keys.any and Role.CLIENT in roles:
                    key = keys.check_digest(digest)
                if isinstance(key, ActiveKey):
                    scope[KEY_SCOPE] = key  # its models and limits are applied once the request's model is read
                elif token is None or not self._auth.allowed_digest(digest, roles):
                    error = key if isinstance(key, APIError) else _unauthorized(token, roles)
                    await error.response(_route_path(scope))(scope, receive, send)
                    return
                if known is None and token is not None and len(self._known_digests) < _KNOWN_TOKENS:
                    self._known_digests[token] = digest  # accepted: its next request skips the hash
        if length is not None:
            if not length.isdigit():
                await APIError(400, "invalid Content-Length header", "invalid_header").response()(scope, receive, send)
                return
            if int(length) > self._limit:
                await self._too_large().response()(scope, receive, send)
                return
        # A body framed by a Content-Length within the limit cannot grow past it (the server reads no more): only a
        # body without one (chunked) is counted as it arrives, which costs a closure and a coroutine per receive.
        framed = length is not None and b"transfer-encoding" not in headers
        await self.app(scope, receive if framed else self._limited(receive), send)

    def _roles_of(self, scope: Scope) -> frozenset[Role] | None:
        """The policy's roles for the request's route, remembered by method and path (a bounded set: a client's
        random paths are looked up, not remembered, once it is full)."""
        method, path = scope["method"], scope["path"]  # root_path is the server's, the same for every request
        try:
            return self._known_roles[method, path]
        except KeyError:
            roles = self._policy(method, _route_path(scope))
            if len(self._known_roles) < _KNOWN_ROUTES:
                self._known_roles[method, path] = roles
            return roles

    def _too_large(self) -> APIError:
        return APIError(413, f"request body larger than {self._limit} bytes", "body_too_large")

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self._limit

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # An HTTPException passes FastAPI's body parsing unchanged and leaves as a 413 (chunked
                    # bodies without a Content-Length end here).
                    raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        return limited


def install_guard(
    app: Any,
    settings: AuthSettings,
    service: str,
    policy: Policy,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    keys: KeyRing | None = None,
) -> Authenticator:
    """Add the guard as the outermost middleware of `app`; raises AuthConfigError when credentials are missing.
    `keys`: the client keys made at run time (the router's key ring), looked up by digest before the
    environment's."""
    authenticator = Authenticator(settings, service)
    if not authenticator.enabled:
        log.warning("%s: authentication is OFF (SVLLM_AUTH=off): for local development only", service)
    app.add_middleware(
        GuardMiddleware, authenticator=authenticator, policy=policy, max_body_bytes=max_body_bytes, keys=keys
    )
    return authenticator
