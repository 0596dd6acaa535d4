"""System configuration: the default LLM and embedding models."""

from apifairy import authenticate, body, response
from flask import Blueprint

import audit
from auth import auth
from catalog import system_configuration
from models import db
from schemas import SystemConfigurationChangesSchema, SystemConfigurationSchema

configurations_bp = Blueprint("configurations", __name__)


@configurations_bp.route("/configurations/system", methods=["GET"])
@authenticate(auth, role="reader")
@response(SystemConfigurationSchema)
def get_system():
    """Get the system configuration"""
    return system_configuration()


@configurations_bp.route("/configurations/system", methods=["PUT"])
@authenticate(auth, role="admin")
@body(SystemConfigurationChangesSchema)
@response(SystemConfigurationSchema)
def put_system(changes):
    """Replace the default models (a field that is null or absent clears it)"""
    configuration = system_configuration()
    for field, value in changes.items():
        setattr(configuration, field, value)
    configuration.created_by = auth.current_user().username
    audit.record("configuration.update", configuration.id, changes)
    db.session.commit()
    return configuration
