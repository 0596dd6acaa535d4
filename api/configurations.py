"""System configuration: the default LLM and embedding models."""

import sqlalchemy as sa
from apifairy import authenticate, body, response
from flask import Blueprint

from access.auth import auth
from models import SystemConfiguration, db
from observability import audit
from schemas import SystemConfigurationChangesSchema, SystemConfigurationSchema
from storage.configuration import store_configuration, stored_configuration

configurations_bp = Blueprint("configurations", __name__)

# The id of the one row, so the defaults answered before the first PUT carry the id it creates.
SYSTEM_CONFIGURATION_ID = "00000000-0000-4000-8000-000000000000"


def system_configuration():
    """The stored configuration, or the defaults (not stored) before the first PUT."""
    configuration = stored_configuration()
    return configuration or SystemConfiguration(id=SYSTEM_CONFIGURATION_ID)


def replace_system_configuration(changes, username):
    configuration = system_configuration()
    values = {field: None if model_ref is None else str(model_ref) for field, model_ref in changes.items()}
    changed_fields = [field for field, value in values.items() if getattr(configuration, field) != value]
    for field, value in values.items():
        setattr(configuration, field, value)
    configuration.created_by = username
    try:
        store_configuration(configuration)  # gives a first configuration its id
        audit.record("configuration.update", configuration.id, changed_fields)
        db.session.commit()
    except sa.exc.IntegrityError:  # another PUT created the row first: change that one
        db.session.rollback()
        return replace_system_configuration(changes, username)
    return configuration


@configurations_bp.route("/configurations/system", methods=["GET"])
@authenticate(auth, role="reader")
@response(SystemConfigurationSchema)
def get_system():
    """Get the system configuration

    Before the first PUT this answers the defaults (no default models, `updated_at` null)
    and stores nothing.
    """
    return system_configuration()


@configurations_bp.route("/configurations/system", methods=["PUT"])
@authenticate(auth, role="admin")
@body(SystemConfigurationChangesSchema)
@response(SystemConfigurationSchema)
def put_system(changes):
    """Replace the default models (a field that is null or absent clears it)"""
    return replace_system_configuration(changes, auth.current_user().username)
