"""GitHub Models: the catalog at `{scheme}://{host}/catalog/models`; chat is OpenAI-compatible."""

from urllib.parse import urlsplit

from upstreams.listing import get_json, model_entries, upstream_model, usable_models
from upstreams.openai import OpenAICompatible


def entry_model(entry):
    return upstream_model(entry.get("id"), None, entry.get("publisher"), entry.get("name"))


class GitHub(OpenAICompatible):
    name = "GitHub Models"

    def list_models(self, target, observe):
        parts = urlsplit(target.base_url)
        url = f"{parts.scheme}://{parts.netloc}/catalog/models"
        catalog = get_json(target, url, observe, headers=self.auth_headers(target))
        return usable_models(target, model_entries(catalog, None), entry_model)
