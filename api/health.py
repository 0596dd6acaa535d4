"""Liveness and readiness, for load balancers and orchestrators (no authentication)."""

import sqlalchemy as sa
from apifairy import other_responses, response
from flask import Blueprint, current_app
from werkzeug.exceptions import ServiceUnavailable

from api.errors import DATABASE_RETRY_SECONDS
from models import db
from schemas import StatusSchema
from storage.configuration import schema_revision

health_bp = Blueprint("health", __name__)


def schema_revision_or_503():
    try:
        return schema_revision()
    except sa.exc.SQLAlchemyError:
        db.session.rollback()
        raise ServiceUnavailable(
            "The database does not answer, or its schema has not been created.", retry_after=DATABASE_RETRY_SECONDS
        ) from None


@health_bp.route("/healthz")
@response(StatusSchema)
def healthz():
    """Liveness: the process serves"""
    return {"status": "ok"}


@health_bp.route("/readyz")
@response(StatusSchema)
@other_responses({503: "The database does not answer or its schema is not current"})
def readyz():
    """Readiness: the database answers and its schema is current"""
    revision, head = schema_revision_or_503(), current_app.config["SCHEMA_HEAD"]
    if revision != head:
        raise ServiceUnavailable(f"The database schema is at {revision}, not {head}: run the migrations.")
    return {"status": "ready"}
