"""OpenAI-compatible upstreams (openai, ollama, rits, anthropic's compatible endpoint and the
rest): `GET {base_url}/models`; chat and embeddings, whose body goes through as the client
sent it (fields the registry does not know included), with the upstream's model id."""

from contextlib import closing

from upstreams import get_json, model_entries, upstream_model, usable_models
from upstreams.calls import checked_completion, checked_embeddings, json_events, open_response, read_json, started


def entry_model(entry):
    return upstream_model(entry.get("id"), entry.get("created"), entry.get("owned_by"), entry.get("display_name"))


def list_models(connection, auth_headers):
    document = get_json(connection, f"{connection.base_url}/models", headers=auth_headers)
    return usable_models(connection, model_entries(document, "data"), entry_model)


def auth_headers(target):
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    if target.type == "rits":
        headers["RITS_API_KEY"] = target.api_key
    return headers


def post(target, path, body, deadline):
    return open_response(
        target,
        "POST",
        f"{target.base_url}{path}",
        deadline,
        headers=auth_headers(target),
        json_body={**body, "model": target.upstream_model},
    )


def chat(target, body, deadline):
    return checked_completion(read_json(post(target, "/chat/completions", body, deadline), target), target)


def open_chat_stream(target, body, deadline):
    """The accepted stream's chunks, as a generator that closes the upstream call when closed.

    Usage is always asked for, so that every call's tokens are known; the gateway leaves the
    usage chunk out when the client did not ask for it.
    """
    body = {**body, "stream": True, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
    response = post(target, "/chat/completions", body, deadline)

    def chunks():
        with closing(response):
            yield from json_events(response, target)

    return started(chunks(), target)


def embed(target, body, deadline):
    """Embeddings as floats: the gateway encodes base64 itself, which not every upstream can."""
    body = {name: value for name, value in body.items() if name != "encoding_format"}
    return checked_embeddings(read_json(post(target, "/embeddings", body, deadline), target), target)
