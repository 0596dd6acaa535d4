"""Console sessions: the lookup every console page makes, and their start and end."""

import sqlalchemy as sa

from models import CONSOLE_SESSIONS, USERS, db
from storage.connections import DirectStatement, session_connection

# An unknown, ended and expired session all find no row; the user is read with it, so a
# demotion or a deletion counts from the next page.
SESSION_BY_DIGEST = DirectStatement(
    sa.select(
        USERS.c.id,
        USERS.c.username,
        USERS.c.role,
        USERS.c.password_hash,
        CONSOLE_SESSIONS.c.password_stamp,
    )
    .join_from(CONSOLE_SESSIONS, USERS, CONSOLE_SESSIONS.c.user_id == USERS.c.id)
    .where(CONSOLE_SESSIONS.c.digest == sa.bindparam("digest"), CONSOLE_SESSIONS.c.expires_at > sa.bindparam("now"))
)


def live_session(digest, now):
    """(id, username, role, password_hash, password_stamp) of the user of the unexpired
    session with this digest, or None."""
    return SESSION_BY_DIGEST.first(digest=digest, now=now)


def add_session(values):
    """Insert a session (a dict of its columns) in the session's transaction."""
    session_connection().execute(sa.insert(CONSOLE_SESSIONS), values)


def delete_session(digest):
    db.session.execute(sa.delete(CONSOLE_SESSIONS).where(CONSOLE_SESSIONS.c.digest == digest))


def delete_sessions_expired_by(now):
    db.session.execute(sa.delete(CONSOLE_SESSIONS).where(CONSOLE_SESSIONS.c.expires_at <= now))
