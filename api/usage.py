"""Usage of the gateway, added up: /api/v1/usage."""

from apifairy import arguments, authenticate, other_responses, response
from flask import Blueprint

from access.auth import auth
from observability.usage_report import usage_report
from schemas import UsageQuerySchema, UsageReportSchema

usage_bp = Blueprint("usage", __name__)


@usage_bp.route("/usage", methods=["GET"])
@authenticate(auth, role="reader")
@arguments(UsageQuerySchema)
@response(UsageReportSchema)
@other_responses({403: "Another user's usage, asked by a role other than admin"})
def read_usage(query):
    """Usage of the gateway, added up by day, model, provider, token or user

    Every model call through the gateway counts, with the tokens its upstream reported
    (calls whose upstream reported none add no tokens) and as an error when its outcome was
    not ok. An admin sees everyone's usage; every other role only its own user's: its calls
    with a password and with any of its tokens. Calls are counted within a second of
    their end.
    """
    return usage_report(query, auth.current_user())
