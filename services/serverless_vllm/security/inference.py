"""Checks of an inference request body before it reaches an engine, shared by the router and the worker.

The body is forwarded as is; vLLM validates it fully. What is checked here is what must never reach an engine
or a manager: a malformed `model`, top-level fields of the wrong type, absurd sizes (n, max_tokens), fields
only an operator may set (request ids, KV-transfer parameters), and unknown fields (a typo would otherwise be
ignored silently). Top level only and no allocation: it costs microseconds per request.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import APIError
from ..schemas import ALIAS_PATTERN

_ALIAS_RE = re.compile(ALIAS_PATTERN)

MAX_TOKENS = 1_000_000  # vLLM caps at the context length anyway; beyond this it is a mistake or an attack
MAX_N = 16  # completions per request (n, best_of): each is a full sequence in the engine
MAX_MESSAGES = 4096

# The request fields of vLLM 0.32 (ChatCompletionRequest / CompletionRequest; tests/test_fuzz.py checks these
# lists against the installed vLLM) plus OpenAI fields clients may send that vLLM ignores.
_COMMON = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "length_penalty",
        "logit_bias",
        "logprobs",
        "prompt_logprobs",
        "user",
        "response_format",
        "structured_outputs",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "bad_words",
        "allowed_token_ids",
        "use_beam_search",
        "truncate_prompt_tokens",
        "truncation_side",
        "priority",
        "add_special_tokens",
        "echo",
        "return_token_ids",
        "return_tokens_as_token_ids",
        "return_token_offsets",
        "logprob_token_ids",
        "cache_salt",
        "vllm_xargs",
        "mm_payload",
        "return_mm_kwargs",
        "repetition_detection",
        "thinking_token_budget",
        "stream_interval",
        "session_id",
        "watermarking",
        "routed_experts_prompt_start",
        # OpenAI fields without a meaning for vLLM (accepted and ignored, as OpenAI clients send them)
        "metadata",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
    }
)
CHAT_FIELDS = _COMMON | frozenset(
    {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "documents",
        "mm_processor_kwargs",
        "media_io_kwargs",
        "include_reasoning",
        "reasoning_effort",
        "return_prompt_text",
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "verbosity",
        "web_search_options",
    }
)
COMPLETION_FIELDS = _COMMON | frozenset({"prompt", "suffix", "best_of"})
# vLLM fields a client must not set: request ids are the router's and vLLM's (a duplicate id confuses the
# engine), KV/EC transfer parameters steer disaggregated serving, a request's own chat template and prompt
# embeddings are off in vLLM by default (and known attack surfaces).
OPERATOR_FIELDS = frozenset(
    {"request_id", "kv_transfer_params", "ec_transfer_params", "chat_template", "prompt_embeds"}
)

_INT_LIMITS = {
    "max_tokens": (1, MAX_TOKENS),
    "max_completion_tokens": (1, MAX_TOKENS),
    "n": (1, MAX_N),
    "best_of": (1, MAX_N),
    "min_tokens": (0, MAX_TOKENS),
    "seed": (-(2**63), 2**63 - 1),
    "top_k": (-1, 2**31 - 1),
    "top_logprobs": (0, 1024),
    "prompt_logprobs": (0, 1024),
}
_NUMBERS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "length_penalty",
)
_BOOLS = (
    "stream",
    "echo",
    "ignore_eos",
    "use_beam_search",
    "add_generation_prompt",
    "continue_final_message",
    "skip_special_tokens",
    "parallel_tool_calls",
)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request", details={"param": param} if param else None)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", "model")
    if not _ALIAS_RE.match(model):
        # Cannot be a registered alias: answered here, never asked of the manager.
        raise APIError(404, f"The model '{model[:200]}' does not exist", "model_not_found")
    return model


def check_messages(payload: dict[str, Any]) -> None:
    """`messages`: a non-empty array, bounded, of objects with a string `role` (chat, Messages, pooling, ...)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"at most {MAX_MESSAGES} messages", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string 'role'", "messages")


def check_inference(path: str, payload: dict[str, Any], allow_unknown_fields: bool = False) -> str:
    """Validate the top level of a chat or completion request; returns the model alias."""
    model = check_model(payload)
    chat = path.endswith("/chat/completions")
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for key in payload:
        if key in OPERATOR_FIELDS:
            raise bad_request(f"'{key}' may not be set by clients", key)
        if key not in known and not allow_unknown_fields:
            raise bad_request(f"unknown field '{key[:100]}'", key[:100])
    if chat:
        check_messages(payload)
    else:
        prompt = payload.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise bad_request("'prompt' must be a non-empty string or array", "prompt")
    for key, (low, high) in _INT_LIMITS.items():
        value = payload.get(key)
        if value is not None and (not is_int(value) or not low <= value <= high):
            raise bad_request(f"'{key}' must be an integer from {low} to {high}", key)
    for key in _NUMBERS:
        value = payload.get(key)
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool) or value != value or abs(value) > 1e6
        ):
            raise bad_request(f"'{key}' must be a finite number", key)
    for key in _BOOLS:
        if key in payload and payload[key] is not None and not isinstance(payload[key], bool):
            raise bad_request(f"'{key}' must be a boolean", key)
    logprobs = payload.get("logprobs")
    if logprobs is not None and not (
        isinstance(logprobs, bool) if chat else is_int(logprobs) and 0 <= logprobs <= 1024
    ):
        raise bad_request("'logprobs' must be a " + ("boolean" if chat else "small integer"), "logprobs")
    stream_options = payload.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return model


# ---------------------------------------------------------------------------- OpenAPI (docs and fuzzing)


def _message_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant", "developer", "tool"]},
            "content": {
                "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {"type": "null"}]
            },
            "name": {"type": "string"},
        },
    }


def _body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    common: dict[str, Any] = {
        "model": {"type": "string", "pattern": ALIAS_PATTERN, "description": "a registered alias"},
        "stream": {"type": "boolean"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "user": {"type": "string"},
    }
    # The other vLLM sampling parameters are accepted too (CHAT_FIELDS, COMPLETION_FIELDS); the schema lists the
    # common ones and, like the router's default, refuses what it does not know.
    schema = {
        "type": "object",
        "required": required,
        "properties": {**common, **properties},
        "additionalProperties": False,
    }
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


CHAT_OPENAPI = _body(
    ["model", "messages"],
    {
        "messages": {"type": "array", "minItems": 1, "items": _message_schema()},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
    },
)
COMPLETION_OPENAPI = _body(
    ["model", "prompt"],
    {
        "prompt": {
            "anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]
        },
        "echo": {"type": "boolean"},
    },
)
