"""Audit events: the one table every change writes to, in the change's own transaction."""

import sqlalchemy as sa

from models import AUDIT_EVENTS, db
from storage.connections import session_connection
from storage.paging import NewestFirstPages

# Not an ORM object: the unit of work's flush at commit cost more than the change itself.
INSERT_EVENT = sa.insert(AUDIT_EVENTS)

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


def insert_event(event):
    """Insert an event (a dict of its columns) in the session's transaction."""
    session_connection().execute(INSERT_EVENT, event)


def events_page(filter_values, limit, page_token):
    return AUDIT_PAGES.page(filter_values, limit, page_token)


def delete_events_before(cutoff):
    """Delete the events created before `cutoff`, in the session's transaction."""
    db.session.execute(sa.delete(AUDIT_EVENTS).where(AUDIT_EVENTS.c.created_at < cutoff))
