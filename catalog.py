"""What the providers serve: model listings (cached), the OpenAI-style list, match and resolve."""

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from difflib import SequenceMatcher

from flask import current_app
from werkzeug.exceptions import BadRequest, NotFound, ServiceUnavailable

from configurations import system_configuration
from models import PROVIDER_ROWS, PROVIDERS, providers_of, read_connection, types_with
from pagination import collection_of
from upstreams import Connection, UpstreamError, list_models

log = logging.getLogger(__name__)

# Upstream listings run in these threads, so ten slow upstreams cost about one's time.
upstream_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="upstream")


class ModelsCache:
    """Each provider's model list, reused for MODELS_CACHE_TTL seconds.

    Keyed by everything that decides what the upstream answers (URL, sealed key, ids), read
    fresh from the database on every request, so a change made through any instance misses
    the cache at once and the entry of the old connection simply ages out.
    """

    def __init__(self):
        self._entries = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key, upstream_models, ttl):
        now = time.monotonic()
        with self._lock:
            self._entries = {key: entry for key, entry in self._entries.items() if entry[0] >= now}
            self._entries[key] = (now + ttl, upstream_models)


models_cache = ModelsCache()


def cache_key(provider):
    return (
        provider.id,
        provider.base_url,
        provider.sealed_api_key,
        provider.watsonx_project_id,
        provider.watsonx_space_id,
    )


def connection_of(provider_type, base_url, api_key):
    return Connection(provider_type, base_url, api_key, current_app.config["UPSTREAM_TIMEOUT"])


def provider_connection(provider):
    return connection_of(provider.type, provider.base_url, provider.open_api_key())


def remember_models(provider, upstream_models):
    models_cache.put(cache_key(provider), upstream_models, current_app.config["MODELS_CACHE_TTL"])


def verify_upstream(connection):
    """List the upstream's models with the given key, or refuse the request with a 400."""
    try:
        return list_models(connection)
    except UpstreamError as error:
        raise BadRequest(f"Upstream verification failed: {error}.") from None


def list_or_error(connection):
    try:
        return list_models(connection), None
    except UpstreamError as error:
        return None, error


def models_of_providers(providers):
    """[(provider, upstream models or None, error or None)], asking the uncached upstreams at once."""
    cached = {provider.id: models_cache.get(cache_key(provider)) for provider in providers}
    missing = [provider for provider in providers if cached[provider.id] is None]
    fetched = upstream_pool.map(list_or_error, [provider_connection(provider) for provider in missing])
    outcomes = {
        provider_id: (upstream_models, None)
        for provider_id, upstream_models in cached.items()
        if upstream_models is not None
    }
    for provider, (upstream_models, error) in zip(missing, fetched, strict=True):
        outcomes[provider.id] = (upstream_models, error)
        if error is None:
            remember_models(provider, upstream_models)
    return [(provider, *outcomes[provider.id]) for provider in providers]


def model_document(provider, upstream_model):
    return {
        "id": f"{provider.type}:{upstream_model.id}",
        "object": "model",
        "created": upstream_model.created,
        "owned_by": upstream_model.owned_by,
        "display_name": upstream_model.display_name,
        "provider": {"id": provider.id, "type": provider.type, "capabilities": provider.capabilities},
    }


def provider_models(provider):
    """One provider's models; an upstream failure is a 502."""
    [(provider, upstream_models, error)] = models_of_providers([provider])
    if error is not None:
        raise error
    return [model_document(provider, upstream_model) for upstream_model in upstream_models]


def online_providers(capability=None):
    query = PROVIDER_ROWS.where(PROVIDERS.c.state == "online")
    if capability is not None:
        query = query.where(PROVIDERS.c.type.in_(types_with(capability)))
    return providers_of(read_connection().execute(query.order_by(PROVIDERS.c.created_at, PROVIDERS.c.id)))


def available_models(capability=None):
    """Models of every online provider (with the capability); a failing upstream is left out."""
    documents = []
    for provider, upstream_models, error in models_of_providers(online_providers(capability)):
        if error is not None:
            log.warning("models of provider %s left out: %s", provider.id, error)
            continue
        documents += [model_document(provider, upstream_model) for upstream_model in upstream_models]
    return documents


def similarity(suggested, model_id):
    """difflib's ratio, case-blind; a suggestion without "type:" is compared with the upstream id."""
    compared = model_id if ":" in suggested else model_id.partition(":")[2]
    return SequenceMatcher(None, suggested.lower(), compared.lower()).ratio()


def match_scores(model_ids, suggested_models, score_cutoff, default_model):
    scores = {}
    for model_id in model_ids:
        best = max((similarity(suggested, model_id) for suggested in suggested_models), default=0.0)
        score = 0.5 + best / 2 if best > score_cutoff else 0.0
        if model_id == default_model:
            score = max(score, 0.5)
        if score >= 0.5:
            scores[model_id] = round(score, 2)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def match_models(capability, suggested_models, score_cutoff):
    configuration = system_configuration()
    default_model = getattr(configuration, f"default_{capability}_model")
    model_ids = {model["id"] for model in available_models(capability)}
    ranked = match_scores(model_ids, suggested_models, score_cutoff, default_model)
    return collection_of([{"model_id": model_id, "score": score} for model_id, score in ranked])


def resolve_model(model_ref):
    """The provider serving `model_ref` ("type:upstream id") and the upstream id."""
    provider_type, _, upstream_id = model_ref.partition(":")
    providers = providers_of(
        read_connection().execute(
            PROVIDER_ROWS.where(PROVIDERS.c.type == provider_type).order_by(PROVIDERS.c.created_at, PROVIDERS.c.id)
        )
    )
    online = [provider for provider in providers if provider.state == "online"]
    for provider, upstream_models, _ in models_of_providers(online):
        if upstream_models and any(upstream_model.id == upstream_id for upstream_model in upstream_models):
            return provider, upstream_id
    if len(online) < len(providers):
        raise ServiceUnavailable(f"The provider of {model_ref} is offline; try again when it answers.")
    raise NotFound(f"No online provider serves the model {model_ref}.")
