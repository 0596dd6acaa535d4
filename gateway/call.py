"""The canonical call, what every gateway call shares whatever protocol it came in by: the
canonical requests, the call as the metrics count it and the log tells it, its settings and
deadline, and the wording of its errors.

The gateway's middle is one call between N inbound protocols and M wire formats:

    inbound protocol            canonical call                    wire format adapter
    (gateway/completions.py,    ChatRequest / EmbeddingsRequest   (upstreams/: OpenAI-
     embeddings.py, ...)   ->   routed by gateway/routing.py  ->  compatible, watsonx, ...)
                           <-   completion, or a stream of    <-
                                canonical chunks (stream.py)

The canonical shapes are OpenAI's chat shapes, the gateway's common tongue: messages and
tools as in a chat completions body, a completion as its answer, a stream as its chunks
(text and tool call deltas, finish reasons, and the usage). An inbound protocol translates
its body to a ChatRequest and the completion or chunks back to its own answer or events; a
wire format translates the ChatRequest to its upstream's request and its answer or events
to the canonical ones. A new protocol or wire format is one translation, not one per pair.
"""

import logging
import time
from dataclasses import dataclass, field

from flask import current_app, has_app_context, has_request_context, request

from access.auth import Caller, auth
from models import utcnow
from observability.logs import REQUEST_ID_KEY, USER_KEY
from observability.metrics import record_gateway_call, record_gateway_call_started
from observability.usage import UsageRecorder
from upstreams.http import is_count
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
class NativeBody:
    """A body in an upstream's own wire format, as the client sent it: the protocol it came
    in by (e.g. "messages") and the headers that go with it (e.g. anthropic-beta). The
    adapter of the format that speaks that protocol sends it as it is, its model replaced."""

    protocol: str
    body: dict
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChatRequest:
    """A chat call: `options` holds every other field as the client sent it (sampling, limits,
    response_format, tool_choice, fields the registry does not know), for the upstreams that
    take them; `include_usage` asks a stream for a last chunk with the call's usage; `native`,
    the body as sent, for the upstreams whose own format it is (the others ignore it)."""

    model: str  # the registry's model id; each adapter is given its upstream's own
    messages: list
    tools: list | None = None
    options: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    native: NativeBody | None = None


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
    kind: str  # "chat", "responses", "messages", "embeddings" or "count_tokens"; ENDPOINTS names it in usage events
    stream: bool = False
    asks_model: bool = True  # False for a token count: logged, but no model call in the metrics nor in usage
    provider_type: str = ""
    provider_id: str | None = None
    outcome: str = "ok"  # ok, client_error, not_found, unavailable, upstream_error, timeout, cancelled,
    # interrupted or limited
    indexed: bool = False  # the model is one the registry knows (else `model` is whatever was sent)
    started: float = field(default_factory=time.monotonic)
    first_chunk_after: float | None = None
    usage: dict | None = None
    status: int | None = None  # the error status of a call refused before its answer began
    log_fields: dict = field(default_factory=request_log_fields)
    caller: Caller | None = field(default_factory=request_caller)
    usage_recorder: UsageRecorder | None = field(default_factory=app_usage_recorder)
    admission: object = None  # its place within the caller's limits (access/limits.py), given back at its end

    def served_by(self, target):
        self.provider_id = target.provider_id

    @property
    def counted_model(self):
        """The model as the metrics count it: its id when the index knows it, else None (unknown)."""
        return self.model if self.indexed else None

    def first_chunk_sent(self):
        if self.first_chunk_after is None:
            self.first_chunk_after = time.monotonic() - self.started


def call_started(call):
    """Counted once routing knows its provider type and model, as call_finished counts it:
    the calls started and not finished are those in flight, or cut off by a worker's death."""
    if call.asks_model:
        record_gateway_call_started(call.provider_type, call.counted_model)


def count_of(usage, *names):
    """The first of the named token counts the usage holds, or None."""
    return next((usage[name] for name in names if is_count(usage.get(name))), None)


def reported_tokens(usage):
    """(input, output) tokens as the upstream reported them, in OpenAI's words or Anthropic's
    and the Responses API's; each None when it did not (never estimated)."""
    usage = usage if isinstance(usage, dict) else {}
    return count_of(usage, "prompt_tokens", "input_tokens"), count_of(usage, "completion_tokens", "output_tokens")


# The endpoint a usage event names, where it is not the call's kind.
ENDPOINTS = {"chat": "chat.completions"}
# A stream that fails after its answer began keeps its 200; its usage event names the status
# its error event stands for (499, as proxies log it, for a client that went away; 503 for
# the registry's worker stopping under it).
MID_STREAM_STATUS = {"timeout": 504, "upstream_error": 502, "cancelled": 499, "interrupted": 503}


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
            "model": call.counted_model,
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
    as a usage event and logged (a call that asks no model, logged only); its place within its
    caller's limits given back."""
    latency = time.monotonic() - call.started
    model_id = call.counted_model
    reported = reported_tokens(call.usage)
    if call.admission is not None:
        call.admission.end(sum(count or 0 for count in reported))
    if call.asks_model:
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
    attempt_timeout: float  # for one provider to start its answer; 0: only the total bounds it
    cooldown: float  # seconds a provider that failed a call is tried after the others
    keepalive: float  # seconds of an upstream's silence before a stream's keep-alive event; 0: none

    @classmethod
    def of_app(cls):
        config = current_app.config
        return cls(
            config["GATEWAY_TIMEOUT"],
            config["UPSTREAM_TIMEOUT"],
            config["GATEWAY_ATTEMPT_TIMEOUT"],
            config["GATEWAY_COOLDOWN"],
            config["GATEWAY_KEEPALIVE"],
        )

    def deadline(self):
        return Deadline(
            self.total_timeout, connect_seconds=self.connect_timeout, answer_seconds=self.attempt_timeout or None
        )


def sentence(text):
    """`text` ended by one full stop: the words it ends with (an upstream's, a reason) may bring their own."""
    return text if text.endswith((".", "!", "?")) else f"{text}."
