"""/api/v1/anthropic: Anthropic's Messages API, so that the `anthropic` clients and Claude
Code call any registry model (ANTHROPIC_BASE_URL={registry}/api/v1/anthropic). The token
comes as `x-api-key` or Bearer; errors are in Anthropic's shape."""

from functools import partial

from apifairy import authenticate, body, other_responses
from flask import request

from access.auth import auth
from gateway.answers import GATEWAY_ERRORS, chat_answer, gateway_blueprint
from gateway.messages import MessageEvents, chat_request_of, message_of
from schemas import MessageSchema, MessagesRequestSchema

anthropic_bp = gateway_blueprint("anthropic", __name__)


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
    return chat_answer(chat_request, "messages", MessageEvents(messages_body), partial(message_of, body=messages_body))
