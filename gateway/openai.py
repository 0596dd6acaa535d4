"""/api/v1/openai: the OpenAI-style model list, and the gateway's chat completions, Responses
and embeddings, which call the providers' models without handing out their keys."""

from functools import partial

from apifairy import authenticate, body, other_responses, response
from flask import Blueprint, request

from access.auth import auth
from catalog.index import available_models
from gateway import completions, responses
from gateway.call import GatewayCall, Settings
from gateway.chat import answer
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

openai_bp = Blueprint("openai", __name__)

# Prompts outgrow the 64 KiB of the registry's own bodies (long contexts, images as data URLs).
GATEWAY_MAX_BODY_BYTES = 16 * 1024 * 1024
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GATEWAY_ERRORS = {
    400: "Bad body or no model; an upstream's own 4xx about the request comes with its status and "
    "message (without the provider's key)",
    404: "No provider of the type has the model (code model_not_found)",
    429: "Every provider of the model is rate-limiting (Retry-After)",
    502: "Every provider tried failed",
    503: "Every provider of the model is offline",
    504: "The call took longer than REGISTRY_GATEWAY_TIMEOUT, or no provider started its answer within "
    "REGISTRY_GATEWAY_ATTEMPT_TIMEOUT",
}


@openai_bp.before_request
def allow_prompt_sized_bodies():
    request.max_content_length = GATEWAY_MAX_BODY_BYTES


@openai_bp.route("/openai/models", methods=["GET"])
@authenticate(auth, role="reader")
@response(OpenAIModelListSchema)
def list_models():
    """List the models of every online provider, OpenAI style

    Answered from the model index (no upstream is asked): each model id once, shown with
    the oldest online provider that lists it.
    """
    return {"object": "list", "data": available_models()}


def served_by(target):
    return {"X-Registry-Provider-Id": target.provider_id}


def chat_answer(chat_request, kind, encoder, document_of):
    """The HTTP answer to a chat call: the stream `encoder` makes, or `document_of(completion)`."""
    call = GatewayCall(chat_request.model, kind, stream=chat_request.stream)
    target, document_or_events = answer(call, chat_request, Settings.of_app(), encoder, document_of)
    headers = {"Content-Type": "text/event-stream", **STREAM_HEADERS} if chat_request.stream else {}
    return document_or_events, 200, {**headers, **served_by(target)}


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
    ending with `data: [DONE]`. `X-Registry-Provider-Id` names the provider.
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
    call and routed as chat completions are. Nothing is stored: send the whole conversation
    in `input` (`previous_response_id` is a 400). With `"stream": true` the answer is the
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
