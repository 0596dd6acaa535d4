"""The gateway's calls: route a model to its providers, try them in turn, relay the answer.

A call is routed while the request holds the database; then the database is let go
(storage.connections.no_connection) and only then is an upstream called, so no connection or
transaction waits on a model. Each provider's key is opened when its attempt starts. What
runs after the first chunk of a stream needs no app context: the rest of a stream is
iterated by the server after the request's context has ended.
"""

import base64
import json
import logging
import re
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from flask import current_app, has_request_context, request
from werkzeug.exceptions import NotFound, ServiceUnavailable

from access.crypto import UnopenableApiKey
from api.errors import GatewayError
from catalog.index import providers_serving
from models import CAPABILITIES_BY_TYPE, ModelRef
from observability.logs import REQUEST_ID_KEY, USER_KEY
from observability.metrics import record_gateway_call
from storage.connections import no_connection
from upstreams import openai, watsonx
from upstreams.calls import Target, UpstreamFailure, UpstreamRefusal, UpstreamTimeout
from upstreams.transport import Deadline

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"


def request_log_fields():
    """The request's id and user, for the log lines written after its context ended (a stream's)."""
    environ = request.environ if has_request_context() else {}
    return {"request_id": environ.get(REQUEST_ID_KEY, "-"), "user": environ.get(USER_KEY, "-")}


@dataclass
class GatewayCall:
    """One call as the metrics count it: known in full when call_finished runs."""

    model: str
    kind: str  # "chat" or "embeddings"
    stream: bool = False
    provider_type: str = ""
    provider_id: str | None = None
    outcome: str = "ok"  # ok, client_error, not_found, unavailable, upstream_error, timeout or cancelled
    indexed: bool = False  # the model is one the registry knows (else `model` is whatever was sent)
    started: float = field(default_factory=time.monotonic)
    first_chunk_after: float | None = None
    usage: dict | None = None
    log_fields: dict = field(default_factory=request_log_fields)

    def served_by(self, target):
        self.provider_id = target.provider_id

    def first_chunk_sent(self):
        if self.first_chunk_after is None:
            self.first_chunk_after = time.monotonic() - self.started


def call_finished(call):
    """The one place where a call's outcome, latency, time to first chunk and usage are all
    known: counted in the metrics (the model as the index knows it, else unknown) and logged."""
    latency = time.monotonic() - call.started
    model_id = call.model if call.indexed else None
    record_gateway_call(call.provider_type, model_id, call.outcome, latency, call.first_chunk_after, call.usage)
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
    watsonx_iam_url: str

    @classmethod
    def of_app(cls):
        config = current_app.config
        return cls(config["GATEWAY_TIMEOUT"], config["UPSTREAM_TIMEOUT"], config["WATSONX_IAM_URL"])

    def deadline(self):
        return Deadline(self.total_timeout, connect_seconds=self.connect_timeout)


def sentence(text):
    """`text` ended by one full stop: the words it ends with (an upstream's, a reason) may bring their own."""
    return text if text.endswith((".", "!", "?")) else f"{text}."


def model_not_found(model_ref, why):
    return GatewayError(
        404, sentence(f"The model {model_ref!r} does not exist: {why}"), code="model_not_found", param="model"
    )


def parse_model_ref(model_ref, capability):
    """The ModelRef of a registry model id that names a model of the capability."""
    if not model_ref:
        raise GatewayError(400, "`model` must name a model: its registry id, as type:upstream id.", param="model")
    try:
        parsed = ModelRef.parse(model_ref)
    except ValueError as error:
        raise model_not_found(model_ref, str(error)) from None
    if capability not in CAPABILITIES_BY_TYPE[parsed.type]:
        kind = "chat" if capability == "llm" else "embeddings"
        raise GatewayError(400, f"{parsed.type} models do not serve {kind}.", param="model")
    return parsed


def target_of(provider, upstream_id, watsonx_iam_url):
    """The provider as a call's target, its key opened when its attempt starts: a key the
    configured encryption keys cannot open fails this provider only."""
    try:
        api_key = provider.open_api_key()
    except UnopenableApiKey:
        raise UpstreamFailure(f"the registry cannot open the API key of provider {provider.id}") from None
    return Target(
        provider.id,
        provider.type,
        provider.base_url,
        api_key,
        upstream_id,
        provider.watsonx_project_id,
        provider.watsonx_space_id,
        watsonx_iam_url,
    )


def serving_providers(parsed):
    """The online providers of the model, oldest first, from the model index."""
    try:
        return providers_serving(parsed)
    except NotFound:
        raise model_not_found(str(parsed), f"no {parsed.type} provider serves {parsed.upstream_id!r}") from None
    except ServiceUnavailable:
        raise GatewayError(503, f"Every provider of {parsed} is offline; try again when one answers.") from None


def route(call, capability, settings):
    """The targets to try for the call's model, oldest provider first, each to be made (its
    key opened) when its turn comes; the database let go."""
    parsed = parse_model_ref(call.model, capability)
    call.provider_type = parsed.type
    try:
        providers = serving_providers(parsed)
    except GatewayError as error:
        call.indexed = error.status == 503  # indexed, its providers offline
        raise
    call.indexed = True
    return [partial(target_of, provider, parsed.upstream_id, settings.watsonx_iam_url) for provider in providers]


def wire_of(target):
    return watsonx if target.type == "watsonx" else openai


def refused(refusal, target):
    error = refusal.error
    return GatewayError(
        refusal.status,
        error["message"],
        code=error.get("code"),
        param=error.get("param"),
        error_type=error.get("type"),
        headers={"X-Registry-Provider-Id": target.provider_id},
    )


def is_delay_in_seconds(retry_after):
    """A Retry-After in seconds the registry can pass on (its HTTP-date form is not)."""
    return re.fullmatch(r"\d{1,9}", retry_after or "") is not None


def every_provider_failed(failures):
    """429 when every provider said so (with the soonest Retry-After), else 502."""
    if all(failure.status == 429 for failure in failures):
        waits = sorted(int(failure.retry_after) for failure in failures if is_delay_in_seconds(failure.retry_after))
        headers = {"Retry-After": str(waits[0])} if waits else {}
        return GatewayError(429, "Every provider of the model is rate-limiting; retry later.", headers=headers)
    reasons = "; ".join(str(failure) for failure in failures)
    return GatewayError(502, sentence(f"Every provider of the model failed: {reasons}"))


def first_answer(targets, attempt, call, deadline):
    """(target, answer) from the first provider that accepts the call, trying them in turn
    on a connection failure, 429 or 5xx; every attempt's socket work within the deadline."""
    failures = []
    for target_of_turn in targets:
        try:
            target = target_of_turn()
            with no_connection(), deadline.bounding():
                answer = attempt(target)
        except UpstreamFailure as failure:
            log.warning("gateway: %s; trying the next provider", failure)
            failures.append(failure)
            continue
        except UpstreamRefusal as refusal:
            call.served_by(target)
            raise refused(refusal, target) from None
        except UpstreamTimeout as timeout:
            call.served_by(target)
            raise GatewayError(504, f"The model did not answer in time: {timeout}.") from None
        call.served_by(target)
        return target, answer
    raise every_provider_failed(failures)


def outcome_of_refusal(status):
    """How the metrics name a call answered with this error status."""
    named = {404: "not_found", 503: "unavailable", 504: "timeout", 502: "upstream_error", 429: "upstream_error"}
    return named.get(status, "client_error" if status < 500 else "upstream_error")


@contextmanager
def counted_if_refused(call):
    """A call refused before any answer is counted here; one answered, when its answer is done."""
    try:
        yield
    except GatewayError as error:
        call.outcome = outcome_of_refusal(error.status)
        call_finished(call)
        raise


def served_answer(call, capability, operation, request_body, settings):
    """(target, answer, the call's deadline) of the first provider of the call's model that
    accepts it, asked through its wire format's `operation` (chat, open_chat_stream or embed)."""
    deadline = settings.deadline()

    def ask(target):
        return getattr(wire_of(target), operation)(target, request_body, deadline)

    with counted_if_refused(call):
        target, answer = first_answer(route(call, capability, settings), ask, call, deadline)
    return target, answer, deadline


def complete(call, chat_request, settings):
    """A chat completion (not streamed) in OpenAI's shape, `model` the registry's id."""
    target, completion, _ = served_answer(call, "llm", "chat", chat_request, settings)
    call.usage = completion.get("usage")
    completion["model"] = call.model
    call_finished(call)
    return target, completion


def float32_base64(vector):
    """An embedding as OpenAI's base64: little-endian float32 values."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embeddings(call, embeddings_request, settings):
    """Embeddings in OpenAI's shape, base64-encoded when the client asked so (as OpenAI's
    own client does by default), `model` the registry's id."""
    target, answer, _ = served_answer(call, "embedding", "embed", embeddings_request, settings)
    call.usage = answer.get("usage")
    answer["model"] = call.model
    if embeddings_request.get("encoding_format") == "base64":
        for item in answer.get("data") or []:
            if isinstance(item.get("embedding"), list):
                item["embedding"] = float32_base64(item["embedding"])
    call_finished(call)
    return target, answer


def sse(document):
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def stream_error(message, error_type="api_error", code=None):
    return sse({"error": {"message": message, "type": error_type, "param": None, "code": code}})


def open_stream(call, chat_request, settings):
    """(target, SSE event bytes): the stream of the first provider that accepts the call."""
    target, chunks, deadline = served_answer(call, "llm", "open_chat_stream", chat_request, settings)
    include_usage = bool((chat_request.get("stream_options") or {}).get("include_usage"))
    return target, relay(chunks, call, include_usage, deadline)


def relay(chunks, call, include_usage, deadline):
    """Each upstream chunk as an SSE event as soon as it arrives, `model` the registry's id.

    Usage, wherever the upstream put it, comes in one last chunk with `choices: []` when
    the client asked for it. A failure after the first chunk is an error event; a client
    that goes away closes this generator, which closes the upstream call.
    """
    last_chunk = {}
    try:
        try:
            for chunk in deadline.each_within(chunks):
                usage = chunk.pop("usage", None)
                if usage:
                    call.usage = usage
                chunk["model"] = call.model
                last_chunk = chunk
                if usage and not chunk.get("choices"):
                    continue  # the usage chunk: sent at the end, when asked for
                call.first_chunk_sent()
                yield sse(chunk)
                if deadline.remaining() <= 0:
                    raise UpstreamTimeout("the stream took longer than the gateway allows")
            if include_usage:
                usage_chunk = {key: last_chunk.get(key) for key in ("id", "object", "created")}
                yield sse({**usage_chunk, "model": call.model, "choices": [], "usage": call.usage})
        except UpstreamTimeout as timeout:
            call.outcome = "timeout"
            yield stream_error(sentence(f"The model did not answer in time: {timeout}"), "timeout", "timeout")
        except (UpstreamFailure, UpstreamRefusal) as failure:
            call.outcome = "upstream_error"
            yield stream_error(sentence(f"The provider failed mid-stream: {failure}"))
        except Exception:
            call.outcome = "upstream_error"
            log.exception("gateway stream of %s failed", call.model, extra=call.log_fields)
            yield stream_error("The gateway met an unexpected error; it has been logged.")
        yield SSE_DONE
    except GeneratorExit:
        call.outcome = "cancelled"
        raise
    finally:
        chunks.close()
        call_finished(call)
