"""The model index: each provider's model list in the database, and what is answered from it.

Verification, probes, `check` and refresh write a provider's list (replace_models); a
provider's models, the OpenAI-style list, match, resolve and routing (providers_serving)
only read it, so none of them waits on an upstream however many are slow or dead.
"""

from difflib import SequenceMatcher

from flask import current_app
from werkzeug.exceptions import BadRequest, Conflict, NotFound, ServiceUnavailable

from catalog.configuration import system_configuration
from models import (
    CAPABILITIES_BY_TYPE,
    ModelRef,
    db,
    is_indexable_model_id,
    types_with,
)
from observability import audit
from observability.metrics import observe_upstream_call
from serving.hub import off_the_hub
from storage.connections import no_connection
from storage.providers import (
    models_of_provider,
    online_model_refs,
    online_models,
    providers_listing,
    replace_model_list,
)
from upstreams import Target, UpstreamError, list_models


def upstream_target(provider_type, base_url, api_key, provider=None):
    """What an upstream call needs: the given connection, and the stored provider's id and
    watsonx ids when there is one (a new provider is verified before it is stored)."""
    config = current_app.config
    return Target(
        provider_type,
        base_url,
        api_key,
        config["UPSTREAM_TIMEOUT"],
        provider_id=provider and provider.id,
        watsonx_project_id=provider and provider.watsonx_project_id,
        watsonx_space_id=provider and provider.watsonx_space_id,
        watsonx_iam_url=config["WATSONX_IAM_URL"],
    )


def provider_target(provider):
    """The stored provider as an upstream target, its key opened (UnopenableApiKey when it cannot be)."""
    return upstream_target(provider.type, provider.base_url, provider.open_api_key(), provider)


def list_upstream_models(target):
    """The target's models, each of its HTTP calls timed in the metrics."""
    return list_models(target, observe_upstream_call)


def verify_upstream(target):
    """List the upstream's models with the given key, or refuse the request with a 400."""
    try:
        return list_upstream_models(target)
    except UpstreamError as error:
        raise BadRequest(f"Upstream verification failed: {error}.") from None


def index_rows(provider_id, upstream_models):
    """The index rows of a listing: each usable model id once, in the upstream's order."""
    rows = {}
    for upstream_model in upstream_models:
        if upstream_model.id not in rows and is_indexable_model_id(upstream_model.id):
            rows[upstream_model.id] = {
                "provider_id": provider_id,
                "upstream_id": upstream_model.id,
                "position": len(rows),
                "created": upstream_model.created,
                "owned_by": upstream_model.owned_by,
                "display_name": upstream_model.display_name,
            }
    return list(rows.values())


def replace_models(provider_id, upstream_models, read_version=None):
    """Make the index hold `upstream_models` as the provider's list, listed now, in the
    session's transaction; None leaves it no list (a connection changed without verification).

    With `read_version` (the provider's `version` when it was read before listing) the list
    is written only if the provider was neither edited nor deleted meanwhile, since it may
    list another upstream now. True when written.
    """
    rows = index_rows(provider_id, upstream_models or [])
    return replace_model_list(provider_id, rows, listed=upstream_models is not None, read_version=read_version)


def refresh_models(provider):
    """List the provider's upstream now and store the list; UpstreamError (a 502) when it fails.

    No database connection is held while the upstream is asked.
    """
    target, read_version = provider_target(provider), provider.version
    with no_connection():
        upstream_models = list_upstream_models(target)
    if not replace_models(provider.id, upstream_models, read_version=read_version):
        db.session.rollback()
        raise Conflict(f"Model provider {provider.id} was changed or deleted while its upstream was listed.")
    audit.record("provider.refresh", provider.id, ["models"], detail=f"{len(upstream_models)} models listed")
    db.session.commit()


def model_document(row):
    return {
        "id": str(ModelRef(row["type"], row["upstream_id"])),
        "object": "model",
        "created": row["created"],
        "owned_by": row["owned_by"],
        "display_name": row["display_name"],
        "provider": {
            "id": row["provider_id"],
            "type": row["type"],
            "capabilities": list(CAPABILITIES_BY_TYPE[row["type"]]),
        },
    }


def indexed_models(provider):
    """A provider's models as last listed, whatever its state, and when they were listed."""
    models = [model_document(row) for row in models_of_provider(provider.id)]
    return {"items": models, "total_count": len(models), "listed_at": provider.models_listed_at}


def available_models(capability=None):
    """Models of every online provider (with the capability), each model id once."""
    rows = online_models(None if capability is None else types_with(capability))
    documents = {}
    for row in rows:
        model_ref = (row["type"], row["upstream_id"])
        if model_ref not in documents:
            documents[model_ref] = model_document(row)
    return list(documents.values())


def available_model_refs(capability):
    rows = online_model_refs(types_with(capability))
    return [ModelRef(provider_type, upstream_id) for provider_type, upstream_id in rows]


def best_similarity(suggested_models, model_ref, floor):
    """The best difflib ratio of the model against the suggestions when it is above `floor`,
    else at most `floor`; case-blind, and a suggestion without "type:" is compared with the
    upstream id. Pairs whose cheap upper bounds cannot beat the best so far are skipped."""
    best = floor
    for suggested in suggested_models:
        compared = str(model_ref) if ":" in suggested else model_ref.upstream_id
        matcher = SequenceMatcher(None, suggested, compared.lower())
        if matcher.real_quick_ratio() > best and matcher.quick_ratio() > best:
            best = max(best, matcher.ratio())
    return best


def match_scores(model_refs, suggested_models, score_cutoff, default_model):
    suggested_models = [suggested.lower() for suggested in suggested_models]
    scores = {}
    for model_ref in model_refs:
        best = best_similarity(suggested_models, model_ref, score_cutoff)
        score = 0.5 + best / 2 if best > score_cutoff else 0.0
        if str(model_ref) == default_model:
            score = max(score, 0.5)
        if score >= 0.5:
            scores[str(model_ref)] = round(score, 2)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def match_models(capability, suggested_models, score_cutoff):
    configuration = system_configuration()
    default_model = getattr(configuration, f"default_{capability}_model")
    ranked = off_the_hub(match_scores, available_model_refs(capability), suggested_models, score_cutoff, default_model)
    return {"items": [{"model_id": model_id, "score": score} for model_id, score in ranked], "total_count": len(ranked)}


def providers_serving(model_ref):
    """The online providers of the model's type whose indexed list has its upstream id,
    oldest first: where resolve and the gateway send a call for `model_ref` (a ModelRef).

    NotFound when no provider of the type lists the model; ServiceUnavailable when every
    one that lists it is offline. The providers are Provider rows (keys open with
    `open_api_key()`); call an upstream within storage.connections.no_connection().
    """
    providers = providers_listing(model_ref.type, model_ref.upstream_id)
    if not providers:
        raise NotFound(f"No model provider serves the model {model_ref}.")
    online = [provider for provider in providers if provider.state == "online"]
    if not online:
        raise ServiceUnavailable(f"Every provider of the model {model_ref} is offline; try again when one answers.")
    return online
