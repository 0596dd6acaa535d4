"""The model provider resource: /api/v1/model_providers."""

import logging

from apifairy import arguments, authenticate, body, other_responses, response
from flask import Blueprint, current_app, url_for
from werkzeug.exceptions import Forbidden
from werkzeug.http import quote_etag

from access.auth import auth, user_roles
from catalog.index import (
    indexed_models,
    match_models,
    providers_serving,
    refresh_models,
)
from catalog.providers import (
    check_provider,
    create_provider,
    delete_provider,
    etag_of,
    provider_or_404,
    update_provider,
)
from models import (
    db,
    types_with,
)
from observability import audit
from schemas import (
    CreatedProviderHeadersSchema,
    MatchRequestSchema,
    MatchResultSchema,
    ModelsPageSchema,
    ModelsQuerySchema,
    PreconditionsSchema,
    ProviderChangesSchema,
    ProviderCreateSchema,
    ProviderHeadersSchema,
    ProviderSchema,
    ProvidersQuerySchema,
    ResolvedProviderSchema,
    ResolveHeadersSchema,
    ResolveRequestSchema,
    VerifyQuerySchema,
    collection,
)
from storage.providers import (
    providers_page,
)

log = logging.getLogger(__name__)
providers_bp = Blueprint("providers", __name__)


def shown(provider, status=200, **headers):
    """An answer showing one provider: the provider, with its ETag."""
    return provider, status, {"ETag": quote_etag(etag_of(provider)), **headers}


def should_verify(query):
    return query["verify"] and current_app.config["VERIFY_ON_CREATE"]


def provider_filter_values(query):
    """The list's filters: the capability stands for the types that have it."""
    values = {field: query[field] for field in ("type", "state", "registry") if field in query}
    if "capability" in query:
        values["capability"] = types_with(query["capability"])
    return values


@providers_bp.route("/model_providers", methods=["POST"])
@authenticate(auth, role="admin")
@body(ProviderCreateSchema)
@arguments(VerifyQuerySchema)
@response(ProviderSchema, 201, headers=CreatedProviderHeadersSchema)
@other_responses({400: "Upstream verification failed", 409: "base_url is already registered"})
def create(fields, query):
    """Create a model provider

    Unless `verify=false` (or REGISTRY_VERIFY_ON_CREATE=false), the upstream's models are
    listed with the given key first; a failure is a 400 saying why, and nothing is stored.
    """
    provider = create_provider(fields, should_verify(query))
    return shown(provider, 201, Location=url_for("providers.get", provider_id=provider.id))


@providers_bp.route("/model_providers", methods=["GET"])
@authenticate(auth, role="reader")
@arguments(ProvidersQuerySchema)
@response(collection(ProviderSchema, paged=True))
def list_all(query):
    """List model providers, newest first"""
    return providers_page(provider_filter_values(query), query["limit"], query.get("page_token"))


@providers_bp.route("/model_providers/<provider_id>", methods=["GET"])
@authenticate(auth, role="reader")
@response(ProviderSchema, headers=ProviderHeadersSchema)
@other_responses({404: "No such model provider"})
def get(provider_id):
    """Get a model provider"""
    return shown(provider_or_404(provider_id))


@providers_bp.route("/model_providers/<provider_id>", methods=["PATCH"])
@authenticate(auth, role="admin")
@body(ProviderChangesSchema)
@arguments(VerifyQuerySchema)
@arguments(PreconditionsSchema, location="headers")
@response(ProviderSchema, headers=ProviderHeadersSchema)
@other_responses(
    {
        400: "Upstream verification failed",
        404: "No such model provider",
        409: "base_url taken, the provider is managed by a manifest, or it changed while this patch was made",
        412: "If-Match names no current ETag of the provider",
    }
)
def update(changes, query, preconditions, provider_id):
    """Update a model provider

    A change of `base_url` or `api_key` is verified against the upstream first, as on create.
    The patch is stored only if no other change of the provider was stored since it was read
    for this patch, else 409; with If-Match, only if the provider still has one of its ETags.
    """
    provider = provider_or_404(provider_id)
    return shown(update_provider(provider, changes, preconditions, should_verify(query)))


@providers_bp.route("/model_providers/<provider_id>", methods=["DELETE"])
@authenticate(auth, role="admin")
@arguments(PreconditionsSchema, location="headers")
@other_responses(
    {
        404: "No such model provider",
        409: "The provider is managed by a manifest",
        412: "If-Match names no current ETag of the provider",
    }
)
def delete(preconditions, provider_id):
    """Delete a model provider

    With If-Match, only if the provider still has one of the ETags given.
    """
    delete_provider(provider_or_404(provider_id), preconditions)
    return "", 204


def refuse_unless_admin(what):
    if "admin" not in user_roles(auth.current_user()):
        raise Forbidden(f"Only an admin may {what}.")


@providers_bp.route("/model_providers/<provider_id>/models", methods=["GET"])
@authenticate(auth, role="reader")
@arguments(ModelsQuerySchema)
@response(ModelsPageSchema)
@other_responses(
    {
        403: "refresh=true asked by a role below admin",
        404: "No such model provider",
        409: "The provider changed while its upstream was listed (refresh=true)",
        502: "The upstream failed (refresh=true)",
    }
)
def list_models(query, provider_id):
    """List the models a provider serves, from the model index

    The index holds what the provider's upstream listed last: at verification, at each
    health probe and at `check`. A provider created or changed without verification has
    no list (`listed_at` null) until its next probe. A failed listing keeps the last list,
    which is shown whatever the provider's state. `refresh=true` (admin) lists the upstream
    now and stores its answer first; an upstream failure is then a 502 saying why.
    """
    if query["refresh"]:
        refuse_unless_admin("list a provider's upstream now (refresh=true)")
        refresh_models(provider_or_404(provider_id))
    return indexed_models(provider_or_404(provider_id))


@providers_bp.route("/model_providers/<provider_id>/check", methods=["POST"])
@authenticate(auth, role="admin")
@response(ProviderSchema, headers=ProviderHeadersSchema)
@other_responses({404: "No such model provider"})
def check(provider_id):
    """Probe a provider now and return it with its fresh state

    Like a health probe, a successful one also stores the provider's model list.
    """
    return shown(check_provider(provider_or_404(provider_id)))


@providers_bp.route("/model_providers/match", methods=["POST"])
@authenticate(auth, role="reader")
@body(MatchRequestSchema)
@response(collection(MatchResultSchema))
def match(request_fields):
    """Rank the available models of a capability against suggested models

    Candidates are the models of online providers with the capability. The configured
    default model of the capability scores 0.5; a candidate scores 0.5 + r/2 when r, its
    best difflib SequenceMatcher ratio against the suggested models (case-blind; a
    suggestion without a "type:" prefix is compared with the upstream model id), is above
    `score_cutoff`. Results score at least 0.5, best first, then by id.
    """
    return match_models(
        request_fields["capability"], request_fields["suggested_models"], request_fields["score_cutoff"]
    )


@providers_bp.route("/model_providers/resolve", methods=["POST"])
@authenticate(auth, role="service")
@body(ResolveRequestSchema)
@response(ResolvedProviderSchema, headers=ResolveHeadersSchema)
@other_responses({404: "No provider serves the model", 503: "Every provider of the model is offline"})
def resolve(request_fields):
    """Connection details, API key included, of the provider serving a model

    The oldest online provider of the model's type whose model index lists it.
    """
    model_ref = request_fields["model"]
    provider = providers_serving(model_ref)[0]
    log.info("resolve by user %s: provider %s, model %s", auth.current_user().username, provider.id, model_ref)
    audit.record("provider.resolve", provider.id, detail=f"model {model_ref}")
    db.session.commit()
    resolved = {
        "provider_id": provider.id,
        "type": provider.type,
        "base_url": provider.base_url,
        "model": model_ref.upstream_id,
        "api_key": provider.open_api_key(),
        "watsonx_project_id": provider.watsonx_project_id,
        "watsonx_space_id": provider.watsonx_space_id,
    }
    return resolved, {"Cache-Control": "no-store", "Pragma": "no-cache"}
