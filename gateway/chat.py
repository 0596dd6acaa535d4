"""The canonical chat call, whatever protocol it came in by: a ChatRequest routed to the
first provider that accepts it, answered as a completion in OpenAI's shape or as a stream
of canonical chunks encoded by the inbound protocol (gateway/stream.py).

What runs after the first chunk of a stream needs no app context: the rest of a stream is
iterated by the server after the request's context has ended.
"""

from functools import partial

from gateway.call import call_finished
from gateway.routing import served_answer
from gateway.stream import relay


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


def open_stream(call, chat_request, settings, encoder):
    """(target, the stream's events): the stream of the first provider that accepts the call,
    in the protocol of `encoder` (gateway/stream.py)."""
    target, chunks, deadline = served_answer(call, "llm", partial(ask_chat_stream, chat_request), settings)
    return target, relay(chunks, call, deadline, encoder, settings.keepalive)


def answer(call, chat_request, settings, encoder, document_of):
    """(target, the answer in the inbound protocol): with `stream` the events `encoder` makes of
    the chunks, else `document_of(completion)`."""
    if chat_request.stream:
        return open_stream(call, chat_request, settings, encoder)
    target, completion = complete(call, chat_request, settings)
    return target, document_of(completion)
