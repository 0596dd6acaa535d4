"""/api/v1/openai: the OpenAI-style model list, and the gateway's chat completions, Responses
and embeddings, which call the providers' models without handing out their keys."""

from functools import partial

from apifairy import authenticate, body, other_responses, response

from access.auth import auth
from catalog.index import available_models
from gateway import completions, responses
from gateway.answers import GATEWAY_ERRORS, chat_answer, gateway_blueprint, served_by
from gateway.call import GatewayCall, Settings
from gateway.embeddings import embeddings
from schemas import (
    ChatCompletionRequestSchema,
    ChatCompletionSchema,
    EmbeddingsRequestSchema,
    EmbeddingsSchema,
    OpenAIModelListSchema,
    ResponseSchema,
    ResponsesRequestSchema,
)

openai_bp = gateway_blueprint("openai", __name__)


@openai_bp.route("/openai/models", methods=["GET"])
@authenticate(auth, role="reader")
@response(OpenAIModelListSchema)
def list_models():
    """List the models of every online provider, OpenAI style

    Answered from the model index (no upstream is asked): each model id once, shown with
    the oldest online provider that lists it.
    """
    return {"object": "list", "data": available_models()}


def as_sent(completion):
    return completion


@openai_bp.route("/openai/chat/completions", methods=["POST"])
@authenticate(auth, role="caller")
@body(ChatCompletionRequestSchema)
@other_responses({200: (ChatCompletionSchema, "The completion, or with `stream` its SSE chunks"), **GATEWAY_ERRORS})
def chat_completions(chat_body):
    """Call a model's chat completion, OpenAI style

    Routed to the oldest online provider of the model's type that serves it, and to the
    next one when a provider cannot be reached, answers 429 or 5xx, or has not started its
    answer within REGISTRY_GATEWAY_ATTEMPT_TIMEOUT, before anything was sent; a provider
    that failed a call within REGISTRY_GATEWAY_COOLDOWN is tried after the others. With
    `"stream": true` the answer is `text/event-stream`: each upstream chunk as it arrives,
    ending with `data: [DONE]`, and an SSE comment (`: keep-alive`) whenever the model keeps
    silent for REGISTRY_GATEWAY_KEEPALIVE seconds. `X-Registry-Provider-Id` names the provider.
    """
    chat_request = completions.chat_request_of(chat_body)
    return chat_answer(chat_request, "chat", completions.ChatChunks(chat_request.include_usage), as_sent)


@openai_bp.route("/openai/responses", methods=["POST"])
@authenticate(auth, role="caller")
@body(ResponsesRequestSchema)
@other_responses({200: (ResponseSchema, "The response, or with `stream` its SSE events"), **GATEWAY_ERRORS})
def create_response(responses_body):
    """Call a model through OpenAI's Responses API

    Any model of the registry, whatever its provider's type: the body is translated to a chat
    call and routed as chat completions are; custom tools (Codex's `apply_patch`) go upstream
    as functions of one string, `input`, and their calls come back as `custom_tool_call`
    items. Nothing is stored: send the whole conversation in `input`
    (`previous_response_id` is a 400). With `"stream": true` the answer is the
    Responses event sequence (`response.created` ... `response.completed`), relayed as the
    model's chunks arrive; a failure after the first event is `response.failed`.
    """
    chat_request = responses.chat_request_of(responses_body)
    return chat_answer(
        chat_request,
        "responses",
        responses.ResponseEvents(responses_body),
        partial(responses.response_of, body=responses_body),
    )


@openai_bp.route("/openai/embeddings", methods=["POST"])
@authenticate(auth, role="caller")
@body(EmbeddingsRequestSchema)
@other_responses({200: (EmbeddingsSchema, "The embeddings"), **GATEWAY_ERRORS})
def create_embeddings(embeddings_request):
    """Embed text with a model, OpenAI style

    Routed like chat completions. `encoding_format: base64` (the OpenAI client's default)
    answers little-endian float32 values in base64, whatever the upstream answered.
    """
    call = GatewayCall(embeddings_request["model"], "embeddings")
    target, answer = embeddings(call, embeddings_request, Settings.of_app())
    return answer, 200, served_by(target)
