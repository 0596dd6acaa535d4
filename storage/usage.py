"""Usage events and their daily totals: the batches the recorder writes, the report's
grouped sums, and the pruning.

A batch is one INSERT of its events (executemany) and one upsert of its daily totals, in
one short transaction. A report adds the whole days of its range from the totals to its
partial first and last days from the events, so it reads a few rows per day whatever
the number of events.
"""

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import cache

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from models import USAGE_DAYS, USAGE_EVENTS, db

INSERT_EVENTS = sa.insert(USAGE_EVENTS)
DAY_KEYS = ("day", "model", "provider_id", "token_id", "user_id")
DAY_SUMS = ("requests", "errors", "input_tokens", "output_tokens")
NONE = ""  # a daily total's key for none (Basic credentials, no provider, an unknown model)
# Rows one pruning statement deletes: each is a short transaction, so flushes and other
# writes get the database's write lock between them.
PRUNE_BATCH = 5000
ONE_DAY = timedelta(days=1)

# The report's group keys: the field of a row each is shown as.
GROUP_FIELDS = {"day": "day", "model": "model", "provider": "provider_id", "token": "token_id", "user": "user"}
# The row's fields a daily key of none is shown in as null.
NULLABLE_FIELDS = ("model", "provider_id", "token_id")
FILTER_COLUMNS = {
    "model": "model",
    "provider_id": "provider_id",
    "token_id": "token_id",
    "user": "username",
    "user_id": "user_id",
}


def day_totals(events):
    """The events' sums per daily key, in key order (so that two writers lock rows in one order)."""
    totals = {}
    for event in events:
        key = (event["day"], *(event[name] or NONE for name in DAY_KEYS[1:]))
        total = totals.setdefault(
            key, {"username": event["username"], "requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0}
        )
        total["requests"] += 1
        total["errors"] += event["outcome"] != "ok"
        total["input_tokens"] += event["input_tokens"] or 0
        total["output_tokens"] += event["output_tokens"] or 0
    return [dict(zip(DAY_KEYS, key, strict=True)) | total for key, total in sorted(totals.items())]


@cache
def upsert_day_totals(dialect_name):
    """INSERT ... ON CONFLICT DO UPDATE adding to the existing sums (SQLite and PostgreSQL say it alike)."""
    insert = (postgresql if dialect_name == "postgresql" else sqlite).insert(USAGE_DAYS)
    added = {name: USAGE_DAYS.c[name] + insert.excluded[name] for name in DAY_SUMS}
    return insert.on_conflict_do_update(index_elements=DAY_KEYS, set_={**added, "username": insert.excluded.username})


def insert_usage(events):
    """Insert the events (dicts of their columns) and add them to the daily totals, in the
    session's transaction."""
    connection = db.session.connection()
    connection.execute(INSERT_EVENTS, events)
    connection.execute(upsert_day_totals(db.engine.dialect.name), day_totals(events))


def delete_usage_before(cutoff):
    """Delete the events before `cutoff`, in short transactions, and the daily totals of the
    days before its day; committed."""
    oldest = sa.select(USAGE_EVENTS.c.id).where(USAGE_EVENTS.c.created_at < cutoff).limit(PRUNE_BATCH)
    while db.session.execute(sa.delete(USAGE_EVENTS).where(USAGE_EVENTS.c.id.in_(oldest))).rowcount:
        db.session.commit()
    db.session.execute(sa.delete(USAGE_DAYS).where(USAGE_DAYS.c.day < cutoff.date()))
    db.session.commit()


# The report ---------------------------------------------------------------------------------


def start_of(day):
    return datetime.combine(day, time())


def whole_days(since, until):
    """(first, end): the days wholly within [since, until), first included and end not;
    `until` None is no end."""
    first = since.date() if since.time() == time() else since.date() + ONE_DAY
    return first, until.date() if until is not None else None


def event_ranges(since, until, first, end):
    """The [start, stop) times outside the whole days [first, end), read from the events."""
    if end is not None and first >= end:
        return [(since, until)]
    ranges = [(since, start_of(first))] if since < start_of(first) else []
    if end is not None and start_of(end) < until:
        ranges.append((start_of(end), until))
    return ranges


def matching(table, filters):
    """The filters' conditions on a table; a filter's value None filters nothing."""
    return [table.c[FILTER_COLUMNS[name]] == value for name, value in filters.items() if value is not None]


@dataclass(frozen=True)
class Part:
    """Where a report reads some of its range: the daily totals, or the events themselves."""

    table: sa.Table
    dated_by: sa.Column  # what [start, stop) ranges over
    grouped: dict  # the group key -> what it groups by (nulls as the daily totals' NONE)
    summed: list  # the sums of DAY_SUMS (a sum of nothing but nulls is null)


DAYS, EVENTS = USAGE_DAYS.c, USAGE_EVENTS.c
DAILY_TOTALS = Part(
    USAGE_DAYS,
    DAYS.day,
    {"day": DAYS.day, "model": DAYS.model, "provider": DAYS.provider_id, "token": DAYS.token_id, "user": DAYS.username},
    [sa.func.sum(DAYS[name]) for name in DAY_SUMS],
)
EVENTS_THEMSELVES = Part(
    USAGE_EVENTS,
    EVENTS.created_at,
    {
        "day": EVENTS.day,
        "model": sa.func.coalesce(EVENTS.model, NONE),
        "provider": sa.func.coalesce(EVENTS.provider_id, NONE),
        "token": sa.func.coalesce(EVENTS.token_id, NONE),
        "user": EVENTS.username,
    },
    [
        sa.func.count(),
        sa.func.sum(sa.case((EVENTS.outcome == "ok", 0), else_=1)),
        sa.func.sum(EVENTS.input_tokens),
        sa.func.sum(EVENTS.output_tokens),
    ],
)


def part_sums(part, group_by, start, stop, filters):
    """The part's rows of [start, stop) (`stop` None: no end) that match the filters, added up by the group keys."""
    conditions = [part.dated_by >= start, *matching(part.table, filters)]
    if stop is not None:
        conditions.append(part.dated_by < stop)
    keys = [part.grouped[key] for key in group_by]
    return sa.select(*keys, *part.summed).where(*conditions).group_by(*keys)


def shown_row(group_by, key, sums):
    """A row as the report shows it: its keys' fields (a key of none as null) and its sums."""
    row = {}
    for name, value in zip(group_by, key, strict=True):
        field = GROUP_FIELDS[name]
        row[field] = None if field in NULLABLE_FIELDS and value == NONE else value
    return row | dict(zip(DAY_SUMS, sums, strict=True))


def usage_sums(group_by, since, until, filters):
    """Rows of the fields of the group keys (GROUP_FIELDS, in the order of `group_by`) and the
    sums of requests, errors, input and output tokens, for the calls that ended in [since,
    until) and match `filters` (model, provider_id, token_id, user: a user name; user_id),
    ordered by the keys.

    Each part (the whole days' totals, the partial days' events) is added up by the
    database, and the parts here: a grouping over their union cost the database more than
    each part's.
    """
    first, end = whole_days(since, until)
    ranges = event_ranges(since, until, first, end)
    queries = [part_sums(EVENTS_THEMSELVES, group_by, start, stop, filters) for start, stop in ranges]
    if end is None or first < end:
        queries.append(part_sums(DAILY_TOTALS, group_by, first, end, filters))
    totals = {}
    for query in queries:
        for row in db.session.execute(query):
            key, sums = tuple(row[: len(group_by)]), row[len(group_by) :]
            total = totals.setdefault(key, [0] * len(DAY_SUMS))
            for index, count in enumerate(sums):
                total[index] += count or 0
    return [shown_row(group_by, key, sums) for key, sums in sorted(totals.items())]
