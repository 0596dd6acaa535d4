"""What every gateway call shares, whatever protocol it came in by: the canonical requests,
the call as the metrics count it and the log tells it, its settings and deadline, and the
wording of its errors.

Each inbound protocol (OpenAI's chat completions in chat.py, its embeddings in
embeddings.py) translates its body to a canonical request, which gateway/routing.py hands
to the wire format adapter (upstreams/) of each provider it tries; the adapter translates
it to its upstream's request. Messages, tools and answers keep OpenAI's chat shapes, the
gateway's common tongue, so a new protocol or wire format is one translation, not one per pair.
"""

import logging
import time
from dataclasses import dataclass, field

from flask import current_app, has_app_context, has_request_context, request

from access.auth import Caller, auth
from models import utcnow
from observability.logs import REQUEST_ID_KEY, USER_KEY
from observability.metrics import record_gateway_call
from observability.usage import UsageRecorder
from upstreams.transport import Deadline

log = logging.getLogger(__name__)


def request_log_fields():
    """The request's id and user, for the log lines written after its context ended (a stream's)."""
    environ = request.environ if has_request_context() else {}
    return {"request_id": environ.get(REQUEST_ID_KEY, "-"), "user": environ.get(USER_KEY, "-")}


def request_caller():
    """The request's authenticated caller, kept for the usage event of a stream, which ends
    after the request's context."""
    return auth.current_user() if has_request_context() else None


def app_usage_recorder():
    return current_app.extensions["usage"] if has_app_context() else None


@dataclass(frozen=True)
class ChatRequest:
    """A chat call: `options` holds every other field as the client sent it (sampling, limits,
    response_format, tool_choice, fields the registry does not know), for the upstreams that
    take them; `include_usage` asks a stream for a last chunk with the call's usage."""

    model: str  # the registry's model id; each adapter is given its upstream's own
    messages: list
    tools: list | None = None
    options: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False


@dataclass(frozen=True)
class EmbeddingsRequest:
    """An embeddings call: `input` as sent (text, texts or token ids); answers are floats."""

    model: str
    input: object
    options: dict = field(default_factory=dict)


@dataclass
class GatewayCall:
    """One call as the metrics count it and its usage event records it: known in full when
    call_finished runs."""

    model: str
    kind: str  # "chat" or "embeddings": the log line's word for the call; ENDPOINTS the usage event's
    stream: bool = False
    provider_type: str = ""
    provider_id: str | None = None
    outcome: str = "ok"  # ok, client_error, not_found, unavailable, upstream_error, timeout or cancelled
    indexed: bool = False  # the model is one the registry knows (else `model` is whatever was sent)
    started: float = field(default_factory=time.monotonic)
    first_chunk_after: float | None = None
    usage: dict | None = None
    status: int | None = None  # the error status of a call refused before its answer began
    log_fields: dict = field(default_factory=request_log_fields)
    caller: Caller | None = field(default_factory=request_caller)
    usage_recorder: UsageRecorder | None = field(default_factory=app_usage_recorder)

    def served_by(self, target):
        self.provider_id = target.provider_id

    def first_chunk_sent(self):
        if self.first_chunk_after is None:
            self.first_chunk_after = time.monotonic() - self.started


def count_of(usage, *names):
    """The first of the named token counts the usage holds, or None."""
    for name in names:
        count = usage.get(name)
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
    return None


def reported_tokens(usage):
    """(input, output) tokens as the upstream reported them, in OpenAI's words or Anthropic's
    and the Responses API's; each None when it did not (never estimated)."""
    usage = usage if isinstance(usage, dict) else {}
    return count_of(usage, "prompt_tokens", "input_tokens"), count_of(usage, "completion_tokens", "output_tokens")


# The endpoint a usage event names, where it is not the call's kind.
ENDPOINTS = {"chat": "chat.completions"}
# A stream that fails after its answer began keeps its 200; its usage event names the status
# its error event stands for (499, as proxies log it, for a client that went away).
MID_STREAM_STATUS = {"timeout": 504, "upstream_error": 502, "cancelled": 499}


def usage_outcome(call):
    if call.outcome == "ok":
        return "ok"
    return str(call.status or MID_STREAM_STATUS.get(call.outcome, 502))


def record_usage(call, latency, tokens):
    """Hand the call's usage event to its app's recorder, which writes it off the call's path."""
    if call.usage_recorder is None or call.caller is None:
        return
    ended_at = utcnow()
    call.usage_recorder.record(
        {
            "token_id": call.caller.token_id,
            "user_id": call.caller.id,
            "username": call.caller.username,
            "created_at": ended_at,
            "day": ended_at.date(),
            "provider_id": call.provider_id,
            "model": call.model if call.indexed else None,
            "endpoint": ENDPOINTS.get(call.kind, call.kind),
            "input_tokens": tokens[0],
            "output_tokens": tokens[1],
            "outcome": usage_outcome(call),
            "duration_seconds": latency,
            "first_chunk_seconds": call.first_chunk_after,
        }
    )


def call_finished(call):
    """The one place where a call's outcome, latency, time to first chunk and usage are all
    known: counted in the metrics (the model as the index knows it, else unknown), recorded
    as a usage event and logged."""
    latency = time.monotonic() - call.started
    model_id = call.model if call.indexed else None
    reported = reported_tokens(call.usage)
    record_gateway_call(call.provider_type, model_id, call.outcome, latency, call.first_chunk_after, reported)
    record_usage(call, latency, reported)
    first_chunk = f"{call.first_chunk_after * 1000:.1f}" if call.first_chunk_after is not None else "-"
    tokens = (call.usage or {}).get("total_tokens", "-")
    log.info(
        "gateway %s%s model=%s provider=%s outcome=%s latency_ms=%.1f first_chunk_ms=%s tokens=%s",
        call.kind,
        " stream" if call.stream else "",
        call.model,
        call.provider_id or "-",
        call.outcome,
        latency * 1000,
        first_chunk,
        tokens,
        extra=call.log_fields,
    )


@dataclass(frozen=True)
class Settings:
    total_timeout: float
    connect_timeout: float

    @classmethod
    def of_app(cls):
        config = current_app.config
        return cls(config["GATEWAY_TIMEOUT"], config["UPSTREAM_TIMEOUT"])

    def deadline(self):
        return Deadline(self.total_timeout, connect_seconds=self.connect_timeout)


def sentence(text):
    """`text` ended by one full stop: the words it ends with (an upstream's, a reason) may bring their own."""
    return text if text.endswith((".", "!", "?")) else f"{text}."
