"""OpenAI-compatible upstreams (openai, ollama, rits and the rest): `GET {base_url}/models`."""

from upstreams import get_json, model_entries, upstream_model, usable_models


def entry_model(entry):
    return upstream_model(entry.get("id"), entry.get("created"), entry.get("owned_by"), entry.get("display_name"))


def list_models(connection, auth_headers):
    document = get_json(connection, f"{connection.base_url}/models", headers=auth_headers)
    return usable_models(connection, model_entries(document, "data"), entry_model)
