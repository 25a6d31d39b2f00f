"""Errors in the OpenAI shape (the Anthropic shape on the Messages API), one exception type for every component,
and FastAPI handlers for them."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import error_body

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); the status stays ours.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Paths whose clients (the `anthropic` SDK) expect Anthropic's error shape.
ANTHROPIC_PREFIX = "/v1/messages"


def anthropic_shape(path: str) -> bool:
    return path.startswith(ANTHROPIC_PREFIX)


class APIError(Exception):
    """An error meant for the client: status, message, machine-readable code, optional headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses Ray process boundaries intact (the default pickling would lose status and code).
        return (APIError.from_dict, (self.to_dict(),))

    def body(self) -> dict[str, Any]:
        body = error_body(
            self.message,
            _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
            self.code,
        )
        if self.details is not None:
            body["error"]["details"] = self.details
            if isinstance(self.details, dict) and isinstance(self.details.get("param"), str):
                body["error"]["param"] = self.details["param"]  # where OpenAI's clients read it (`e.param`)
        return body

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def body_for(self, path: str) -> dict[str, Any]:
        """The error in the shape the clients of `path` understand."""
        return self.anthropic_body() if path and anthropic_shape(path) else self.body()

    def response(self, path: str = "") -> JSONResponse:
        """The error as a response, in the shape the clients of `path` understand."""
        return JSONResponse(self.body_for(path), status_code=self.status, headers=self.headers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "code": self.code,
            "headers": self.headers,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        return cls(d["status"], d["message"], d.get("code"), d.get("headers"), d.get("details"))

    @classmethod
    def from_response(cls, status: int, content: bytes, headers: dict[str, str] | None = None) -> APIError:
        """Rebuild an APIError from another component's error response."""
        try:
            err = json.loads(content)["error"]
            return cls(status, err.get("message") or "error", err.get("code"), headers, err.get("details"))
        except (ValueError, KeyError, TypeError):
            return cls(status, content.decode("utf-8", "replace")[:500] or f"upstream status {status}")


# What pydantic says of a request body that is not an object at all, as the inference routes say it (body.py).
_BODY_ERRORS = {
    "missing": "request body must be a JSON object (it was empty or null)",
    "model_attributes_type": "request body must be a JSON object",
    "dict_type": "request body must be a JSON object",
}
_LOCATIONS = ("body", "path", "query", "header", "cookie")
# FastAPI's 400 for a body its JSON parser raised on with something else than a decode error (nested too deeply).
_FASTAPI_BODY_ERROR = "There was an error parsing the body"
_NOT_JSON_TYPE = "request body must be sent as JSON, with the header Content-Type: application/json"


MAX_NAMED_ERRORS = 5  # validation errors a message names (then: how many more, where the count is known)


def field_error(loc: str, msg: str) -> str:
    """One validation error as our messages write it: `field: what is wrong` (a validator's own sentence as it wrote
    it, without pydantic's `Value error, `)."""
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """Pydantic's errors as one line, `field: what is wrong; ...` (the first five)."""
    parts = []
    for err in exc.errors()[:MAX_NAMED_ERRORS]:
        kind = err.get("type")
        if kind == "json_invalid":  # FastAPI's: its loc is the body and a character's position, not a field
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'cannot parse it')}")
            continue
        loc = _field(err)
        if not loc and kind in _BODY_ERRORS:
            # FastAPI hands a body's bytes over unread when its Content-Type is not JSON (`curl -d` sends a form's
            # type): read as JSON it would let a web page's simple request (no CORS preflight) act on a local API.
            unread = isinstance(err.get("input"), bytes)
            parts.append(_NOT_JSON_TYPE if unread else _BODY_ERRORS[kind])
            continue
        parts.append(field_error(loc, str(err.get("msg"))))
    return "; ".join(parts) or "invalid request"


def validation_param(exc: RequestValidationError | ValidationError) -> str | None:
    """The one field the errors are about (`limits.rpm`), as OpenAI's `param` names it; None for several."""
    fields = {_field(err) for err in exc.errors()}
    return fields.pop() if len(fields) == 1 and "" not in fields else None


def _field(err: Any) -> str:
    """Where an error is, as `limits.rpm` ("": the body itself; FastAPI's loc of unparsable JSON is a position)."""
    if err.get("type") == "json_invalid":
        return ""
    loc = err.get("loc", ())
    if loc and loc[0] in _LOCATIONS:  # FastAPI's: where in the request, not part of the field's name
        loc = loc[1:]
    return ".".join(str(p) for p in loc)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of the app leave in the OpenAI shape, 500s included."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        param = validation_param(exc)
        details = {"param": param} if param else None
        return APIError(400, validation_message(exc), "invalid_request", details=details).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.detail == _FASTAPI_BODY_ERROR and exc.__cause__ is not None:  # JSON its parser could not take
            message = f"request body is not valid JSON: {exc.__cause__}"
            return APIError(400, message, "invalid_request").response(request.url.path)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code).response(request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}", "internal_error").response(request.url.path)
