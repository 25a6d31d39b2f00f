"""An engine's own error answers, in the shape of the API the client called.

vLLM answers most errors as `{"error": {"message", "type": "BadRequestError", "param", "code": 400}}` (a Python
exception's name for the type, the status as a number for the code), its request validation as pydantic's errors
rendered one per line, on every path: the Anthropic Messages API's clients then get an OpenAI-shaped body, which the
`anthropic` SDK cannot read. The worker, the one component that talks to engines, rewrites them once, so every
router (HTTP or Ray Serve) passes them on as they come: OpenAI's shape with its types (`invalid_request_error`) and a
string code, or Anthropic's on /v1/messages. The status and the engine's message stay as they were. Only whole
answers are rewritten (an error is never a stream); a successful answer is never read here.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from ..errors import MAX_NAMED_ERRORS, APIError, field_error

# Our codes for what an engine refused: the request (as our own checks say it), or a failure of its own.
_NOT_FOUND = "not_found"
_INVALID = "invalid_request"
_ENGINE = "engine_error"
_MAX_MESSAGE = 2000  # characters of an engine's message passed on (vLLM bounds its own to about 11,000)


def reshaped(status: int, content: bytes, path: str) -> bytes:
    """The body of an engine's error answer (`status`, `content`) to a request on `path`, in the API's shape."""
    message, param = _message_of(content, status)
    code = _NOT_FOUND if status == 404 else _ENGINE if status >= 500 else _INVALID
    body = APIError(status, message[:_MAX_MESSAGE], code).body_for(path)
    if "param" in body.get("error", {}) and isinstance(param, str):
        body["error"]["param"] = param.removeprefix("body.")
    return json.dumps(body).encode()


def _message_of(content: bytes, status: int) -> tuple[str, Any]:
    """(message, param) of an engine's answer: vLLM's and Anthropic's shapes, FastAPI's `detail`, or plain text."""
    try:
        document = json.loads(content)
    except (ValueError, RecursionError):  # not JSON (or nested past the parser's depth): its text
        text = content.decode("utf-8", "replace").strip()
        return text or f"the engine answered {status}", None
    found: Any = document.get("error", document) if isinstance(document, dict) else document
    if isinstance(found, dict) and isinstance(found.get("message"), str):
        return _validation(found["message"]), found.get("param")
    if isinstance(found, dict) and "detail" in found:  # FastAPI's own (an unknown route: {"detail": "Not Found"})
        detail = found["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail), None
    return json.dumps(found), None


def _validation(message: str) -> str:
    """vLLM's rendering of pydantic's errors (`N validation errors:` then one dict per line) as our own validation
    messages write them, `field: what is wrong; ...` (the first five different ones, then how many more errors); any
    other message as it is. A field of a union is refused once per branch: the same line is said once."""
    head, _, rest = message.partition("\n")
    count = head.split(" ", 1)[0]
    if not (head.endswith(("validation error:", "validation errors:")) and count.isdigit() and rest):
        return message
    parts: list[str] = []
    said = 0  # errors said by the parts so far (repeats included)
    for line in rest.splitlines():
        line = line.strip()
        if line.startswith("...and "):  # vLLM's count of the errors it did not list: ours is from the head
            break
        part = _one_error(line)
        if part not in parts:
            if len(parts) == MAX_NAMED_ERRORS:
                break
            parts.append(part)
        said += 1
    more = int(count) - said
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _one_error(line: str) -> str:
    """One of vLLM's validation lines (a dict's repr) as `field: what is wrong`; a line it cut short as it is."""
    try:
        error = ast.literal_eval(line)  # a dict's repr, of literals only (vLLM summarises the input)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return line
    if not isinstance(error, dict) or not isinstance(error.get("msg"), str):
        return line
    return field_error(str(error.get("loc", "")).removeprefix("body").lstrip("."), error["msg"])
