"""The bookkeeping of token limits: an admission row per call of a token with
requests_per_minute or max_parallel, and the tokens its calls used, per second and per minute.

A token's admissions are made one at a time, in every worker and instance: on SQLite under
the database's write lock (taken cooperatively, storage/sqlite.py), elsewhere under a lock
of the token's row (SELECT ... FOR NO KEY UPDATE, which the foreign keys of these rows,
written meanwhile by calls that end, do not wait for).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from models import LIMIT_ADMISSIONS, LIMIT_COLUMNS, LIMIT_TOKENS, TOKENS, TokenLimits, db
from storage.connections import read_connection, session_connection, session_writing

MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
# Tokens are counted in buckets of a second for the minute's window, of a minute for the
# day's; a bucket counts while any part of it is in the window (so never too few tokens).
SECOND_SPAN, MINUTE_SPAN = 1, 60
SPANS = {MINUTE: SECOND_SPAN, DAY: MINUTE_SPAN}

TOKEN_ID = sa.bindparam("token_id")
LOCKED_LIMITS = sa.select(*LIMIT_COLUMNS).where(TOKENS.c.id == TOKEN_ID).with_for_update(key_share=True)
IN_LAST_MINUTE = (LIMIT_ADMISSIONS.c.token_id == TOKEN_ID, LIMIT_ADMISSIONS.c.admitted_at > sa.bindparam("minute_ago"))
ADMIT = sa.insert(LIMIT_ADMISSIONS)
ADMISSION_ID = sa.bindparam("admission_id")
RELEASE = sa.update(LIMIT_ADMISSIONS).where(LIMIT_ADMISSIONS.c.id == ADMISSION_ID).values(slot_expires_at=None)
PRUNE_ADMISSIONS = sa.delete(LIMIT_ADMISSIONS).where(
    LIMIT_ADMISSIONS.c.token_id == TOKEN_ID,
    LIMIT_ADMISSIONS.c.admitted_at <= sa.bindparam("minute_ago"),
    sa.or_(LIMIT_ADMISSIONS.c.slot_expires_at.is_(None), LIMIT_ADMISSIONS.c.slot_expires_at <= sa.bindparam("now")),
)
PRUNE_TOKENS = sa.delete(LIMIT_TOKENS).where(
    LIMIT_TOKENS.c.token_id == TOKEN_ID,
    sa.or_(
        sa.and_(LIMIT_TOKENS.c.span == SECOND_SPAN, LIMIT_TOKENS.c.starts_at < sa.bindparam("seconds_before")),
        sa.and_(LIMIT_TOKENS.c.span == MINUTE_SPAN, LIMIT_TOKENS.c.starts_at < sa.bindparam("minutes_before")),
    ),
)


def bucket_start(moment, span):
    return moment.replace(microsecond=0) if span == SECOND_SPAN else moment.replace(second=0, microsecond=0)


def buckets_in(window):
    """The clauses of the token buckets that count in the window ending now."""
    span = SPANS[window]
    return (
        LIMIT_TOKENS.c.token_id == TOKEN_ID,
        LIMIT_TOKENS.c.span == span,
        LIMIT_TOKENS.c.starts_at > sa.bindparam(f"buckets_after_{span}"),
    )


def window_parameters(token_id, now):
    return {
        "token_id": token_id,
        "now": now,
        "minute_ago": now - MINUTE,
        f"buckets_after_{SECOND_SPAN}": now - MINUTE - timedelta(seconds=SECOND_SPAN),
        f"buckets_after_{MINUTE_SPAN}": now - DAY - timedelta(seconds=MINUTE_SPAN),
    }


@dataclass(frozen=True)
class Window:
    """What a token's limits count now (only what its limits need; the rest stays 0 or None)."""

    requests: int = 0  # admitted in the last minute
    oldest_request: datetime | None = None
    in_flight: int = 0  # slots held
    minute_tokens: int = 0
    oldest_minute_bucket: datetime | None = None
    day_tokens: int = 0
    oldest_day_bucket: datetime | None = None


def scalar(query):
    return query.scalar_subquery()


@cache
def window_statement(limit_names):
    """One SELECT of every count the named limits need (built once per set of names)."""
    columns = []
    if "requests_per_minute" in limit_names:
        oldest = sa.select(sa.func.min(LIMIT_ADMISSIONS.c.admitted_at)).where(*IN_LAST_MINUTE)
        columns.append(scalar(sa.select(sa.func.count()).where(*IN_LAST_MINUTE)).label("requests"))
        columns.append(scalar(oldest).label("oldest_request"))
    if "max_parallel" in limit_names:
        holding = (LIMIT_ADMISSIONS.c.token_id == TOKEN_ID, LIMIT_ADMISSIONS.c.slot_expires_at > sa.bindparam("now"))
        columns.append(scalar(sa.select(sa.func.count()).where(*holding)).label("in_flight"))
    for name, window, label in (("tokens_per_minute", MINUTE, "minute"), ("tokens_per_day", DAY, "day")):
        if name in limit_names:
            counted = buckets_in(window)
            total = sa.func.coalesce(sa.func.sum(LIMIT_TOKENS.c.tokens), 0)
            columns.append(scalar(sa.select(total).where(*counted)).label(f"{label}_tokens"))
            oldest = sa.select(sa.func.min(LIMIT_TOKENS.c.starts_at)).where(*counted)
            columns.append(scalar(oldest).label(f"oldest_{label}_bucket"))
    return sa.select(*columns)


def limit_names_of(limits):
    return frozenset(name for name, value in limits.as_dict().items() if value is not None)


def lock_token_limits(token_id):
    """The token's limits, read with the token locked until the session's transaction ends
    (so that its admissions are made one at a time); None when the token is gone."""
    session_writing()
    row = session_connection().execute(LOCKED_LIMITS, {"token_id": token_id}).first()
    return None if row is None else TokenLimits.of(row)


def window_of(token_id, limits, now, locked):
    """What the token's limits count now: in the locked transaction, or as a plain read."""
    statement = window_statement(limit_names_of(limits))
    connection = session_connection() if locked else read_connection()
    row = connection.execute(statement, window_parameters(token_id, now)).first()
    return Window(**row._asdict())


def nth_oldest_request(token_id, now, position):
    """When the request at `position` (0: the oldest) of the last minute was admitted."""
    query = (
        sa.select(LIMIT_ADMISSIONS.c.admitted_at)
        .where(*IN_LAST_MINUTE)
        .order_by(LIMIT_ADMISSIONS.c.admitted_at)
        .offset(position)
        .limit(1)
    )
    return session_connection().scalar(query, window_parameters(token_id, now))


def token_buckets(token_id, window, now):
    """(start, tokens) of each bucket counting in the window, oldest first."""
    query = (
        sa.select(LIMIT_TOKENS.c.starts_at, LIMIT_TOKENS.c.tokens)
        .where(*buckets_in(window))
        .order_by(LIMIT_TOKENS.c.starts_at)
    )
    return list(session_connection().execute(query, window_parameters(token_id, now)))


def admit(token_id, now, slot_expires_at):
    """Add an admission (holding a slot until `slot_expires_at`, or none: None); its id."""
    values = {"token_id": token_id, "admitted_at": now, "slot_expires_at": slot_expires_at}
    return session_connection().execute(ADMIT, values).inserted_primary_key[0]


@cache
def add_tokens_statement(dialect_name):
    """INSERT a bucket, or add to the one there (the two dialects spell it alike)."""
    insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    statement = insert(LIMIT_TOKENS)
    return statement.on_conflict_do_update(
        index_elements=[LIMIT_TOKENS.c.token_id, LIMIT_TOKENS.c.span, LIMIT_TOKENS.c.starts_at],
        set_={"tokens": LIMIT_TOKENS.c.tokens + statement.excluded.tokens},
    )


def end_call(token_id, admission_id, tokens, now):
    """A call of the token ended: its slot freed, its tokens counted, and the token's rows
    that no window counts any more deleted, in the session's transaction."""
    connection = session_connection()
    if admission_id is not None:
        connection.execute(RELEASE, {"admission_id": admission_id})
    if tokens:
        buckets = [
            {"token_id": token_id, "span": span, "starts_at": bucket_start(now, span), "tokens": tokens}
            for span in (SECOND_SPAN, MINUTE_SPAN)
        ]
        connection.execute(add_tokens_statement(db.engine.dialect.name), buckets)
    parameters = window_parameters(token_id, now)
    connection.execute(PRUNE_ADMISSIONS, parameters)
    seconds_before = parameters[f"buckets_after_{SECOND_SPAN}"]
    minutes_before = parameters[f"buckets_after_{MINUTE_SPAN}"]
    connection.execute(
        PRUNE_TOKENS, {"token_id": token_id, "seconds_before": seconds_before, "minutes_before": minutes_before}
    )
