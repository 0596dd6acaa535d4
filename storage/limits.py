"""The bookkeeping of token limits: an admission row per call of a token with
requests_per_minute or max_parallel, and the tokens its calls used, per second and per minute.

A token's admissions are made one at a time, in every worker and instance: on SQLite under
the database's write lock (taken cooperatively, storage/sqlite.py), elsewhere under a lock
of the token's row (SELECT ... FOR NO KEY UPDATE, which the foreign keys of these rows,
written meanwhile by calls that end, do not wait for). An admission is one short transaction
of DirectStatements on a connection of its own (storage.connections.direct_transaction), the
one write of the registry made so: it is on the path of every call of a limited token. The
ends of calls are written in batches through the session, off the calls' path.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from models import LIMIT_ADMISSIONS, LIMIT_COLUMNS, LIMIT_TOKENS, TOKENS, TokenLimits, db
from storage.connections import DirectStatement, direct_transaction, read_connection

MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
# Tokens are counted in buckets of a second for the minute's window, of a minute for the
# day's; a bucket counts while any part of it is in the window (so never too few tokens).
SECOND_SPAN, MINUTE_SPAN = 1, 60
SPANS = {MINUTE: SECOND_SPAN, DAY: MINUTE_SPAN}

TOKEN_ID = sa.bindparam("token_id")
LOCK_TOKEN = DirectStatement(sa.select(TOKENS.c.id).where(TOKENS.c.id == TOKEN_ID).with_for_update(key_share=True))
IN_LAST_MINUTE = (LIMIT_ADMISSIONS.c.token_id == TOKEN_ID, LIMIT_ADMISSIONS.c.admitted_at > sa.bindparam("minute_ago"))
ADMIT = DirectStatement(sa.insert(LIMIT_ADMISSIONS).returning(LIMIT_ADMISSIONS.c.id))
ADMISSION_ID = sa.bindparam("admission_id")
RELEASE = DirectStatement(
    sa.update(LIMIT_ADMISSIONS).where(LIMIT_ADMISSIONS.c.id == ADMISSION_ID).values(slot_expires_at=None)
)
PRUNE_ADMISSIONS = DirectStatement(
    sa.delete(LIMIT_ADMISSIONS).where(
        LIMIT_ADMISSIONS.c.token_id == TOKEN_ID,
        LIMIT_ADMISSIONS.c.admitted_at <= sa.bindparam("minute_ago"),
        sa.or_(LIMIT_ADMISSIONS.c.slot_expires_at.is_(None), LIMIT_ADMISSIONS.c.slot_expires_at <= sa.bindparam("now")),
    )
)
PRUNE_TOKENS = DirectStatement(
    sa.delete(LIMIT_TOKENS).where(
        LIMIT_TOKENS.c.token_id == TOKEN_ID,
        sa.or_(
            *(
                sa.and_(LIMIT_TOKENS.c.span == span, LIMIT_TOKENS.c.starts_at <= sa.bindparam(f"buckets_after_{span}"))
                for span in (SECOND_SPAN, MINUTE_SPAN)
            )
        ),
    )
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


WINDOW_FIELDS = frozenset(Window.__dataclass_fields__)


def scalar(query):
    return query.scalar_subquery()


@cache
def window_statement(limit_names):
    """One SELECT of the token's limits and of every count the named limits need (a
    DirectStatement, built once per set of names); no row when the token is gone."""
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
    return DirectStatement(sa.select(*LIMIT_COLUMNS, *columns).where(TOKENS.c.id == TOKEN_ID))


def limit_names_of(limits):
    return frozenset(name for name, value in limits.as_dict().items() if value is not None)


@contextmanager
def locked_token(token_id):
    """A transaction of its own (the DBAPI connection it runs on) in which the token's
    admissions are made one at a time: on SQLite the write lock does, elsewhere a lock of
    the token's row. Committed when the block ends."""
    with direct_transaction() as transaction:
        if db.engine.dialect.name != "sqlite":
            LOCK_TOKEN.first_on(transaction, token_id=token_id)
        yield transaction


def window_of(token_id, limit_names, now, transaction=None):
    """(the token's limits, what the named limits count now), read in the token's locked
    transaction or as a plain read; None when the token is gone."""
    statement, parameters = window_statement(limit_names), window_parameters(token_id, now)
    row = statement.first(**parameters) if transaction is None else statement.first_on(transaction, **parameters)
    if row is None:
        return None
    counts = row._asdict()
    return TokenLimits.of(row), Window(**{name: counts[name] for name in counts if name in WINDOW_FIELDS})


def nth_oldest_request(token_id, now, position):
    """When the request at `position` (0: the oldest) of the last minute was admitted."""
    query = (
        sa.select(LIMIT_ADMISSIONS.c.admitted_at)
        .where(*IN_LAST_MINUTE)
        .order_by(LIMIT_ADMISSIONS.c.admitted_at)
        .offset(position)
        .limit(1)
    )
    return read_connection().scalar(query, window_parameters(token_id, now))


def token_buckets(token_id, window, now):
    """(start, tokens) of each bucket counting in the window, oldest first."""
    query = (
        sa.select(LIMIT_TOKENS.c.starts_at, LIMIT_TOKENS.c.tokens)
        .where(*buckets_in(window))
        .order_by(LIMIT_TOKENS.c.starts_at)
    )
    return list(read_connection().execute(query, window_parameters(token_id, now)))


def admit(transaction, token_id, now, slot_expires_at):
    """Add an admission (holding a slot until `slot_expires_at`, or none: None); its id."""
    return ADMIT.first_on(transaction, token_id=token_id, admitted_at=now, slot_expires_at=slot_expires_at).id


@cache
def add_tokens_statement(dialect_name):
    """INSERT a bucket, or add to the one there (the two dialects spell it alike)."""
    insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    statement = insert(LIMIT_TOKENS)
    return DirectStatement(
        statement.on_conflict_do_update(
            index_elements=[LIMIT_TOKENS.c.token_id, LIMIT_TOKENS.c.span, LIMIT_TOKENS.c.starts_at],
            set_={"tokens": LIMIT_TOKENS.c.tokens + statement.excluded.tokens},
        )
    )


def write_ends(transaction, ends, pruned_token_ids):
    """Write calls of limited tokens that ended (each with token_id, admission_id, tokens and
    ended_at) in the transaction: their slots freed, their tokens added to their buckets; and
    delete the rows of `pruned_token_ids` that no window counts any more."""
    buckets = {}
    for end in ends:
        for span in (SECOND_SPAN, MINUTE_SPAN) if end.tokens else ():
            key = (end.token_id, span, bucket_start(end.ended_at, span))
            buckets[key] = buckets.get(key, 0) + end.tokens
    for end in ends:
        if end.admission_id is not None:
            RELEASE.first_on(transaction, admission_id=end.admission_id)
    add_tokens = add_tokens_statement(db.engine.dialect.name)
    for (token_id, span, starts_at), tokens in buckets.items():
        add_tokens.first_on(transaction, token_id=token_id, span=span, starts_at=starts_at, tokens=tokens)
    now = max(end.ended_at for end in ends)
    for token_id in pruned_token_ids:
        parameters = window_parameters(token_id, now)
        PRUNE_ADMISSIONS.first_on(transaction, **parameters)
        PRUNE_TOKENS.first_on(transaction, **parameters)
