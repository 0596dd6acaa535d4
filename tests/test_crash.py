"""SIGKILL in the middle of a stream of creates loses no create that was answered 201."""

import itertools
import signal
import sqlite3
import threading
import time

import httpx
import pytest
import sqlalchemy as sa

from models import db
from tests.conftest import SQLITE_ONLY, TEST_DATABASE_URL, provider_body

PROVIDERS = "/api/v1/model_providers"
WRITERS = 4
ANSWERED_BEFORE_KILL = 80


class CreateStream:
    """Writers that create providers back to back until the server goes away."""

    def __init__(self, server):
        self.server = server
        self.numbers = itertools.count()
        self.answered_ids = []
        self.unexpected = []
        self.failures = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.write) for _ in range(WRITERS)]

    def write(self):
        with self.server.client("admin") as admin:
            while True:
                body = provider_body(base_url=f"https://crash{next(self.numbers)}.example.com/v1")
                try:
                    response = admin.post(PROVIDERS, json=body)
                except httpx.TransportError as error:
                    with self.lock:
                        self.failures.append(error)
                    return
                with self.lock:
                    if response.status_code == 201:
                        self.answered_ids.append(response.json()["id"])
                    else:
                        self.unexpected.append(response)

    def run_until_answered(self, count, timeout=60):
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + timeout
        while len(self.answered_ids) < count and time.monotonic() < deadline:
            time.sleep(0.005)

    def join(self):
        for thread in self.threads:
            thread.join(timeout=30)
        with self.lock:
            assert not self.unexpected, [response.text for response in self.unexpected]
            return list(self.answered_ids), list(self.failures)


def test_every_create_answered_201_survives_sigkill(start_gunicorn, instance_path):
    stream = CreateStream(start_gunicorn(workers=2))
    stream.run_until_answered(ANSWERED_BEFORE_KILL)
    stream.server.kill(signal.SIGKILL)
    answered_ids, failures = stream.join()
    assert len(answered_ids) >= ANSWERED_BEFORE_KILL
    # Every writer was still sending creates when the server died: only the kill ended them.
    assert len(failures) == WRITERS

    with start_gunicorn(workers=2).client("reader") as reader:
        listed = reader.get(PROVIDERS, params={"limit": 1000}).json()
    stored_ids = {item["id"] for item in listed["items"]}
    assert set(answered_ids) <= stored_ids
    assert len(stored_ids) <= len(answered_ids) + WRITERS  # at most the ones in flight were added unanswered

    if not TEST_DATABASE_URL:  # PostgreSQL checks its own pages; SQLite is asked here
        with sqlite3.connect(instance_path / "registry.db") as database:
            assert database.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def pragma(app, name):
    with app.app_context():
        return db.session.execute(sa.text(f"PRAGMA {name}")).scalar()


@SQLITE_ONLY
def test_connections_use_wal_and_sync_at_checkpoints_by_default(app):
    """WAL keeps readers off the writer's back; NORMAL survives a killed process (above)."""
    assert pragma(app, "journal_mode") == "wal"
    assert pragma(app, "synchronous") == 1  # NORMAL


@SQLITE_ONLY
def test_full_sync_of_every_commit_can_be_chosen(make_app):
    assert pragma(make_app(REGISTRY_SQLITE_SYNCHRONOUS="full"), "synchronous") == 2  # FULL


def test_an_unknown_sync_setting_stops_the_start(make_app):
    with pytest.raises(RuntimeError, match="REGISTRY_SQLITE_SYNCHRONOUS must be one of NORMAL, FULL"):
        make_app(REGISTRY_SQLITE_SYNCHRONOUS="off")
