"""/api/v1/anthropic: Anthropic's Messages API, so that the `anthropic` clients and Claude
Code call any registry model (ANTHROPIC_BASE_URL={registry}/api/v1/anthropic). The token
comes as `x-api-key` or Bearer; errors are in Anthropic's shape."""

from functools import partial

from apifairy import authenticate, body, other_responses
from flask import request

from access.auth import auth
from gateway.answers import GATEWAY_ERRORS, chat_answer, gateway_blueprint, served_by
from gateway.call import Settings
from gateway.messages import MessageEvents, chat_request_of, count_tokens, message_of
from schemas import MessageSchema, MessagesRequestSchema, TokenCountRequestSchema, TokenCountSchema

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
    answer is Anthropic's events as the upstream's chunks arrive, and a `ping` whenever the
    model keeps silent for REGISTRY_GATEWAY_KEEPALIVE seconds. The token may also come as
    `x-api-key`; `anthropic-version`, `anthropic-beta` and `?beta=true` are accepted.
    `X-Registry-Provider-Id` names the provider.
    """
    chat_request = chat_request_of(messages_body, request.headers)
    return chat_answer(chat_request, "messages", MessageEvents(messages_body), partial(message_of, body=messages_body))


@anthropic_bp.route("/anthropic/v1/messages/count_tokens", methods=["POST"])
@authenticate(auth, role="caller")
@body(TokenCountRequestSchema)
@other_responses(
    {
        200: (TokenCountSchema, "The provider's count of the body's input tokens"),
        **GATEWAY_ERRORS,
        400: "Bad body, or a model whose provider type cannot count tokens (only anthropic providers "
        "can: the registry never estimates a count); an upstream's own 4xx comes with its status",
    }
)
def count_message_tokens(count_body):
    """Count a Messages body's input tokens, Anthropic style

    Providers of type anthropic get the body as sent, at their own `messages/count_tokens`,
    routed and failed over as messages are; the answer is theirs (`input_tokens`). Other
    provider types have no token-counting endpoint: their models answer a 400
    `invalid_request_error`, as the registry never estimates a count. A count is no model
    call: it is not recorded as usage.
    """
    target, count = count_tokens(count_body, request.headers, Settings.of_app())
    return count, 200, served_by(target)
