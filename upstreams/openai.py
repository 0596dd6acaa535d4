"""OpenAI-compatible upstreams (openai, ollama, rits and the rest): `GET {base_url}/models`."""

from upstreams import UpstreamModel, get_json, model_entries, unix_seconds


def list_models(connection, auth_headers):
    document = get_json(connection, f"{connection.base_url}/models", headers=auth_headers)
    return [
        UpstreamModel(
            id=str(entry["id"]),
            created=unix_seconds(entry.get("created")),
            owned_by=str(entry.get("owned_by") or ""),
            display_name=entry.get("display_name"),
        )
        for entry in model_entries(document, "data")
    ]
