"""Anthropic: `GET {base_url}/models` with `x-api-key`, following its pages.

Its chat goes, for now, through Anthropic's OpenAI-compatible endpoint; a native Messages
adapter replaces the inherited calls here.
"""

from upstreams.errors import UpstreamFailure
from upstreams.listing import get_json, model_entries, upstream_model, usable_models
from upstreams.openai import OpenAICompatible
from upstreams.wire import WireFormat

ANTHROPIC_VERSION = "2023-06-01"
MAX_PAGES = 20


def entry_model(entry):
    return upstream_model(entry.get("id"), entry.get("created_at"), "anthropic", entry.get("display_name"))


class Anthropic(OpenAICompatible):
    name = "Anthropic"
    embed = WireFormat.embed  # Anthropic has no embeddings

    def list_models(self, target, observe):
        headers = {"x-api-key": target.api_key, "anthropic-version": ANTHROPIC_VERSION}
        entries, params = [], {"limit": 1000}
        for _ in range(MAX_PAGES):
            document = get_json(target, f"{target.base_url}/models", observe, headers=headers, params=params)
            entries += model_entries(document, "data")
            last_id = document.get("last_id")
            if not document.get("has_more") or not last_id:
                break
            if not isinstance(last_id, str):
                raise UpstreamFailure("unexpected response from the upstream: a last_id that is not a string")
            params = {"limit": 1000, "after_id": last_id}
        return usable_models(target, entries, entry_model)
