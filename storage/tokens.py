"""API tokens: the lookup every Bearer request makes, its usage time, and the tokens' list."""

import logging
from collections import namedtuple

import sqlalchemy as sa

from models import LIMIT_COLUMNS, TOKENS, USERS, ApiToken, TokenLimits, db
from storage.connections import DirectStatement, read_connection, session_connection
from storage.paging import NewestFirstPages

log = logging.getLogger(__name__)

# An unknown, revoked (deleted) and expired token all find no row, by the same indexed lookup.
TOKEN_BY_DIGEST = DirectStatement(
    sa.select(
        TOKENS.c.id,
        TOKENS.c.role,
        TOKENS.c.last_used_at,
        USERS.c.id.label("user_id"),
        USERS.c.username,
        USERS.c.role.label("user_role"),
        *LIMIT_COLUMNS,
    )
    .join_from(TOKENS, USERS, TOKENS.c.user_id == USERS.c.id)
    .where(
        TOKENS.c.digest == sa.bindparam("digest"),
        sa.or_(TOKENS.c.expires_at.is_(None), TOKENS.c.expires_at > sa.bindparam("now")),
    )
)
NOTE_TOKEN_USE = (
    sa.update(TOKENS)
    .where(
        TOKENS.c.id == sa.bindparam("token_id"),
        sa.or_(TOKENS.c.last_used_at.is_(None), TOKENS.c.last_used_at < sa.bindparam("stale_before")),
    )
    .values(last_used_at=sa.bindparam("now"))
)
SHOWN_COLUMNS = (
    TOKENS.c.id,
    TOKENS.c.name,
    USERS.c.username.label("user"),
    TOKENS.c.role,
    TOKENS.c.created_at,
    TOKENS.c.expires_at,
    TOKENS.c.last_used_at,
)
ShownToken = namedtuple("ShownToken", [column.name for column in SHOWN_COLUMNS] + ["limits"])


def shown_token(row):
    """A token as listed: its columns, and its limits as one TokenLimits."""
    return ShownToken(*row[: len(SHOWN_COLUMNS)], TokenLimits.of(row))


TOKEN_PAGES = NewestFirstPages(
    TOKENS,
    sa.select(*SHOWN_COLUMNS, *LIMIT_COLUMNS).join_from(TOKENS, USERS, TOKENS.c.user_id == USERS.c.id),
    {
        "user": TOKENS.c.user_id
        == sa.select(USERS.c.id).where(USERS.c.username == sa.bindparam("user")).correlate(None).scalar_subquery()
    },
    shown_token,  # the schema and the page token read its attributes
)


def valid_token(digest, now):
    """(id, role, last_used_at, user_id, username, user_role, and its limits) of the unexpired
    token with this digest, or None."""
    return TOKEN_BY_DIGEST.first(digest=digest, now=now)


def record_token_use(token_id, now, stale_before):
    """Set the token's last_used_at to `now` unless it is after `stale_before`, committed
    at once (authentication runs before the request's own work); a database that refuses
    (busy, read-only) is logged, not raised: a request need not fail for a usage time."""
    try:
        db.session.execute(NOTE_TOKEN_USE, {"token_id": token_id, "now": now, "stale_before": stale_before})
        db.session.commit()
    except sa.exc.OperationalError as error:
        db.session.rollback()
        log.warning("could not record the use of token %s: %s", token_id, error.orig)


def tokens_page(filter_values, limit, page_token):
    return TOKEN_PAGES.page(filter_values, limit, page_token)


def shown_token_by_id(token_id):
    """The token with this id as listed, or None."""
    row = read_connection().execute(TOKEN_PAGES.rows.where(TOKENS.c.id == token_id)).first()
    return None if row is None else shown_token(row)


def set_token_limits(token_id, limits):
    """Store the token's limits (a TokenLimits) in the session's transaction."""
    session_connection().execute(sa.update(TOKENS).where(TOKENS.c.id == token_id).values(limits.as_dict()))


def token_by_id(token_id):
    """The ApiToken with this id, in the session, or None."""
    return db.session.get(ApiToken, token_id)


def add_token(token):
    """Add a new ApiToken to the session's transaction."""
    db.session.add(token)


def delete_token(token_id, owner_id=None):
    """Delete a token (only of `owner_id`, when given) in the session's transaction; False when there was none."""
    deletion = sa.delete(TOKENS).where(TOKENS.c.id == token_id)
    if owner_id is not None:
        deletion = deletion.where(TOKENS.c.user_id == owner_id)
    return db.session.execute(deletion).rowcount == 1
