"""The usage report (GET /api/v1/usage, `flask --app app usage`): the gateway's calls added
up by day, model, provider, token or user, each caller seeing only what it may."""

from datetime import datetime, timedelta

from werkzeug.exceptions import Forbidden

from models import canonical_username, utcnow
from storage.usage import usage_sums

DEFAULT_DAYS = 30
# The range's ends are kept within these, so that its days can be counted (datetime ends with
# the year 9999); no call ends outside them.
EARLIEST = datetime.min + timedelta(days=DEFAULT_DAYS)
LATEST = datetime.max - timedelta(days=2)


def report_range(query):
    """(since, until) of the query, with their defaults: the last 30 days (before `until`), no end."""
    until = query.get("until") and min(query["until"], LATEST)
    since = query.get("since") or max(until or utcnow(), EARLIEST) - timedelta(days=DEFAULT_DAYS)
    return min(since, LATEST), until


def usage_report(query, caller=None):
    """The rows of a loaded UsageQuerySchema: everyone's for an admin (or the operator's
    command, without a caller), only the caller's own user's (its Basic calls and its tokens')
    for every other role."""
    since, until = report_range(query)
    filters = {name: query.get(name) or None for name in ("model", "provider_id", "token_id", "user")}  # "": no filter
    if filters["user"] is not None:
        filters["user"] = canonical_username(filters["user"]) or filters["user"]  # a name no user has finds nothing
    if caller is not None and caller.role != "admin":
        if filters["user"] not in (None, caller.username):
            raise Forbidden("Only an admin may read another user's usage.")
        filters["user_id"] = caller.id
    return {"items": usage_sums(query["group_by"], since, until, filters)}
