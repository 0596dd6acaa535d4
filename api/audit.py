"""The audit log for admins: /api/v1/audit."""

from apifairy import arguments, authenticate, response
from flask import Blueprint

from access.auth import auth
from schemas import AuditEventSchema, AuditQuerySchema, collection
from storage.audit import events_page

audit_bp = Blueprint("audit", __name__)


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
    return events_page(audit_filter_values(query), query["limit"], query.get("page_token"))
