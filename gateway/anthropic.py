"""/api/v1/anthropic: Anthropic's Messages API, so that the `anthropic` clients and Claude
Code call any registry model (ANTHROPIC_BASE_URL={registry}/api/v1/anthropic). The token
comes as `x-api-key` or Bearer; errors are in Anthropic's shape."""

from apifairy import authenticate, body, other_responses
from flask import Blueprint, request

from access.auth import auth
from gateway.call import GatewayCall, Settings
from gateway.chat import complete, open_stream
from gateway.messages import MessageEvents, chat_request_of, message_of
from gateway.openai import GATEWAY_ERRORS, STREAM_HEADERS, allow_prompt_sized_bodies, served_by
from schemas import MessageSchema, MessagesRequestSchema

anthropic_bp = Blueprint("anthropic", __name__)
anthropic_bp.before_request(allow_prompt_sized_bodies)


@anthropic_bp.route("/anthropic/v1/messages", methods=["POST"])
@authenticate(auth, role="caller")
@body(MessagesRequestSchema)
@other_responses({200: (MessageSchema, "The message, or with `stream` Anthropic's SSE events"), **GATEWAY_ERRORS})
def create_message(messages_body):
    """Call a model, Anthropic style (the Messages API)

    Any registry model, routed and failed over as chat completions are. Providers of type
    anthropic get the body as sent (with its `anthropic-beta` header); others get it
    translated, without the fields they have no equivalent for. With `"stream": true` the
    answer is Anthropic's events as the upstream's chunks arrive. The token may also come as
    `x-api-key`; `anthropic-version`, `anthropic-beta` and `?beta=true` are accepted.
    `X-Registry-Provider-Id` names the provider.
    """
    chat_request = chat_request_of(messages_body, request.headers)
    call = GatewayCall(chat_request.model, "messages", stream=chat_request.stream)
    if chat_request.stream:
        target, events = open_stream(call, chat_request, Settings.of_app(), MessageEvents(messages_body))
        return events, 200, {"Content-Type": "text/event-stream", **STREAM_HEADERS, **served_by(target)}
    target, completion = complete(call, chat_request, Settings.of_app())
    return message_of(completion, messages_body), 200, served_by(target)
