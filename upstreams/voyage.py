"""Voyage AI: no model listing, a fixed catalogue (any answer from the host is the check);
embeddings are OpenAI-compatible."""

from upstreams.listing import UpstreamModel, send
from upstreams.openai import OpenAICompatible

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


class Voyage(OpenAICompatible):
    name = "Voyage"

    def list_models(self, target, observe):
        send(target, target.base_url, observe)  # any answer is the check
        return [UpstreamModel(id=model_id, owned_by="voyage") for model_id in VOYAGE_MODELS]
