"""The model provider resource: /api/v1/model_providers."""

import logging
from functools import partial

import sqlalchemy as sa
from apifairy import arguments, authenticate, body, other_responses, response
from flask import Blueprint, current_app, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import Conflict, Forbidden, NotFound, PreconditionFailed
from werkzeug.http import parse_etags, quote_etag

from access.auth import auth, user_roles
from access.crypto import cipher
from catalog.index import (
    indexed_models,
    match_models,
    providers_serving,
    refresh_models,
    replace_models,
    upstream_target,
    verify_upstream,
)
from jobs.prober import probe_one
from models import (
    changed_field_names,
    db,
    is_canonical_id,
    provider_etag,
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
    watsonx_id_errors,
)
from storage.connections import no_connection
from storage.providers import (
    edit_provider,
    insert_provider,
    owner_of_base_url,
    provider_by_id,
    providers_page,
    remove_provider,
)

log = logging.getLogger(__name__)
providers_bp = Blueprint("providers", __name__)


def no_such_provider(provider_id):
    return NotFound(f"No model provider has id {provider_id!r}.")


def provider_or_404(provider_id):
    provider = None
    if is_canonical_id(provider_id):
        provider = provider_by_id(provider_id)
    if provider is None:
        raise no_such_provider(provider_id)
    return provider


def provider_exists(provider_id):
    return provider_by_id(provider_id) is not None


ETAG_FIELDS = ("id", "version", "last_checked_at")


def etag_of(provider):
    return provider_etag(*(getattr(provider, field) for field in ETAG_FIELDS))


def shown(provider, status=200, **headers):
    """An answer showing one provider: the provider, with its ETag."""
    return provider, status, {"ETag": quote_etag(etag_of(provider)), **headers}


def refuse_unless_matches(provider, preconditions):
    """If-Match: change the provider only as the client last read it ("*": as long as it exists)."""
    if_match = preconditions.get("if_match")
    if if_match is not None and not parse_etags(if_match).contains(etag_of(provider)):
        raise PreconditionFailed(
            f"Model provider {provider.id} has changed since the ETag given in If-Match; read it again."
        )


def refuse_if_base_url_taken(base_url, own_id=None):
    owner_id = owner_of_base_url(base_url)
    if owner_id is not None and owner_id != own_id:
        raise Conflict(f"base_url {base_url} is already registered by model provider {owner_id}.")


def refuse_if_managed(provider):
    if provider.manifest is not None:
        raise Conflict(
            f"Model provider {provider.id} is managed by the registry manifest {provider.manifest}; change it there."
        )


KEEP_MODELS = object()
# What a probe writes (prober.py), as a check's audit event names it.
PROBED_FIELDS = ("state", "last_checked_at", "last_error", "models")


def write_provider(write, base_url, action, changed_fields, own_id=None, upstream_models=KEEP_MODELS):
    """Run `write` (storage.providers' insert_provider or edit_provider, its values bound), audit it as
    `action` and commit; the provider as written (None when an UPDATE found none to change). A
    concurrent writer that took the same base_url first is a 409. `upstream_models`, unless
    KEEP_MODELS, is stored in the model index in the same transaction (None: no list, for a
    connection not verified)."""
    try:
        provider = write()
        if provider is not None:
            audit.record(action, provider.id, changed_fields)
            if upstream_models is not KEEP_MODELS:
                replace_models(provider.id, upstream_models)
        db.session.commit()
    except sa.exc.IntegrityError:
        db.session.rollback()
        refuse_if_base_url_taken(base_url, own_id)
        raise
    return provider


def should_verify(query):
    return query["verify"] and current_app.config["VERIFY_ON_CREATE"]


@no_connection()
def verify_holding_no_connection(connection):
    """verify_upstream, with no transaction open and no pooled connection held while it waits."""
    return verify_upstream(connection)


def create_provider(fields, verify):
    api_key = fields.pop("api_key")
    upstream_models = KEEP_MODELS  # unverified, a new provider has no model list until it is probed
    if verify:
        refuse_if_base_url_taken(fields["base_url"])  # before calling the upstream; the insert checks anyway
        upstream_models = verify_holding_no_connection(upstream_target(fields["type"], fields["base_url"], api_key))
    values = {**fields, "sealed_api_key": cipher.seal(api_key)}
    return write_provider(
        partial(insert_provider, values),
        fields["base_url"],
        "provider.create",
        changed_field_names(values),
        upstream_models=upstream_models,
    )


def changes_connection(values):
    """Whether the stored changes (stored_changes) touch how the upstream is reached."""
    return "base_url" in values or "sealed_api_key" in values


def verify_changed_connection(provider, changes):
    """The models the changed connection lists, or a 400 when it fails."""
    api_key = changes["api_key"] if "api_key" in changes else provider.open_api_key()
    return verify_holding_no_connection(
        upstream_target(provider.type, changes.get("base_url", provider.base_url), api_key)
    )


def stored_changes(provider, changes):
    """The column values a PATCH writes: the fields whose value changes, and a new key sealed."""
    values = {
        field: value for field, value in changes.items() if field != "api_key" and getattr(provider, field) != value
    }
    if "api_key" in changes:
        values["sealed_api_key"] = cipher.seal(changes["api_key"])
    return values


def store_changes(provider, values, upstream_models):
    """Write a patch of the provider as read: a change stored meanwhile makes it a 409 (or a
    404 when deleted), never a mix of both."""
    base_url, changed_fields = values.get("base_url"), changed_field_names(values)
    edit = partial(edit_provider, provider.id, provider.version, values)
    updated = write_provider(edit, base_url, "provider.update", changed_fields, provider.id, upstream_models)
    if updated is None:
        if not provider_exists(provider.id):
            raise no_such_provider(provider.id)
        raise Conflict(
            f"Model provider {provider.id} was changed by another request meanwhile; read it again and retry."
        )
    return updated


def update_provider(provider, changes, preconditions, verify):
    refuse_if_managed(provider)
    refuse_unless_matches(provider, preconditions)
    merged = {
        field: changes.get(field, getattr(provider, field)) for field in ("watsonx_project_id", "watsonx_space_id")
    }
    errors = watsonx_id_errors(provider.type, merged["watsonx_project_id"], merged["watsonx_space_id"])
    if errors:
        raise ValidationError(errors)
    values = stored_changes(provider, changes)  # a field sent with its current value changes nothing
    if not values:
        return provider
    if "base_url" in values:
        refuse_if_base_url_taken(values["base_url"], provider.id)
    upstream_models = KEEP_MODELS
    if changes_connection(values):  # unverified (None), the new connection has no list until it is probed
        upstream_models = verify_changed_connection(provider, changes) if verify else None
    return store_changes(provider, values, upstream_models)


def delete_provider(provider, preconditions):
    refuse_if_managed(provider)
    refuse_unless_matches(provider, preconditions)
    matched_version = provider.version if preconditions.get("if_match") is not None else None
    if remove_provider(provider.id, read_version=matched_version):  # only the provider as matched
        audit.record("provider.delete", provider.id)
        db.session.commit()
        return
    db.session.rollback()  # a concurrent request deleted it first, or changed it since it was matched
    if provider_exists(provider.id):
        raise PreconditionFailed(f"Model provider {provider.id} was changed by another request meanwhile.")
    raise no_such_provider(provider.id)


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
    probe_one(provider_or_404(provider_id).id)
    provider = provider_or_404(provider_id)
    audit.record("provider.check", provider.id, PROBED_FIELDS, detail=f"now {provider.state}")
    db.session.commit()
    return shown(provider)


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
