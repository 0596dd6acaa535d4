"""System configuration: the default LLM and embedding models."""

from apifairy import authenticate, body, response
from flask import Blueprint

from access.auth import auth
from catalog.configuration import replace_system_configuration, system_configuration
from schemas import SystemConfigurationChangesSchema, SystemConfigurationSchema

configurations_bp = Blueprint("configurations", __name__)


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
