"""The usage report at scale: GET /api/v1/usage over a million usage events.

The events are written as the gateway's are (the recorder's batches: events and daily
totals), spread over --days days before now (90, the default retention, or 30: all of
them in the month the report reads), by 50 tokens of 20 users (and their passwords) over
10 models of 2 providers each. Then, in one process through Flask's test client (the
whole request: authentication, schema, query, dump), the median of --runs reports of the
last 30 days: by day and model (the target: 200 ms), by token, one user's own, and one
with an `until` (two partial days). And the time of one batch's write, on SQLite the
longest the recorder holds the write lock.

    .venv/bin/python bench/usage.py [--events 1000000] [--days 90] [--runs 15]
        [--database-url postgresql+psycopg://user:password@host/database]

On PostgreSQL the URL names an existing database the role may create databases beside:
the benchmark makes its own and drops it afterwards.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa
from flask_migrate import upgrade
from werkzeug.security import generate_password_hash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import create_app  # noqa: E402
from models import User, db, utcnow  # noqa: E402
from observability.usage import BATCH_SIZE  # noqa: E402
from tests.conftest import CHEAP_HASH_METHOD, basic_auth  # noqa: E402

USAGE = "/api/v1/usage"
TOKENS = [str(uuid.UUID(int=number)) for number in range(50)]
USERS = [f"user-{number}" for number in range(20)]
MODELS = [f"openai:model-{number}" for number in range(10)]
PROVIDERS = [str(uuid.UUID(int=1000 + number)) for number in range(4)]
RECORD_CHUNK = 20_000  # events recorded between two flushes (the recorder holds at most 50,000)
TARGET_MS = 200


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90, help="the events are spread over this many days before now")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--database-url", help="PostgreSQL (default: a SQLite file in a temporary folder)")
    return parser.parse_args()


def event_at(at, rng):
    """An event as the gateway records it: a token's call (its owner's), or a password's."""
    token = rng.randrange(len(TOKENS) + 5)
    user = token % len(USERS)
    model = rng.randrange(len(MODELS))
    failed = rng.random() < 0.03
    return {
        "created_at": at,
        "day": at.date(),
        "token_id": TOKENS[token] if token < len(TOKENS) else None,
        "user_id": user + 1,
        "username": USERS[user],
        "provider_id": PROVIDERS[model % 2 + 2 * rng.randrange(2)],
        "model": MODELS[model],
        "endpoint": "chat.completions",
        "input_tokens": None if failed else rng.randrange(50, 4000),
        "output_tokens": None if failed else rng.randrange(10, 800),
        "outcome": "502" if failed else "ok",
        "duration_seconds": 1.0,
        "first_chunk_seconds": 0.2,
    }


class PostgresDatabase:
    """A database of the benchmark's own beside the one the URL names, dropped at the end."""

    def __init__(self, url):
        self.url = sa.make_url(url)
        self.server = sa.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        self.name = f"usage_bench_{os.getpid()}"
        self.execute(f'CREATE DATABASE "{self.name}"')

    def execute(self, statement):
        with self.server.connect() as connection:
            connection.exec_driver_sql(statement)

    def app_url(self):
        return self.url.set(database=self.name).render_as_string(hide_password=False)

    def drop(self):
        self.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.server.dispose()


def migrated_app(instance, database_url):
    """The app on a migrated database with the users (each one's password its name) and an admin."""
    settings = {"REGISTRY_INSTANCE_PATH": instance, "REGISTRY_VERIFY_ON_CREATE": "false"}
    if database_url:
        settings["DATABASE_URL"] = database_url
    app = create_app(settings)
    with app.app_context():
        upgrade()
        for user_id, username in enumerate([*USERS, "admin"], start=1):
            password_hash = generate_password_hash(username, method=CHEAP_HASH_METHOD)
            role = "admin" if username == "admin" else "service"
            db.session.add(User(id=user_id, username=username, role=role, password_hash=password_hash))
        db.session.commit()
    return app


def record_events(app, count, days):
    """Write `count` events spread evenly over the `days` before now, through the recorder."""
    rng = random.Random(11)
    recorder = app.extensions["usage"]
    now = utcnow()
    step = timedelta(days=days) / count
    for start in range(0, count, RECORD_CHUNK):
        for number in range(start, min(start + RECORD_CHUNK, count)):
            recorder.record(event_at(now - timedelta(days=days) + number * step, rng))
        assert recorder.flush(), "the database refused the events"


def batch_ms(app, runs):
    """The median time of writing one batch of the recorder's (of calls that just ended)."""
    rng = random.Random(12)
    recorder = app.extensions["usage"]
    times = []
    for _ in range(runs):
        for _ in range(BATCH_SIZE):
            recorder.record(event_at(utcnow(), rng))
        started = time.perf_counter()
        assert recorder.flush(), "the database refused the events"
        times.append(time.perf_counter() - started)
    recorder.stop()
    return statistics.median(times) * 1000


def median_ms(client, runs, **query):
    times, rows = [], None
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(USAGE, query_string=query)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, response.get_json()
        rows = response.get_json()["items"]
    return statistics.median(times) * 1000, len(rows)


def client_of(app, username):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = basic_auth(username, username)
    return client


def reports():
    """(what, whose credentials, query) of each report timed; the first is the target's."""
    until = (utcnow() - timedelta(hours=12)).isoformat() + "Z"
    return [
        ("a month by day and model, everyone's", "admin", {"group_by": "day,model"}),
        ("a month by token, everyone's", "admin", {"group_by": "token"}),
        ("a month by day and model, one user's own", USERS[3], {"group_by": "day,model"}),
        (
            "a month to 12 hours ago (two partial days), by day and model",
            "admin",
            {"group_by": "day,model", "until": until},
        ),
    ]


def measure(app, options, dialect):
    started = time.perf_counter()
    record_events(app, options.events, options.days)
    print(
        f"{dialect}: {options.events} events over {options.days} days written in {time.perf_counter() - started:.0f} s"
    )
    print(f"one batch of {BATCH_SIZE} events written in {batch_ms(app, options.runs):.1f} ms")
    with app.app_context():
        print(f"daily totals: {db.session.execute(sa.text('SELECT count(*) FROM usage_days')).scalar()} rows")
        db.session.remove()
    for number, (what, username, query) in enumerate(reports()):
        milliseconds, rows = median_ms(client_of(app, username), options.runs, **query)
        print(f"{what}: {milliseconds:.0f} ms, {rows} rows" + ("" if number else f" (target {TARGET_MS} ms)"))


def main():
    options = arguments()
    postgres = PostgresDatabase(options.database_url) if options.database_url else None
    try:
        with tempfile.TemporaryDirectory(prefix="usage-bench-") as instance:
            app = migrated_app(instance, postgres and postgres.app_url())
            measure(app, options, "PostgreSQL" if postgres else "SQLite")
            with app.app_context():
                db.engine.dispose()
    finally:
        if postgres:
            postgres.drop()


if __name__ == "__main__":
    main()
