"""Checks of the request bodies of the endpoints beyond chat and completions (embeddings, pooling, classify,
score, rerank, Responses, Messages, tokenize, render), in the style of security/inference.py: top level only,
sizes bounded, operator-only fields refused, unknown fields refused (unless ALLOW_UNKNOWN_FIELDS). vLLM validates
the rest. The field lists are vLLM 0.32's request models (tests/test_fuzz.py checks them against the installed
vLLM) plus fields OpenAI and Anthropic clients send.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import APIError
from .inference import (
    MAX_MESSAGES,
    MAX_TOKENS,
    OPERATOR_FIELDS,
    bad_request,
    check_inference,
    check_messages,
    check_model,
    is_int,
)

MAX_INPUTS = 2048  # texts (or token lists) per embeddings/pooling/classify request
MAX_DOCUMENTS = 1024  # documents per rerank or score request
MAX_TOKEN_IDS = 1_000_000  # ids per detokenize request

_POOLING_BASE = frozenset(
    {
        "model",
        "input",
        "messages",
        "user",
        "priority",
        "cache_salt",
        "padding",
        "truncate_prompt_tokens",
        "truncation_side",
        "add_special_tokens",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template_kwargs",
        "media_io_kwargs",
        "mm_processor_kwargs",
        "use_activation",
    }
)
EMBEDDING_FIELDS = _POOLING_BASE | {"dimensions", "encoding_format", "embed_dtype", "endianness"}
POOLING_FIELDS = EMBEDDING_FIELDS | {"task"}
CLASSIFY_FIELDS = _POOLING_BASE
_SCORING_BASE = frozenset(
    {
        "model",
        "user",
        "priority",
        "cache_salt",
        "padding",
        "truncate_prompt_tokens",
        "truncation_side",
        "chat_template_kwargs",
        "mm_processor_kwargs",
        "use_activation",
        "instruction",
        "max_tokens_per_doc",
        "max_tokens_per_query",
    }
)
SCORE_FIELDS = _SCORING_BASE | {"text_1", "text_2", "data_1", "data_2", "queries", "documents", "items"}
RERANK_FIELDS = _SCORING_BASE | {"query", "documents", "top_n", "return_documents", "rank_fields"}
RESPONSES_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "previous_response_id",
        "previous_input_messages",
        "stream",
        "store",
        "background",
        "max_output_tokens",
        "max_tool_calls",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "top_logprobs",
        "seed",
        "stop",
        "stop_token_ids",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "logit_bias",
        "ignore_eos",
        "include",
        "include_reasoning",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "enable_response_messages",
        "reasoning",
        "text",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "truncation",
        "metadata",
        "user",
        "priority",
        "cache_salt",
        "prompt",
        "prompt_cache_key",
        "service_tier",
        "session_id",
        "structured_outputs",
        "chat_template_kwargs",
        "media_io_kwargs",
        "mm_processor_kwargs",
        "mm_payload",
        "return_mm_kwargs",
        "vllm_xargs",
        "watermarking",
        "safety_identifier",
        "stream_options",
        "conversation",
        "context_management",
    }
)
MESSAGES_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "stream",
        "temperature",
        "top_k",
        "top_p",
        "tools",
        "tool_choice",
        "thinking",
        "metadata",
        "output_config",
        "cache_salt",
        "chat_template_kwargs",
        "mm_payload",
        "return_mm_kwargs",
        "vllm_xargs",
        "watermarking",
        "service_tier",
        "container",
        "mcp_servers",
    }
)
COUNT_TOKENS_FIELDS = frozenset(
    {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "chat_template_kwargs"}
)
TOKENIZE_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "add_generation_prompt",
        "add_special_tokens",
        "continue_final_message",
        "chat_template_kwargs",
        "media_io_kwargs",
        "mm_processor_kwargs",
        "return_token_strs",
        "tools",
    }
)
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})
AUDIO_FIELDS = frozenset(
    {
        "model",
        "file",
        "language",
        "prompt",
        "response_format",
        "temperature",
        "timestamp_granularities",
        "stream",
        "stream_include_usage",
        "stream_continuous_usage_stats",
        "to_language",
        "hotwords",
        "seed",
        "n",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "length_penalty",
        "max_completion_tokens",
        "include_stop_str_in_output",
        "use_beam_search",
        "vllm_xargs",
        "watermarking",
    }
)


def _fields(payload: dict[str, Any], known: frozenset[str], allow_unknown: bool) -> None:
    for key in payload:
        if key in OPERATOR_FIELDS:
            raise bad_request(f"'{key}' may not be set by clients", key)
        if key not in known and not allow_unknown:
            raise bad_request(f"unknown field '{key[:100]}'", key[:100])


def _items(payload: dict[str, Any], key: str, limit: int, required: bool = True) -> None:
    """A string, or a non-empty list of at most `limit` items (texts, token lists, objects)."""
    value = payload.get(key)
    if value is None and not required:
        return
    if isinstance(value, str) and value:
        return
    if not isinstance(value, list) or not value:
        raise bad_request(f"'{key}' must be a non-empty string or array", key)
    if len(value) > limit:
        raise bad_request(f"'{key}' may hold at most {limit} items", key)


def _int(payload: dict[str, Any], key: str, low: int, high: int) -> None:
    value = payload.get(key)
    if value is not None and (not is_int(value) or not low <= value <= high):
        raise bad_request(f"'{key}' must be an integer from {low} to {high}", key)


def _bool(payload: dict[str, Any], key: str) -> None:
    if payload.get(key) is not None and not isinstance(payload[key], bool):
        raise bad_request(f"'{key}' must be a boolean", key)


def _pooling(known: frozenset[str]) -> Callable[[dict[str, Any], bool], None]:
    def check(payload: dict[str, Any], allow_unknown: bool) -> None:
        _fields(payload, known, allow_unknown)
        if "messages" in payload:
            check_messages(payload)
        else:
            _items(payload, "input", MAX_INPUTS)
        _int(payload, "dimensions", 1, 65536)

    return check


def _score(payload: dict[str, Any], allow_unknown: bool) -> None:
    _fields(payload, SCORE_FIELDS, allow_unknown)
    pairs = [("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"), ("queries", "items")]
    given = [pair for pair in pairs if pair[0] in payload and pair[1] in payload]
    if not given:
        raise bad_request("give 'text_1' and 'text_2' (or 'queries' and 'documents')", "text_1")
    for first, second in given[:1]:
        _items(payload, first, MAX_DOCUMENTS)
        _items(payload, second, MAX_DOCUMENTS)


def _rerank(payload: dict[str, Any], allow_unknown: bool) -> None:
    _fields(payload, RERANK_FIELDS, allow_unknown)
    query = payload.get("query")
    if not (isinstance(query, str) and query) and not isinstance(query, dict):
        raise bad_request("'query' must be a non-empty string", "query")
    documents = payload.get("documents")
    if not isinstance(documents, list) or not documents:
        raise bad_request("'documents' must be a non-empty array", "documents")
    if len(documents) > MAX_DOCUMENTS:
        raise bad_request(f"'documents' may hold at most {MAX_DOCUMENTS} items", "documents")
    _int(payload, "top_n", 0, MAX_DOCUMENTS)


def _responses(payload: dict[str, Any], allow_unknown: bool) -> None:
    _fields(payload, RESPONSES_FIELDS, allow_unknown)
    if "input" not in payload and "prompt" not in payload:
        raise bad_request("'input' is required", "input")
    value = payload.get("input")
    if value is not None and not (isinstance(value, str) and value) and not (isinstance(value, list) and value):
        raise bad_request("'input' must be a non-empty string or array", "input")
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise bad_request(f"'input' may hold at most {MAX_MESSAGES} items", "input")
    _int(payload, "max_output_tokens", 1, MAX_TOKENS)
    _int(payload, "top_logprobs", 0, 1024)
    for key in ("stream", "store", "background"):
        _bool(payload, key)
    previous = payload.get("previous_response_id")
    if previous is not None and not (isinstance(previous, str) and 0 < len(previous) <= 256):
        raise bad_request("'previous_response_id' must be a response id", "previous_response_id")


def _messages_api(payload: dict[str, Any], allow_unknown: bool) -> None:
    _fields(payload, MESSAGES_FIELDS, allow_unknown)
    check_messages(payload)
    max_tokens = payload.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
        raise bad_request(f"'max_tokens' is required: an integer from 1 to {MAX_TOKENS}", "max_tokens")
    _bool(payload, "stream")


def _count_tokens(payload: dict[str, Any], allow_unknown: bool) -> None:
    _fields(payload, COUNT_TOKENS_FIELDS, allow_unknown)
    check_messages(payload)


def _tokenize(payload: dict[str, Any], allow_unknown: bool) -> None:
    _fields(payload, TOKENIZE_FIELDS, allow_unknown)
    if "messages" in payload:
        check_messages(payload)
    else:
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request("give 'prompt' (a string) or 'messages'", "prompt")


def _detokenize(payload: dict[str, Any], allow_unknown: bool) -> None:
    _fields(payload, DETOKENIZE_FIELDS, allow_unknown)
    tokens = payload.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise bad_request("'tokens' must be an array of integers", "tokens")
    if len(tokens) > MAX_TOKEN_IDS:
        raise bad_request(f"'tokens' may hold at most {MAX_TOKEN_IDS} ids", "tokens")


def _audio(form: dict[str, Any], allow_unknown: bool) -> None:
    _fields(form, AUDIO_FIELDS, allow_unknown)
    if "file" not in form:
        raise bad_request("'file' (the audio, a form field) is required", "file")


# family -> check(payload, allow_unknown_fields); the model field is checked before (security/inference.py).
CHECKS: dict[str, Callable[[dict[str, Any], bool], None]] = {
    "embeddings": _pooling(EMBEDDING_FIELDS),
    "pooling": _pooling(POOLING_FIELDS),
    "classify": _pooling(CLASSIFY_FIELDS),
    "score": _score,
    "rerank": _rerank,
    "responses": _responses,
    "messages": _messages_api,
    "count_tokens": _count_tokens,
    "tokenize": _tokenize,
    "detokenize": _detokenize,
    "transcription": _audio,
    "translation": _audio,
}


def check_endpoint(path: str, family: str, payload: dict[str, Any], allow_unknown_fields: bool = False) -> str:
    """Validate the top level of a request to `path` (of `family`, dataplane/endpoints.py); returns the alias."""
    if family in ("chat", "completion"):
        return check_inference(path, payload, allow_unknown_fields)
    if family == "render":
        return check_inference(path.removesuffix("/render"), payload, allow_unknown_fields)
    alias = check_model(payload)
    check = CHECKS.get(family)
    if check is None:
        raise APIError(500, f"no input check for '{family}'", "internal_error")
    check(payload, allow_unknown_fields)
    return alias
