"""OpenAI's chat completions, inbound: the body as a ChatRequest; a completion, or its
stream relayed chunk by chunk.

What runs after the first chunk of a stream needs no app context: the rest of a stream is
iterated by the server after the request's context has ended.
"""

import json
import logging
from functools import partial

from api.errors import openai_error_document
from gateway.call import ChatRequest, call_finished, sentence
from gateway.routing import served_answer
from upstreams import UpstreamFailure, UpstreamRefusal, UpstreamTimeout

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"


# Read into their own fields of the ChatRequest; `stream_options` stays among the options too.
OWN_FIELDS = ("model", "messages", "tools", "stream")


def chat_request_of(body):
    """An OpenAI chat completions body (as the schema loaded it) as the gateway's ChatRequest."""
    return ChatRequest(
        model=body["model"],
        messages=body["messages"],
        tools=body.get("tools"),
        options={name: value for name, value in body.items() if name not in OWN_FIELDS},
        stream=body["stream"],
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
    )


def ask_chat(chat_request, adapter, target, model, deadline):
    return adapter.chat(target, model, chat_request, deadline)


def ask_chat_stream(chat_request, adapter, target, model, deadline):
    return adapter.open_chat_stream(target, model, chat_request, deadline)


def complete(call, chat_request, settings):
    """A chat completion (not streamed) in OpenAI's shape, `model` the registry's id."""
    target, completion, _ = served_answer(call, "llm", partial(ask_chat, chat_request), settings)
    call.usage = completion.get("usage")
    completion["model"] = call.model
    call_finished(call)
    return target, completion


def sse(document):
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def stream_error(message, error_type="api_error", code=None):
    return sse(openai_error_document(502, message, code=code, error_type=error_type))


def open_stream(call, chat_request, settings):
    """(target, SSE event bytes): the stream of the first provider that accepts the call."""
    target, chunks, deadline = served_answer(call, "llm", partial(ask_chat_stream, chat_request), settings)
    return target, relay(chunks, call, chat_request.include_usage, deadline)


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
