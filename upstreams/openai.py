"""OpenAI-compatible upstreams (openai, ollama, rits and most other types): `GET {base_url}/models`;
chat and embeddings. The canonical request keeps every field the client sent among its
options (fields the registry does not know included), so the body goes out as it came in,
with the upstream's model id; the chunks of a stream are yielded as each arrives."""

from contextlib import closing

from upstreams.http import checked_completion, checked_embeddings, json_events, open_response, read_json, started
from upstreams.listing import get_json, model_entries, upstream_model, usable_models
from upstreams.wire import WireFormat


def entry_model(entry):
    return upstream_model(entry.get("id"), entry.get("created"), entry.get("owned_by"), entry.get("display_name"))


def chat_body(request):
    """The canonical request as OpenAI's chat completions body (the model added when posted)."""
    body = {**request.options, "messages": request.messages}
    if request.tools is not None:
        body["tools"] = request.tools
    return body


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

    def chat(self, target, model, request, deadline):
        response = self.post(target, "/chat/completions", model, chat_body(request), deadline)
        return checked_completion(read_json(response, target), target)

    def open_chat_stream(self, target, model, request, deadline):
        """The accepted stream's chunks, as a generator that closes the upstream call when closed.

        Usage is always asked for, so that every call's tokens are known; the gateway leaves the
        usage chunk out when the client did not ask for it.
        """
        stream_options = {**(request.options.get("stream_options") or {}), "include_usage": True}
        body = {**chat_body(request), "stream": True, "stream_options": stream_options}
        response = self.post(target, "/chat/completions", model, body, deadline)

        def chunks():
            with closing(response):
                yield from json_events(response, target)

        return started(chunks(), target)

    def embed(self, target, model, request, deadline):
        """Embeddings as floats: the gateway encodes base64 itself, which not every upstream can."""
        response = self.post(target, "/embeddings", model, {**request.options, "input": request.input}, deadline)
        return checked_embeddings(read_json(response, target), target)


class Rits(OpenAICompatible):
    """IBM RITS: OpenAI-compatible, its key also in a RITS_API_KEY header."""

    name = "RITS"

    def auth_headers(self, target):
        return {**super().auth_headers(target), "RITS_API_KEY": target.api_key}
