"""GitHub Models: the catalog at `{scheme}://{host}/catalog/models`."""

from urllib.parse import urlsplit

from upstreams import bearer, get_json, model_entries, upstream_model, usable_models


def entry_model(entry):
    return upstream_model(entry.get("id"), None, entry.get("publisher"), entry.get("name"))


def list_models(connection):
    parts = urlsplit(connection.base_url)
    catalog = get_json(
        connection, f"{parts.scheme}://{parts.netloc}/catalog/models", headers=bearer(connection.api_key)
    )
    return usable_models(connection, model_entries(catalog, None), entry_model)
