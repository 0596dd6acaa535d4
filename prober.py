"""The health prober: lists every provider's models, keeping its `state` and the model index true.

A round reads the providers, ends its transaction, probes them all at once in threads
(greenlets under gevent), and writes the outcomes as they arrive in short transactions of
at most WRITE_BATCH providers, so no connection waits on an upstream and the database's
write lock is never held for long. bench/README.md ("Why these choices") says why threads.
"""

import gc
import logging
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from flask import current_app

from catalog import index_rows, provider_connection
from crypto import UnopenableApiKey
from metrics import count_probe
from models import (
    PROVIDER_MODELS,
    PROVIDER_ROWS,
    PROVIDERS,
    db,
    providers_of,
    read_connection,
    release_connections,
    utcnow,
)
from upstreams import Connection, UpstreamError, list_models

log = logging.getLogger(__name__)

# One thread per provider up to this many: a round over that many providers that all fail
# to answer costs one upstream timeout; larger ones take a timeout per this many.
MAX_PROBES_AT_ONCE = 1000
# A round gives up on probes still running after this many upstream timeouts (per wave of
# MAX_PROBES_AT_ONCE), whatever an upstream or a name lookup does.
ROUND_DEADLINE_TIMEOUTS = 1.5
WRITE_BATCH = 50  # outcomes per write transaction
# Between two write transactions: a writer waiting for SQLite's lock retries on a backoff
# (up to 100 ms apart), so back-to-back batches could keep it waiting through several.
PAUSE_BETWEEN_BATCHES = 0.05
WRITE_EVERY_SECONDS = 0.5  # outcomes wait at most this long to be written
collection_switch = threading.Lock()  # one no_garbage_collection at a time


@dataclass(frozen=True)
class Target:
    """What a probe needs of a provider, read before the probe so no connection waits on it."""

    id: str
    type: str
    state: str
    consecutive_failures: int
    version: int  # as read: a provider edited since then is not written
    connection: Connection | None
    unusable: Exception | None  # why it cannot be probed (a key no configured key opens)


def target_of(provider):
    try:
        connection, unusable = provider_connection(provider), None
    except UnopenableApiKey as error:  # unusable until the operator restores the key
        connection, unusable = None, error
    return Target(
        provider.id,
        provider.type,
        provider.state,
        provider.consecutive_failures,
        provider.version,
        connection,
        unusable,
    )


def listing_or_error(target):
    """(upstream models, None) or (None, the error); never raises, so one probe cannot end a round."""
    if target.unusable is not None:
        return None, target.unusable
    try:
        return list_models(target.connection), None
    except UpstreamError as error:
        return None, error
    except Exception:
        log.exception("listing the models of provider %s failed unexpectedly", target.id)
        return None, UpstreamError("listing the models failed unexpectedly")


def probe_record(target, error, checked_at):
    """The provider's row after a probe: online after one success, offline after N failures in a row."""
    count_probe(target.type, succeeded=error is None)
    if error is None:
        failures, state, last_error = 0, "online", None
    else:
        failures = target.consecutive_failures + 1
        offline = failures >= current_app.config["PROBE_FAILURES"]
        state, last_error = ("offline" if offline else target.state), str(error)
    return {
        "target_id": target.id,
        "read_version": target.version,
        "state": state,
        "consecutive_failures": failures,
        "last_checked_at": checked_at,
        "last_error": last_error,
    }


def write_batch(outcomes):
    """Store a batch of probe outcomes in one transaction of a few statements.

    Nothing is stored for a provider edited or deleted since it was read, as the probe may
    have asked its old upstream: the state update is conditional, and the model lists are
    written for the providers it recorded. A probe is not an edit: updated_at and version
    keep their values. Rows are built before the transaction, which holds only statements.
    """
    checked_at = utcnow()
    records = [probe_record(target, error, checked_at) for target, _, error in outcomes]
    records_by_statement = (
        (RECORD_FAILURE, [record for record in records if record["last_error"] is not None]),
        (RECORD_SUCCESS, [record for record in records if record["last_error"] is None]),
    )
    rows_of_listed = {target.id: index_rows(target.id, models) for target, models, error in outcomes if error is None}
    with no_garbage_collection():
        for statement, batch in records_by_statement:
            if batch:
                db.session.execute(statement, batch)
        recorded = set(
            db.session.scalars(
                RECORDED, {"target_ids": [record["target_id"] for record in records], "checked_at": checked_at}
            )
        )
        listed = [target_id for target_id in rows_of_listed if target_id in recorded]
        if listed:
            db.session.execute(MODELS_OF_TARGETS, {"target_ids": listed})
            rows = [row for target_id in listed for row in rows_of_listed[target_id]]
            if rows:
                db.session.execute(sa.insert(PROVIDER_MODELS), rows)
        db.session.commit()
    log_state_changes(outcomes, records, recorded)


@contextmanager
def no_garbage_collection():
    """No garbage collection starts in this process meanwhile; one pending runs after.

    A full collection over a round's objects stops every thread for 100 ms or more (a few
    such per round at 3000 providers, and longer with more), so one that started inside a
    write transaction held SQLite's write lock as long (bench/README.md, "write-lock
    hold"). gc is the whole process's: one writer at a time turns it off and on again.
    """
    with collection_switch:
        collecting = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if collecting:
                gc.enable()


def log_state_changes(outcomes, records, recorded):
    for (target, _, _), record in zip(outcomes, records, strict=True):
        if record["state"] != target.state and target.id in recorded:
            last_error = f": {record['last_error']}" if record["last_error"] else ""
            log.warning("provider %s (%s) is now %s%s", target.id, target.type, record["state"], last_error)


RECORD_FAILURE = (
    sa.update(PROVIDERS)
    .where(PROVIDERS.c.id == sa.bindparam("target_id"), PROVIDERS.c.version == sa.bindparam("read_version"))
    .values(
        state=sa.bindparam("state"),
        consecutive_failures=sa.bindparam("consecutive_failures"),
        last_checked_at=sa.bindparam("last_checked_at"),
        last_error=sa.bindparam("last_error"),
        updated_at=PROVIDERS.c.updated_at,
    )
)
RECORD_SUCCESS = RECORD_FAILURE.values(models_listed_at=sa.bindparam("last_checked_at"))
RECORDED = sa.select(PROVIDERS.c.id).where(
    PROVIDERS.c.id.in_(sa.bindparam("target_ids", expanding=True)),
    PROVIDERS.c.last_checked_at == sa.bindparam("checked_at"),
)
MODELS_OF_TARGETS = sa.delete(PROVIDER_MODELS).where(
    PROVIDER_MODELS.c.provider_id.in_(sa.bindparam("target_ids", expanding=True))
)


def write_outcomes(outcomes):
    for start in range(0, len(outcomes), WRITE_BATCH):
        if start:
            time.sleep(PAUSE_BETWEEN_BATCHES)
        write_batch(outcomes[start : start + WRITE_BATCH])


def arrivals(target_of_future, give_up_at, given_up):
    """Outcomes as they arrive, in lists to write at once: when WRITE_BATCH have arrived or
    WRITE_EVERY_SECONDS have passed; at `give_up_at` the probes still running, as `given_up`."""
    pending, arrived, written_at = set(target_of_future), [], time.monotonic()
    while pending and time.monotonic() < give_up_at:
        wait_for = max(min(WRITE_EVERY_SECONDS, give_up_at - time.monotonic()), 0)
        done, pending = wait(pending, timeout=wait_for, return_when=FIRST_COMPLETED)
        arrived += [(target_of_future[future], *future.result()) for future in done]
        if len(arrived) >= WRITE_BATCH or time.monotonic() - written_at >= WRITE_EVERY_SECONDS:
            yield arrived
            arrived, written_at = [], time.monotonic()
    yield arrived + [(target_of_future[future], None, given_up) for future in pending]


def probe(targets):
    """Probe every target at once, writing the outcomes in short batches as they arrive."""
    release_connections()
    if not targets:
        return
    threads = min(len(targets), MAX_PROBES_AT_ONCE)
    deadline = ROUND_DEADLINE_TIMEOUTS * current_app.config["UPSTREAM_TIMEOUT"] * math.ceil(len(targets) / threads)
    given_up = UpstreamError(f"no answer within {deadline:g} s (timeout)")
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probe")
    try:
        target_of_future = {pool.submit(listing_or_error, target): target for target in targets}
        for outcomes in arrivals(target_of_future, time.monotonic() + deadline, given_up):
            write_outcomes(outcomes)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def targets(query):
    """Targets of the providers `query` (of PROVIDER_ROWS) selects; the read's transaction ends with it."""
    found = [target_of(provider) for provider in providers_of(read_connection().execute(query))]
    release_connections()
    return found


def probe_one(provider_id):
    """Probe one provider now (`check`)."""
    probe(targets(PROVIDER_ROWS.where(PROVIDERS.c.id == provider_id)))


def probe_all(app):
    started = time.monotonic()
    all_targets = targets(PROVIDER_ROWS)
    probe(all_targets)
    if all_targets:
        log.info("probed %d providers in %.1f s", len(all_targets), time.monotonic() - started)
