"""Anthropic: `GET {base_url}/models` with `x-api-key`, following its pages."""

from upstreams import UpstreamModel, get_json, model_entries, unix_seconds

ANTHROPIC_VERSION = "2023-06-01"
MAX_PAGES = 20


def list_models(connection):
    headers = {"x-api-key": connection.api_key, "anthropic-version": ANTHROPIC_VERSION}
    models, params = [], {"limit": 1000}
    for _ in range(MAX_PAGES):
        document = get_json(connection, f"{connection.base_url}/models", headers=headers, params=params)
        models += [
            UpstreamModel(
                id=str(entry["id"]),
                created=unix_seconds(entry.get("created_at")),
                owned_by="anthropic",
                display_name=entry.get("display_name"),
            )
            for entry in model_entries(document, "data")
        ]
        if not document.get("has_more") or not document.get("last_id"):
            break
        params = {"limit": 1000, "after_id": document["last_id"]}
    return models
