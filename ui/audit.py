"""The audit log, for admins."""

from flask import render_template

from api.audit import audit_filter_values
from schemas import AuditQuerySchema
from storage.audit import events_page
from ui.console import query_values, requires, ui_bp


@ui_bp.get("/audit")
@requires("admin")
def audit():
    query = query_values(AuditQuerySchema())
    page = events_page(audit_filter_values(query), query["limit"], query.get("page_token"))
    return render_template("ui/audit.html", page=page)
