"""The bookkeeping of token limits: buckets of a second, a minute and an hour per limited
token (models.LimitBucket), counting the calls admitted, the slots they hold and the tokens
they used.

A token's admissions are made one at a time, in every worker and instance: on SQLite under
the database's write lock (taken cooperatively, storage/sqlite.py), elsewhere under a lock
of the token's row (SELECT ... FOR NO KEY UPDATE, which the foreign keys of the buckets,
written meanwhile by calls that end, do not wait for). An admission is one short
transaction of DirectStatements on a connection of its own
(storage.connections.direct_transaction): a read of the token's windows and one upsert of
its current second. It is the one write of the registry made so, being on the path of every
call of a limited token; the ends of calls are written in batches, off the calls' path.

A bucket counts in a window while any part of it is in the window, so a window never counts
too few: a call admitted in a second counts for up to a second more than 60 s. The day's
edge is counted by the minute, its whole hours by the hour (window_parts).
"""

import operator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, reduce

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from models import LIMIT_BUCKETS, LIMIT_COLUMNS, LIMIT_NAMES, TOKENS, TokenLimits
from storage.connections import DirectStatement, direct_transaction, read_connection

MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
SECOND_SPAN, MINUTE_SPAN, HOUR_SPAN = 1, 60, 3600
SPANS = {MINUTE: SECOND_SPAN, DAY: MINUTE_SPAN}  # the buckets that tell each window's edge
# A slot whose process died stops counting this long after its call's deadline.
SLOT_MARGIN = timedelta(seconds=60)

TOKEN_ID = sa.bindparam("token_id")
BUCKETS = LIMIT_BUCKETS.c
LOCK_TOKEN = DirectStatement(sa.select(TOKENS.c.id).where(TOKENS.c.id == TOKEN_ID).with_for_update(key_share=True))
GIVE_BACK_SLOTS = DirectStatement(
    sa.update(LIMIT_BUCKETS)
    .where(
        # an UPDATE's parameters may not be named as its columns
        BUCKETS.token_id == sa.bindparam("of_token_id"),
        BUCKETS.span == SECOND_SPAN,
        BUCKETS.starts_at == sa.bindparam("admitted_in"),
    )
    .values(slots=BUCKETS.slots - sa.bindparam("slots_given_back"))
)
PRUNE = DirectStatement(
    sa.delete(LIMIT_BUCKETS).where(
        BUCKETS.token_id == TOKEN_ID,
        sa.or_(
            sa.and_(
                BUCKETS.span == SECOND_SPAN,
                BUCKETS.starts_at <= sa.bindparam(f"buckets_after_{SECOND_SPAN}"),
                sa.or_(BUCKETS.slots <= 0, BUCKETS.starts_at <= sa.bindparam("slots_after")),
            ),
            sa.and_(BUCKETS.span == MINUTE_SPAN, BUCKETS.starts_at <= sa.bindparam(f"buckets_after_{MINUTE_SPAN}")),
            sa.and_(BUCKETS.span == HOUR_SPAN, BUCKETS.starts_at <= sa.bindparam(f"buckets_after_{HOUR_SPAN}")),
        ),
    )
)


# span -> the fields of a moment that its bucket's start sets to 0
TRUNCATED = {
    SECOND_SPAN: {"microsecond": 0},
    MINUTE_SPAN: {"second": 0, "microsecond": 0},
    HOUR_SPAN: {"minute": 0, "second": 0, "microsecond": 0},
}


def bucket_start(moment, span):
    """The start of the bucket of `span` seconds (a second, a minute or an hour) that holds `moment`."""
    return moment.replace(**TRUNCATED[span])


def window_parameters(token_id, now, slot_lifetime):
    """The parameters of the token's windows now; `slot_lifetime`: a call's deadline and SLOT_MARGIN."""
    day_buckets_after = now - DAY - timedelta(seconds=MINUTE_SPAN)
    return {
        "token_id": token_id,
        f"buckets_after_{SECOND_SPAN}": now - MINUTE - timedelta(seconds=SECOND_SPAN),
        f"buckets_after_{MINUTE_SPAN}": day_buckets_after,
        f"buckets_after_{HOUR_SPAN}": now - DAY - HOUR,
        "whole_hours_from": bucket_start(day_buckets_after, HOUR_SPAN) + HOUR,
        "slots_after": now - slot_lifetime,
    }


@dataclass(frozen=True)
class Window:
    """What a token's limits count now (only what its limits need; the rest stays 0 or None)."""

    requests: int = 0  # admitted in the last minute
    oldest_request_bucket: datetime | None = None
    in_flight: int = 0  # slots held
    minute_tokens: int = 0
    oldest_minute_bucket: datetime | None = None
    day_tokens: int = 0
    oldest_day_bucket: datetime | None = None


# limit name -> (the bucket column it counts, its window, the Window fields of the sum and of its oldest bucket)
COUNTED = {
    "requests_per_minute": (BUCKETS.requests, MINUTE, "requests", "oldest_request_bucket"),
    "tokens_per_minute": (BUCKETS.tokens, MINUTE, "minute_tokens", "oldest_minute_bucket"),
    "tokens_per_day": (BUCKETS.tokens, DAY, "day_tokens", "oldest_day_bucket"),
}


def in_window(window):
    span = SPANS[window]
    return sa.and_(BUCKETS.span == span, BUCKETS.starts_at > sa.bindparam(f"buckets_after_{span}"))


def window_parts(window):
    """The conditions of the buckets whose sums make the window's: a minute's seconds; a day's
    minutes up to its first whole hour, then its whole hours (at most 84 rows, not 1441)."""
    if window == MINUTE:
        return [in_window(MINUTE)]
    whole_hours_from = sa.bindparam("whole_hours_from")
    return [
        sa.and_(in_window(DAY), BUCKETS.starts_at < whole_hours_from),
        sa.and_(BUCKETS.span == HOUR_SPAN, BUCKETS.starts_at >= whole_hours_from),
    ]


def oldest_counted(column, window):
    """The start of the oldest bucket counting in the window with some of `column`: found
    at the start of the key's range, however many there are."""
    counted = (BUCKETS.token_id == TOKEN_ID, in_window(window), column > 0)
    return sa.select(sa.func.min(BUCKETS.starts_at)).where(*counted).scalar_subquery()


def sum_of(subqueries, label):
    """The sum of the column `label` of each of the one-row subqueries, labelled so."""
    return reduce(operator.add, (subquery.c[label] for subquery in subqueries)).label(label)


def sums_in(condition, labelled_columns):
    """A one-row subquery of the token's buckets under `condition`: each column's sum, labelled."""
    sums = [sa.func.coalesce(sa.func.sum(column), 0).label(label) for label, column in labelled_columns.items()]
    return sa.select(*sums).where(BUCKETS.token_id == TOKEN_ID, condition).subquery()


@cache
def window_statement(limit_names):
    """One SELECT of the token's limits and of every count the named limits need, each
    window's buckets read once (a DirectStatement, built once per set of names, whose row is
    (TokenLimits, Window)); no row when the token is gone."""
    sums = {MINUTE: {}, DAY: {}}
    oldest = []
    for name in sorted(limit_names & COUNTED.keys()):
        column, window, total_label, oldest_label = COUNTED[name]
        sums[window][total_label] = column
        oldest.append(oldest_counted(column, window).label(oldest_label))
    summed = [(window_parts(window), columns) for window, columns in sums.items() if columns]
    if "max_parallel" in limit_names:
        holding = sa.and_(BUCKETS.span == SECOND_SPAN, BUCKETS.starts_at > sa.bindparam("slots_after"))
        summed.append(([holding], {"in_flight": BUCKETS.slots}))
    windows, counts = [], []
    for conditions, columns in summed:
        subqueries = [sums_in(condition, columns) for condition in conditions]
        windows += subqueries
        counts += [sum_of(subqueries, label) for label in columns]
    labels = [column.name for column in counts + oldest]

    def limits_and_window(*values):
        limit_values, count_values = values[: len(LIMIT_COLUMNS)], values[len(LIMIT_COLUMNS) :]
        return TokenLimits(*limit_values), Window(**dict(zip(labels, count_values, strict=True)))

    return DirectStatement(
        sa.select(*LIMIT_COLUMNS, *counts, *oldest).select_from(TOKENS, *windows).where(TOKENS.c.id == TOKEN_ID),
        make_row=limits_and_window,
    )


def limit_names_of(limits):
    return frozenset(name for name in LIMIT_NAMES if getattr(limits, name) is not None)


@contextmanager
def locked_token(token_id):
    """A transaction of its own (a DirectTransaction) in which the token's admissions are
    made one at a time: on SQLite the write lock does, elsewhere a lock of the token's row.
    Committed when the block ends."""
    with direct_transaction() as transaction:
        if transaction.dialect.name != "sqlite":
            LOCK_TOKEN.first_on(transaction, token_id=token_id)
        yield transaction


def window_of(token_id, limit_names, now, slot_lifetime, transaction=None):
    """(the token's limits, what the named limits count now), read in the token's locked
    transaction or as a plain read; None when the token is gone."""
    statement, parameters = window_statement(limit_names), window_parameters(token_id, now, slot_lifetime)
    return statement.first(**parameters) if transaction is None else statement.first_on(transaction, **parameters)


def buckets_of(token_id, limit_name, now):
    """(start, count) of each bucket counting in the limit's window, oldest first."""
    column, window, _, _ = COUNTED[limit_name]
    counted = (BUCKETS.token_id == TOKEN_ID, in_window(window), column > 0)
    query = sa.select(BUCKETS.starts_at, column).where(*counted).order_by(BUCKETS.starts_at)
    return list(read_connection().execute(query, window_parameters(token_id, now, timedelta(0))))


@cache
def upsert_statement(dialect_name, *added):
    """INSERT a bucket, or add to the one there, the columns `added` (the two dialects spell it alike)."""
    insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    statement = insert(LIMIT_BUCKETS)
    return DirectStatement(
        statement.on_conflict_do_update(
            index_elements=[BUCKETS.token_id, BUCKETS.span, BUCKETS.starts_at],
            set_={name: BUCKETS[name] + statement.excluded[name] for name in added},
        )
    )


def admit(transaction, token_id, now):
    """Count a call admitted now, holding a slot: the bucket (its second's start) whose slot
    its end gives back."""
    admitted_in = bucket_start(now, SECOND_SPAN)
    upsert_statement(transaction.dialect.name, "requests", "slots").first_on(
        transaction, token_id=token_id, span=SECOND_SPAN, starts_at=admitted_in, requests=1, slots=1, tokens=0
    )
    return admitted_in


def write_ends(transaction, ends, pruned_token_ids, slot_lifetime):
    """Write calls of limited tokens that ended (each with token_id, admitted_in, tokens and
    ended_at) in the transaction: their slots given back, their tokens added to the buckets of
    the second and the minute they ended in; and delete the buckets of `pruned_token_ids`
    that no window counts any more."""
    slots, tokens = {}, {}
    for end in ends:
        if end.admitted_in is not None:
            slots[end.token_id, end.admitted_in] = slots.get((end.token_id, end.admitted_in), 0) + 1
        for span in (SECOND_SPAN, MINUTE_SPAN, HOUR_SPAN) if end.tokens else ():
            key = (end.token_id, span, bucket_start(end.ended_at, span))
            tokens[key] = tokens.get(key, 0) + end.tokens
    for (token_id, admitted_in), count in slots.items():
        GIVE_BACK_SLOTS.first_on(transaction, of_token_id=token_id, admitted_in=admitted_in, slots_given_back=count)
    add_tokens = upsert_statement(transaction.dialect.name, "tokens")
    for (token_id, span, starts_at), count in tokens.items():
        add_tokens.first_on(
            transaction, token_id=token_id, span=span, starts_at=starts_at, requests=0, slots=0, tokens=count
        )
    now = max(end.ended_at for end in ends)
    for token_id in pruned_token_ids:
        PRUNE.first_on(transaction, **window_parameters(token_id, now, slot_lifetime))
