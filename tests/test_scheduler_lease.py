"""The scheduler lease: one holder per database, however many processes contend for it."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from models import Lease, db
from storage.jobs import release_lease, try_lease

CONTENDERS = 8


def contend(app, holders, rounds, seconds=15):
    """Every holder tries for the lease at the same moment, `rounds` times; the winners of each round."""
    start_together = threading.Barrier(len(holders))

    def rounds_of(holder):
        with app.app_context():
            won = []
            for _ in range(rounds):
                start_together.wait()
                won.append(try_lease("test", holder, seconds))
            db.session.remove()
            return won

    with ThreadPoolExecutor(max_workers=len(holders)) as pool:
        results = dict(zip(holders, pool.map(rounds_of, holders), strict=True))
    return [{holder for holder in holders if results[holder][index]} for index in range(rounds)]


@pytest.fixture
def database_errors(app):
    """Errors the database raises from now on, counted at the engine."""
    errors = []

    def record(context):
        errors.append(context.original_exception)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "handle_error", record)
    yield errors
    sa.event.remove(engine, "handle_error", record)


def holder_of_record(app):
    with app.app_context():
        return db.session.scalar(sa.select(Lease.holder).where(Lease.name == "test"))


def test_of_simultaneous_contenders_exactly_one_holds_the_lease(app):
    holders = [f"worker-{number}" for number in range(CONTENDERS)]
    winners = contend(app, holders, rounds=10)
    assert all(len(round_winners) == 1 for round_winners in winners)
    assert len(set().union(*winners)) == 1
    assert holder_of_record(app) in winners[0]


def test_contenders_for_a_held_lease_cause_no_database_error(app, database_errors):
    with app.app_context():
        assert try_lease("test", "holder", 15)
    winners = contend(app, [f"worker-{number}" for number in range(CONTENDERS)], rounds=5)
    assert winners == [set()] * 5
    assert database_errors == []
    assert holder_of_record(app) == "holder"


def test_an_expired_lease_passes_to_another_holder(app):
    with app.app_context():
        assert try_lease("test", "first", 0.2)
        assert not try_lease("test", "second", 15)
        time.sleep(0.3)
        assert try_lease("test", "second", 15)
        assert not try_lease("test", "first", 15)
    assert holder_of_record(app) == "second"


def test_a_released_lease_is_free_at_once(app):
    with app.app_context():
        assert try_lease("test", "first", 15)
        release_lease("test", "first")
        assert try_lease("test", "second", 15)
