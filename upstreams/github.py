"""GitHub Models: the catalog at `{scheme}://{host}/catalog/models`."""

from urllib.parse import urlsplit

from upstreams import UpstreamModel, bearer, get_json, model_entries


def list_models(connection):
    parts = urlsplit(connection.base_url)
    catalog = get_json(
        connection, f"{parts.scheme}://{parts.netloc}/catalog/models", headers=bearer(connection.api_key)
    )
    return [
        UpstreamModel(id=str(entry["id"]), owned_by=str(entry.get("publisher") or ""), display_name=entry.get("name"))
        for entry in model_entries(catalog, None)
    ]
