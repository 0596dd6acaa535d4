"""The model provider resource: /api/v1/model_providers."""

import sqlalchemy as sa
from apifairy import arguments, authenticate, other_responses, response
from flask import Blueprint, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import Conflict, NotFound

from auth import auth
from models import CAPABILITIES_BY_TYPE, ModelProvider, db
from pagination import newest_first_page
from schemas import (
    LocationHeaderSchema,
    ProviderChangesSchema,
    ProviderCreateSchema,
    ProviderSchema,
    ProvidersPageSchema,
    ProvidersQuerySchema,
    json_body,
    watsonx_id_errors,
)

providers_bp = Blueprint("providers", __name__)
provider_schema = ProviderSchema()


def no_such_provider(provider_id):
    return NotFound(f"No model provider has id {provider_id!r}.")


def get_provider_or_404(provider_id):
    provider = db.session.get(ModelProvider, provider_id)
    if provider is None:
        raise no_such_provider(provider_id)
    return provider


def refuse_if_base_url_taken(base_url, own_id=None):
    owner_id = db.session.scalar(sa.select(ModelProvider.id).where(ModelProvider.base_url == base_url))
    if owner_id is not None and owner_id != own_id:
        raise Conflict(f"base_url {base_url} is already registered by model provider {owner_id}.")


def refuse_if_managed(provider):
    if provider.manifest is not None:
        raise Conflict(
            f"Model provider {provider.id} is managed by the registry manifest {provider.manifest}; change it there."
        )


def commit_unique_base_url(provider):
    """Commit; a concurrent writer that took the same base_url first turns into a 409."""
    base_url, provider_id = provider.base_url, provider.id
    try:
        db.session.commit()
    except sa.exc.IntegrityError:
        db.session.rollback()
        refuse_if_base_url_taken(base_url, provider_id)
        raise


def create_provider(fields):
    refuse_if_base_url_taken(fields["base_url"])
    api_key = fields.pop("api_key")
    provider = ModelProvider(**fields)
    provider.seal_api_key(api_key)
    db.session.add(provider)
    commit_unique_base_url(provider)
    return provider


def update_provider(provider, changes):
    refuse_if_managed(provider)
    merged = {
        field: changes.get(field, getattr(provider, field)) for field in ("watsonx_project_id", "watsonx_space_id")
    }
    errors = watsonx_id_errors(provider.type, merged["watsonx_project_id"], merged["watsonx_space_id"])
    if errors:
        raise ValidationError(errors)
    if "base_url" in changes:
        refuse_if_base_url_taken(changes["base_url"], provider.id)
    if "api_key" in changes:
        provider.seal_api_key(changes.pop("api_key"))
    for field, value in changes.items():
        setattr(provider, field, value)
    commit_unique_base_url(provider)
    return provider


def provider_filters(query):
    filters = [getattr(ModelProvider, field) == query[field] for field in ("type", "state") if field in query]
    if "registry" in query:
        filters.append(ModelProvider.manifest == query["registry"])
    if "capability" in query:
        types = [type_ for type_, capabilities in CAPABILITIES_BY_TYPE.items() if query["capability"] in capabilities]
        filters.append(ModelProvider.type.in_(types))
    return filters


@providers_bp.route("/model_providers", methods=["POST"])
@authenticate(auth, role="admin")
@json_body(ProviderCreateSchema)
@response(ProviderSchema, 201, headers=LocationHeaderSchema)
@other_responses({409: "base_url is already registered"})
def create(fields):
    """Create a model provider"""
    provider = create_provider(fields)
    return provider, 201, {"Location": url_for("providers.get", provider_id=provider.id)}


@providers_bp.route("/model_providers", methods=["GET"])
@authenticate(auth, role="reader")
@arguments(ProvidersQuerySchema)
@response(ProvidersPageSchema)
def list_all(query):
    """List model providers, newest first"""
    return newest_first_page(ModelProvider, provider_filters(query), query["limit"], query.get("page_token"))


@providers_bp.route("/model_providers/<provider_id>", methods=["GET"])
@authenticate(auth, role="reader")
@response(ProviderSchema)
@other_responses({404: "No such model provider"})
def get(provider_id):
    """Get a model provider"""
    return get_provider_or_404(provider_id)


@providers_bp.route("/model_providers/<provider_id>", methods=["PATCH"])
@authenticate(auth, role="admin")
@json_body(ProviderChangesSchema)
@response(ProviderSchema)
@other_responses({404: "No such model provider", 409: "base_url taken, or the provider is managed by a manifest"})
def update(changes, provider_id):
    """Update a model provider"""
    return update_provider(get_provider_or_404(provider_id), changes)


@providers_bp.route("/model_providers/<provider_id>", methods=["DELETE"])
@authenticate(auth, role="admin")
@other_responses({404: "No such model provider", 409: "The provider is managed by a manifest"})
def delete(provider_id):
    """Delete a model provider"""
    refuse_if_managed(get_provider_or_404(provider_id))
    deleted = db.session.execute(sa.delete(ModelProvider).where(ModelProvider.id == provider_id))
    db.session.commit()
    if deleted.rowcount == 0:  # a concurrent request deleted it first
        raise no_such_provider(provider_id)
    return "", 204
