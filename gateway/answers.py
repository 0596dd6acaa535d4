"""What every gateway route shares, whichever protocol it speaks: its blueprint's hooks (the
body cap, a limited token's rate limit headers), the errors the OpenAPI document names, and
the HTTP answer of a call: its document, or its stream's events with the stream's headers,
and the provider that served it."""

from flask import Blueprint, request

from access.limits import with_rate_limit_headers
from gateway.call import GatewayCall, Settings
from gateway.chat import answer

# Prompts outgrow the 64 KiB of the registry's own bodies (long contexts, images as data URLs).
GATEWAY_MAX_BODY_BYTES = 16 * 1024 * 1024
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GATEWAY_ERRORS = {
    400: "Bad body or no model; an upstream's own 4xx about the request comes with its status and "
    "message (without the provider's key)",
    404: "No provider of the type has the model (code model_not_found)",
    429: "Over one of the token's limits, or the calls in flight of REGISTRY_DEFAULT_MAX_PARALLEL (code "
    "rate_limit_exceeded, before any provider is called); or every provider of the model is rate-limiting "
    "(Retry-After in both)",
    502: "Every provider tried failed",
    503: "Every provider of the model is offline; or this worker takes no more gateway calls now (Retry-After)",
    504: "The call took longer than REGISTRY_GATEWAY_TIMEOUT, or no provider started its answer within "
    "REGISTRY_GATEWAY_ATTEMPT_TIMEOUT",
}


def allow_prompt_sized_bodies():
    request.max_content_length = GATEWAY_MAX_BODY_BYTES


def gateway_blueprint(name, import_name):
    """A blueprint of gateway routes; the other routes pay nothing for the gateway's hooks."""
    blueprint = Blueprint(name, import_name)
    blueprint.before_request(allow_prompt_sized_bodies)
    blueprint.after_request(with_rate_limit_headers)
    return blueprint


def served_by(target):
    return {"X-Registry-Provider-Id": target.provider_id}


def chat_answer(chat_request, kind, encoder, document_of):
    """The HTTP answer to a chat call: the stream `encoder` makes, or `document_of(completion)`."""
    call = GatewayCall(chat_request.model, kind, stream=chat_request.stream)
    target, document_or_events = answer(call, chat_request, Settings.of_app(), encoder, document_of)
    headers = STREAM_HEADERS if chat_request.stream else {}
    return document_or_events, 200, {**headers, **served_by(target)}
