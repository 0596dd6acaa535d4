"""The audit log: who changed what, and who read a key (read at GET /api/v1/audit, api/audit.py).

An event is stored with the change it records, or not at all. Its actor is the request's
user (and token), `cli:<operating system user>` for a command, or `system` for the
scheduler's work.
"""

import getpass
import os
from datetime import timedelta

import click
from flask import has_request_context, request

from models import db, utcnow
from observability.logs import REQUEST_ID_KEY, TOKEN_ID_KEY, USER_KEY
from storage.audit import delete_events_before, insert_event

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


def record(action, target_id=None, changed_fields=(), detail=None, by_system=False):
    """Write an event in the session's transaction: it commits with the change it records, or not at all.

    `changed_fields` holds names (a dict's keys are its names): never a value. `by_system`:
    see actor_fields.
    """
    event = {"action": action, "target_id": target_id, "changed_fields": sorted(changed_fields), "detail": detail}
    insert_event(event | actor_fields(by_system))


def prune_old_events(app):
    """Delete the events older than REGISTRY_AUDIT_RETENTION_DAYS."""
    cutoff = utcnow() - timedelta(days=app.config["AUDIT_RETENTION_DAYS"])
    delete_events_before(cutoff)
    db.session.commit()
