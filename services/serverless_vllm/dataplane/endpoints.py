"""Every model-addressed endpoint of a vLLM OpenAI server, declared once for router and worker.

An endpoint is served the same way whatever it is: the request names a registered model (`model`: a JSON field,
or a form field for audio uploads), the router picks (or waits for) a replica of it, and the body goes to the
worker and its engine as it came. What differs per endpoint is declared here: how the body is read, which model
tasks can serve it (an embedding model has no chat), and which error shape its clients understand.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..schemas import ModelTask


class BodyKind(StrEnum):
    JSON = "json"
    MULTIPART = "multipart"  # audio uploads: multipart/form-data with `model` and `file` fields


class ErrorShape(StrEnum):
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}}


GENERATE = frozenset({ModelTask.GENERATE})
POOLING = frozenset({ModelTask.EMBED, ModelTask.CLASSIFY})
ANY_TASK = frozenset(ModelTask)


@dataclass(frozen=True)
class InferenceEndpoint:
    path: str
    family: str  # the metrics label and the kind of input check (security/endpoint_checks.py)
    tasks: frozenset[ModelTask]
    body: BodyKind = BodyKind.JSON
    errors: ErrorShape = ErrorShape.OPENAI
    summary: str = ""
    streams: bool = False  # answers `"stream": true` with an event stream (SSE)

    @property
    def label(self) -> str:
        """The value of the metrics' `endpoint` label (the first two keep their names from before the others)."""
        return {"chat": "chat_completions", "completion": "completions"}.get(self.family, self.family)

    def serves(self, task: ModelTask) -> bool:
        return task in self.tasks


ENDPOINTS: tuple[InferenceEndpoint, ...] = (
    # The two hot routes first: routes are matched in order.
    InferenceEndpoint("/v1/chat/completions", "chat", GENERATE, summary="Chat completion (OpenAI)", streams=True),
    InferenceEndpoint("/v1/completions", "completion", GENERATE, summary="Text completion (OpenAI)", streams=True),
    InferenceEndpoint("/v1/responses", "responses", GENERATE, summary="Responses API (OpenAI)", streams=True),
    InferenceEndpoint(
        "/v1/messages",
        "messages",
        GENERATE,
        errors=ErrorShape.ANTHROPIC,
        summary="Messages API (Anthropic)",
        streams=True,
    ),
    InferenceEndpoint(
        "/v1/messages/count_tokens",
        "count_tokens",
        GENERATE,
        errors=ErrorShape.ANTHROPIC,
        summary="Count the tokens of a Messages request (Anthropic)",
    ),
    InferenceEndpoint("/v1/embeddings", "embeddings", frozenset({ModelTask.EMBED}), summary="Embeddings (OpenAI)"),
    InferenceEndpoint("/pooling", "pooling", POOLING, summary="Raw pooler output (vLLM)"),
    InferenceEndpoint("/classify", "classify", frozenset({ModelTask.CLASSIFY}), summary="Classification (vLLM)"),
    InferenceEndpoint("/v1/score", "score", POOLING, summary="Similarity scores of text pairs (vLLM)"),
    InferenceEndpoint("/score", "score", POOLING, summary="Similarity scores of text pairs (vLLM)"),
    InferenceEndpoint("/v1/rerank", "rerank", POOLING, summary="Rerank documents (Jina/Cohere shape)"),
    InferenceEndpoint("/rerank", "rerank", POOLING, summary="Rerank documents (Jina/Cohere shape)"),
    InferenceEndpoint("/v2/rerank", "rerank", POOLING, summary="Rerank documents (Cohere v2 shape)"),
    InferenceEndpoint("/tokenize", "tokenize", ANY_TASK, summary="Tokenize a prompt or messages (vLLM)"),
    InferenceEndpoint("/detokenize", "detokenize", ANY_TASK, summary="Token ids back to text (vLLM)"),
    InferenceEndpoint(
        "/v1/audio/transcriptions",
        "transcription",
        GENERATE,
        body=BodyKind.MULTIPART,
        summary="Speech to text (OpenAI; a speech model such as Whisper)",
    ),
    InferenceEndpoint(
        "/v1/audio/translations",
        "translation",
        GENERATE,
        body=BodyKind.MULTIPART,
        summary="Speech to English text (OpenAI; a speech model such as Whisper)",
    ),
    InferenceEndpoint(
        "/v1/chat/completions/render", "render", GENERATE, summary="The prompt a chat request renders to (vLLM)"
    ),
    InferenceEndpoint(
        "/v1/completions/render", "render", GENERATE, summary="The prompt a completion request renders to (vLLM)"
    ),
)

BY_PATH: dict[str, InferenceEndpoint] = {e.path: e for e in ENDPOINTS}
# Path -> the metrics' `endpoint` label: a bounded set of values (no raw path is ever a label).
LABELS: dict[str, str] = {e.path: e.label for e in ENDPOINTS}

# Responses are kept by the engine that made them (vLLM holds them in memory): these follow the response's id.
RESPONSE_GET = "/v1/responses/{response_id}"
RESPONSE_CANCEL = "/v1/responses/{response_id}/cancel"
RESPONSES_PREFIX = "/v1/responses/"
