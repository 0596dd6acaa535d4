"""Model providers: created verified against their upstream, patched only as read, deleted
unless a manifest manages them; every change audited in the transaction that makes it."""

from functools import partial

import sqlalchemy as sa
from marshmallow import ValidationError
from werkzeug.exceptions import Conflict, NotFound, PreconditionFailed
from werkzeug.http import parse_etags

from access.crypto import cipher
from catalog.index import replace_models, upstream_target, verify_upstream
from jobs.prober import probe_one
from models import changed_field_names, db, is_canonical_id, provider_etag
from observability import audit
from schemas import watsonx_id_errors
from storage.connections import no_connection
from storage.providers import edit_provider, insert_provider, owner_of_base_url, provider_by_id, remove_provider


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


def check_provider(provider):
    """Probe the provider now, as the prober would (a success stores its model list too), and
    audit it; the provider with its fresh state."""
    probe_one(provider.id)
    checked = provider_or_404(provider.id)
    audit.record("provider.check", checked.id, PROBED_FIELDS, detail=f"now {checked.state}")
    db.session.commit()
    return checked
