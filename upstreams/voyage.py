"""Voyage AI: no model listing, a fixed catalogue; any answer from the host is the check."""

from upstreams import UpstreamModel, send

VOYAGE_MODELS = (
    "voyage-3.5",
    "voyage-3.5-lite",
    "voyage-3-large",
    "voyage-code-3",
    "voyage-finance-2",
    "voyage-law-2",
    "voyage-multilingual-2",
    "voyage-context-3",
)


def list_models(connection):
    send(connection, connection.base_url)  # any answer is the check
    return [UpstreamModel(id=model_id, owned_by="voyage") for model_id in VOYAGE_MODELS]
