"""OpenAI's chat completions, inbound: the body as the canonical ChatRequest; the answer is
the canonical completion itself, and a stream's events the canonical chunks as they came."""

from api.errors import openai_error_document
from gateway.call import ChatRequest
from gateway.stream import Encoder, sse

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


class ChatChunks(Encoder):
    """The stream encoder of chat completions: each chunk as it came, then the usage chunk
    when the client asked for it, then `[DONE]`; a failure is an error event."""

    def __init__(self, include_usage):
        self.include_usage = include_usage
        self.last_chunk = {}

    def events(self, chunk):
        self.last_chunk = chunk
        return (sse(chunk),)

    def end(self, call):
        if self.include_usage:
            usage_chunk = {key: self.last_chunk.get(key) for key in ("id", "object", "created")}
            yield sse({**usage_chunk, "model": call.model, "choices": [], "usage": call.usage})
        yield SSE_DONE

    def failure(self, status, message, error_type):
        code = "timeout" if status == 504 else None
        return sse(openai_error_document(502, message, code=code, error_type=error_type)) + SSE_DONE
