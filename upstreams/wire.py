"""The calls every wire format answers, and the one place a format that cannot make a call says so.

A wire format's adapter subclasses WireFormat and overrides the calls its upstreams make:
list_models(target, observe) -> [UpstreamModel]; chat(target, model, request, deadline) -> a
completion; open_chat_stream(...) -> an iterator of chunks; embed(...) -> embeddings;
count_tokens(target, model, native, deadline) -> the upstream's own count of a body in its own
format (a NativeBody; only a format with a counting endpoint has it: counts are never
estimated); auth_headers(target), the headers of its key (a format that exchanges its key
says so). `request` is the gateway's canonical ChatRequest or EmbeddingsRequest
(gateway/call.py); answers are in OpenAI's completion, chunk and embeddings shapes; `model` is
the upstream's own model id.
"""

from upstreams.errors import unsupported


class WireFormat:
    name = "these"

    def auth_headers(self, target):
        return {}

    def list_models(self, target, observe):
        raise unsupported(self.name, "model listings")

    def chat(self, target, model, request, deadline):
        raise unsupported(self.name, "chat")

    def open_chat_stream(self, target, model, request, deadline):
        raise unsupported(self.name, "chat")

    def embed(self, target, model, request, deadline):
        raise unsupported(self.name, "embeddings")

    def count_tokens(self, target, model, native, deadline):
        raise unsupported(self.name, "token counts")
