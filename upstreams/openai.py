"""OpenAI-compatible upstreams (openai, ollama, rits and most other types): `GET {base_url}/models`;
chat and embeddings, whose body goes through as the client sent it (fields the registry does
not know included), with the upstream's model id, and whose chunks are relayed as they come."""

from contextlib import closing

from upstreams.http import checked_completion, checked_embeddings, json_events, open_response, read_json, started
from upstreams.listing import get_json, model_entries, upstream_model, usable_models
from upstreams.wire import WireFormat


def entry_model(entry):
    return upstream_model(entry.get("id"), entry.get("created"), entry.get("owned_by"), entry.get("display_name"))


class OpenAICompatible(WireFormat):
    name = "OpenAI-compatible"

    def auth_headers(self, target):
        return {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}

    def list_models(self, target, observe):
        headers = self.auth_headers(target)
        document = get_json(target, f"{target.base_url}/models", observe, headers=headers)
        return usable_models(target, model_entries(document, "data"), entry_model)

    def post(self, target, path, model, body, deadline):
        return open_response(
            target,
            "POST",
            f"{target.base_url}{path}",
            deadline,
            headers=self.auth_headers(target),
            json_body={**body, "model": model},
        )

    def chat(self, target, model, body, deadline):
        response = self.post(target, "/chat/completions", model, body, deadline)
        return checked_completion(read_json(response, target), target)

    def open_chat_stream(self, target, model, body, deadline):
        """The accepted stream's chunks, as a generator that closes the upstream call when closed.

        Usage is always asked for, so that every call's tokens are known; the gateway leaves the
        usage chunk out when the client did not ask for it.
        """
        stream_options = {**(body.get("stream_options") or {}), "include_usage": True}
        response = self.post(
            target, "/chat/completions", model, {**body, "stream": True, "stream_options": stream_options}, deadline
        )

        def chunks():
            with closing(response):
                yield from json_events(response, target)

        return started(chunks(), target)

    def embed(self, target, model, body, deadline):
        """Embeddings as floats: the gateway encodes base64 itself, which not every upstream can."""
        body = {name: value for name, value in body.items() if name != "encoding_format"}
        response = self.post(target, "/embeddings", model, body, deadline)
        return checked_embeddings(read_json(response, target), target)


class Rits(OpenAICompatible):
    """IBM RITS: OpenAI-compatible, its key also in a RITS_API_KEY header."""

    name = "RITS"

    def auth_headers(self, target):
        return {**super().auth_headers(target), "RITS_API_KEY": target.api_key}
