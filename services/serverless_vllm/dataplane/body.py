"""Reading an inference request's body: the raw bytes (forwarded as they are) and the parsed JSON object."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from ..errors import APIError


async def read_json_body(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The raw body (forwarded as is) and its parsed JSON object, with a size limit and clear errors."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", "body_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        parsed = json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", "invalid_json") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise APIError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(parsed, dict):
        raise APIError(400, "request body must be a JSON object", "invalid_json")
    return body, parsed
