"""The audit log: who changed what, and who read a key; GET /api/v1/audit for admins.

An event is stored with the change it records, or not at all. Its actor is the request's
user (and token), `cli:<operating system user>` for a command, or `system` for the
scheduler's work.
"""

import getpass
import os
from datetime import timedelta

import click
import sqlalchemy as sa
from apifairy import arguments, authenticate, response
from flask import Blueprint, has_request_context, request

from access.auth import auth
from models import AUDIT_EVENTS, AuditEvent, db, utcnow
from observability.logs import REQUEST_ID_KEY, TOKEN_ID_KEY, USER_KEY
from schemas import AuditEventSchema, AuditQuerySchema, collection
from storage.connections import DirectStatement
from storage.paging import NewestFirstPages

audit_bp = Blueprint("audit", __name__)
SYSTEM_ACTOR = "system"


def operator_name():
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this user id in the container
        return str(os.getuid())


def actor_fields(by_system=False):
    """Who is making the change now, and from where.

    The system's own work (`by_system`: the manifest sync's changes) is the CLI user's in a
    command, else `system`'s; a request that asked for it lends only its request id.
    """
    if has_request_context() and not by_system:
        environ = request.environ
        return {
            "actor": environ.get(USER_KEY) or SYSTEM_ACTOR,
            "token_id": environ.get(TOKEN_ID_KEY),
            "client_address": request.remote_addr,
            "request_id": environ.get(REQUEST_ID_KEY),
        }
    in_command = click.get_current_context(silent=True) is not None  # a flask command in this thread
    return {
        "actor": f"cli:{operator_name()}" if in_command else SYSTEM_ACTOR,
        "token_id": None,
        "client_address": None,
        "request_id": request.environ.get(REQUEST_ID_KEY) if has_request_context() else None,
    }


# Not an ORM object: the unit of work's flush at commit cost more than the change itself.
INSERT_EVENT = DirectStatement(sa.insert(AUDIT_EVENTS))


def record(action, target_id=None, changed_fields=(), detail=None, by_system=False):
    """Write an event in the session's transaction: it commits with the change it records, or not at all.

    `changed_fields` holds names (a dict's keys are its names): never a value. `by_system`:
    see actor_fields.
    """
    event = {"action": action, "target_id": target_id, "changed_fields": sorted(changed_fields), "detail": detail}
    INSERT_EVENT.write(**event, **actor_fields(by_system))


AUDIT_PAGES = NewestFirstPages(
    AUDIT_EVENTS,
    sa.select(AUDIT_EVENTS),
    {
        "action": AUDIT_EVENTS.c.action == sa.bindparam("action"),
        "user": AUDIT_EVENTS.c.actor == sa.bindparam("user"),
        "target_id": AUDIT_EVENTS.c.target_id == sa.bindparam("target_id"),
        "since": AUDIT_EVENTS.c.created_at >= sa.bindparam("since", type_=AUDIT_EVENTS.c.created_at.type),
    },
    lambda row: row,  # a Row: the schema and the page token read its attributes
)


def audit_filter_values(query):
    return {name: query[name] for name in ("action", "user", "target_id", "since") if name in query}


@audit_bp.route("/audit", methods=["GET"])
@authenticate(auth, role="admin")
@arguments(AuditQuerySchema)
@response(collection(AuditEventSchema, paged=True))
def list_events(query):
    """List audit events, newest first

    Every change through the API, the CLI and the manifest sync, and every resolve (which
    hands out a key). `user` is a user name, `cli:<operating system user>` or `system`.
    """
    return AUDIT_PAGES.page(audit_filter_values(query), query["limit"], query.get("page_token"))


def prune_old_events(app):
    """Delete the events older than REGISTRY_AUDIT_RETENTION_DAYS."""
    cutoff = utcnow() - timedelta(days=app.config["AUDIT_RETENTION_DAYS"])
    db.session.execute(sa.delete(AuditEvent).where(AuditEvent.created_at < cutoff))
    db.session.commit()
