"""The model index: each provider's model list in the database, and what is answered from it.

Verification, probes, `check` and refresh write a provider's list (replace_models); a
provider's models, the OpenAI-style list, match, resolve and routing (providers_serving)
only read it, so none of them waits on an upstream however many are slow or dead.
"""

from difflib import SequenceMatcher

import sqlalchemy as sa
from flask import current_app
from werkzeug.exceptions import BadRequest, Conflict, NotFound, ServiceUnavailable

from api.configurations import system_configuration
from models import (
    CAPABILITIES_BY_TYPE,
    PROVIDER_MODELS,
    PROVIDER_ROWS,
    PROVIDERS,
    ModelRef,
    db,
    is_indexable_model_id,
    providers_of,
    read_connection,
    release_connections,
    types_with,
    utcnow,
)
from observability import audit
from observability.metrics import observe_upstream_call
from serving.hub import off_the_hub
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
    db.session.flush()  # the provider's own pending write first: its models refer to it
    stamp = (
        sa.update(PROVIDERS)
        .where(PROVIDERS.c.id == provider_id)
        .values(models_listed_at=None if upstream_models is None else utcnow(), updated_at=PROVIDERS.c.updated_at)
    )
    if read_version is not None:
        stamp = stamp.where(PROVIDERS.c.version == read_version)
    if db.session.execute(stamp).rowcount == 0:
        return False
    db.session.execute(sa.delete(PROVIDER_MODELS).where(PROVIDER_MODELS.c.provider_id == provider_id))
    rows = index_rows(provider_id, upstream_models or [])
    if rows:
        db.session.execute(sa.insert(PROVIDER_MODELS), rows)
    return True


def refresh_models(provider):
    """List the provider's upstream now and store the list; UpstreamError (a 502) when it fails.

    No database connection is held while the upstream is asked.
    """
    target, read_version = provider_target(provider), provider.version
    release_connections()
    upstream_models = list_upstream_models(target)
    if not replace_models(provider.id, upstream_models, read_version=read_version):
        db.session.rollback()
        raise Conflict(f"Model provider {provider.id} was changed or deleted while its upstream was listed.")
    audit.record("provider.refresh", provider.id, ["models"], detail=f"{len(upstream_models)} models listed")
    db.session.commit()


INDEXED_MODEL_COLUMNS = (
    PROVIDER_MODELS.c.upstream_id,
    PROVIDER_MODELS.c.created,
    PROVIDER_MODELS.c.owned_by,
    PROVIDER_MODELS.c.display_name,
    PROVIDERS.c.id.label("provider_id"),
    PROVIDERS.c.type,
)
INDEXED_MODELS = sa.select(*INDEXED_MODEL_COLUMNS).join_from(PROVIDER_MODELS, PROVIDERS)
MODELS_OF_PROVIDER = INDEXED_MODELS.where(PROVIDER_MODELS.c.provider_id == sa.bindparam("provider_id")).order_by(
    PROVIDER_MODELS.c.position
)
# Oldest provider first, so a model served by several is shown with the one routing tries first.
ONLINE_MODELS = INDEXED_MODELS.where(PROVIDERS.c.state == "online").order_by(
    PROVIDERS.c.created_at, PROVIDERS.c.id, PROVIDER_MODELS.c.position
)
ONLINE_MODELS_OF_TYPES = ONLINE_MODELS.where(PROVIDERS.c.type.in_(sa.bindparam("types", expanding=True)))
ONLINE_MODEL_REFS_OF_TYPES = (
    sa.select(PROVIDERS.c.type, PROVIDER_MODELS.c.upstream_id)
    .join_from(PROVIDER_MODELS, PROVIDERS)
    .where(PROVIDERS.c.state == "online", PROVIDERS.c.type.in_(sa.bindparam("types", expanding=True)))
    .distinct()
)


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
    rows = read_connection().execute(MODELS_OF_PROVIDER, {"provider_id": provider.id}).mappings()
    models = [model_document(row) for row in rows]
    return {"items": models, "total_count": len(models), "listed_at": provider.models_listed_at}


def available_models(capability=None):
    """Models of every online provider (with the capability), each model id once."""
    if capability is None:
        rows = read_connection().execute(ONLINE_MODELS)
    else:
        rows = read_connection().execute(ONLINE_MODELS_OF_TYPES, {"types": types_with(capability)})
    documents = {}
    for row in rows.mappings():
        model_ref = (row["type"], row["upstream_id"])
        if model_ref not in documents:
            documents[model_ref] = model_document(row)
    return list(documents.values())


def available_model_refs(capability):
    rows = read_connection().execute(ONLINE_MODEL_REFS_OF_TYPES, {"types": types_with(capability)})
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


PROVIDERS_LISTING = (
    PROVIDER_ROWS.join_from(PROVIDERS, PROVIDER_MODELS)
    .where(PROVIDERS.c.type == sa.bindparam("type"), PROVIDER_MODELS.c.upstream_id == sa.bindparam("upstream_id"))
    .order_by(PROVIDERS.c.created_at, PROVIDERS.c.id)
)


def providers_serving(model_ref):
    """The online providers of the model's type whose indexed list has its upstream id,
    oldest first: where resolve and the gateway send a call for `model_ref` (a ModelRef).

    NotFound when no provider of the type lists the model; ServiceUnavailable when every
    one that lists it is offline. The providers are Provider rows (keys open with
    `open_api_key()`); call models.release_connections() before calling an upstream.
    """
    providers = providers_of(read_connection().execute(PROVIDERS_LISTING, model_ref.__dict__))
    if not providers:
        raise NotFound(f"No model provider serves the model {model_ref}.")
    online = [provider for provider in providers if provider.state == "online"]
    if not online:
        raise ServiceUnavailable(f"Every provider of the model {model_ref} is offline; try again when one answers.")
    return online
