"""Reading an inference request: the raw body (forwarded as it came), what it asks for, and the checks.

JSON bodies are parsed once; multipart uploads (audio) are read up to the body limit and only their text fields
are decoded (a file part counts by its size), so the model can be found without a form parser's copies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from ..errors import APIError
from ..security.endpoint_checks import check_endpoint
from .disconnect import ClientDisconnected
from .endpoints import BodyKind, InferenceEndpoint

_BOUNDARY_RE = re.compile(r'boundary="?([^";,]+)"?', re.I)
_NAME_RE = re.compile(rb'\bname="([^"]*)"', re.I)
_MAX_FIELD_CHARS = 65536  # a text field of a form (prompt, language, ...); files are not decoded


@dataclass(slots=True)  # not frozen: its __init__ runs per request, and frozen ones set each field the slow way
class InferenceRequest:
    endpoint: InferenceEndpoint
    body: bytes
    payload: dict[str, Any]  # the JSON object, or a form's text fields (a file field holds its size)
    alias: str
    content_type: str


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", "body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body larger than {limit} bytes", "body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # gone before its body was whole (or cut off as a slow client): a 499, not a 500
        raise ClientDisconnected() from None
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The raw body (forwarded as is) and its parsed JSON object, with a size limit and clear errors."""
    body = await read_body(request, limit)
    try:
        parsed = json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", "invalid_json") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise APIError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(parsed, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    return body, parsed


def form_fields(body: bytes, content_type: str) -> dict[str, Any]:
    """The fields of a multipart/form-data body: text fields decoded, file fields as their size in bytes."""
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        raise APIError(400, "multipart body without a boundary", "invalid_form")
    delimiter = b"--" + match.group(1).encode("latin-1")
    parts = body.split(delimiter)
    if len(parts) < 2 or not parts[-1].startswith(b"--"):
        raise APIError(400, "multipart body is malformed (no closing boundary)", "invalid_form")
    fields: dict[str, Any] = {}
    for part in parts[1:-1]:
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            raise APIError(400, "multipart body is malformed (a part without headers)", "invalid_form")
        value = value.removesuffix(b"\r\n")
        disposition = next(
            (line for line in head.split(b"\r\n") if line.lower().startswith(b"content-disposition:")), b""
        )
        name = _NAME_RE.search(disposition)
        if name is None:
            raise APIError(400, "multipart part without a field name", "invalid_form")
        key = name.group(1).decode("utf-8", "replace")
        if b"filename=" in disposition.lower():
            fields[key] = len(value)
        else:
            fields[key] = value[:_MAX_FIELD_CHARS].decode("utf-8", "replace")
    return fields


async def read_inference(
    request: Request, endpoint: InferenceEndpoint, limit: int, allow_unknown_fields: bool
) -> InferenceRequest:
    """Read and check one request to `endpoint`; raises APIError (4xx) for what must not reach an engine."""
    content_type = request.headers.get("content-type", "application/json")
    if endpoint.body is BodyKind.MULTIPART:
        if not content_type.lower().startswith("multipart/form-data"):
            raise APIError(
                415, f"{endpoint.path} takes multipart/form-data (with 'model' and 'file')", "unsupported_media_type"
            )
        body = await read_body(request, limit)
        payload = form_fields(body, content_type)
    else:
        body, payload = await read_json_body(request, limit)
        content_type = "application/json"
    alias = check_endpoint(endpoint.path, endpoint.family, payload, allow_unknown_fields)
    return InferenceRequest(endpoint, body, payload, alias, content_type)
