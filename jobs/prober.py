"""The health prober: lists every provider's models, keeping its `state` and the model index true.

A round reads the providers, ends its transaction, probes them all at once in threads
(greenlets under gevent), and writes the outcomes as they arrive in short transactions of
at most WRITE_BATCH providers, so no connection waits on an upstream and the database's
write lock is never held for long. bench/README.md ("The prober") says why threads.
"""

import gc
import logging
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

from flask import current_app

from access.crypto import UnopenableApiKey
from catalog.index import index_rows, list_upstream_models, provider_target
from models import (
    db,
    utcnow,
)
from observability.metrics import count_probe
from storage.connections import no_connection, session_writing
from storage.providers import all_providers, provider_by_id, record_probes
from upstreams import Target, UpstreamError, UpstreamFailure, UpstreamTimeout

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
class Probe:
    """What a probe needs of a provider, read before the probe so no connection waits on it."""

    id: str
    type: str
    state: str
    consecutive_failures: int
    version: int  # as read: a provider edited since then is not written
    upstream: Target | None
    unusable: Exception | None  # why it cannot be probed (a key no configured key opens)


def probe_of(provider):
    try:
        upstream, unusable = provider_target(provider), None
    except UnopenableApiKey as error:  # unusable until the operator restores the key
        upstream, unusable = None, error
    return Probe(
        provider.id,
        provider.type,
        provider.state,
        provider.consecutive_failures,
        provider.version,
        upstream,
        unusable,
    )


def listing_or_error(probe):
    """(upstream models, None) or (None, the error); never raises, so one probe cannot end a round."""
    if probe.unusable is not None:
        return None, probe.unusable
    try:
        return list_upstream_models(probe.upstream), None
    except UpstreamError as error:
        return None, error
    except Exception:
        log.exception("listing the models of provider %s failed unexpectedly", probe.id)
        return None, UpstreamFailure("listing the models failed unexpectedly")


def probe_record(target, error):
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
        "last_error": last_error,
        "listed": error is None,
    }


def write_batch(outcomes):
    """Store a batch of probe outcomes in one transaction of three statements.

    Nothing is stored for a provider edited or deleted since it was read, as the probe may
    have asked its old upstream: the state update is conditional, and the model lists are
    written for the providers it recorded; a failed listing keeps the last list. A probe is
    not an edit: updated_at and version keep their values.

    The batch travels as two JSON parameters, built before the transaction, so each
    statement is one step of the database: bench/README.md ("The prober") says why.
    """
    records = [probe_record(target, error) for target, _, error in outcomes]
    parameters = {
        "checked_at": utcnow(),
        "outcomes": records,
        "target_ids": [target.id for target, _, _ in outcomes],
        "listed_ids": [target.id for target, _, error in outcomes if error is None],
        "index_rows": [
            row for target, models, error in outcomes if error is None for row in index_rows(target.id, models)
        ],
    }
    session_writing()  # any wait for SQLite's write lock first: garbage may be collected meanwhile
    with no_garbage_collection():
        recorded = record_probes(parameters)
        db.session.commit()
    log_state_changes(outcomes, records, recorded)


@contextmanager
def no_garbage_collection():
    """No garbage collection starts in this process meanwhile; one pending runs after.

    A full collection over a round's objects stops every thread for 100 ms or more (a few
    such per round at 3000 providers, and longer with more), so one that started inside a
    write transaction held SQLite's write lock as long (bench/README.md, "The
    prober"). gc is the whole process's: one writer at a time turns it off and on again.
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


def write_outcomes(outcomes):
    for start in range(0, len(outcomes), WRITE_BATCH):
        if start:
            with no_connection():
                time.sleep(PAUSE_BETWEEN_BATCHES)
        write_batch(outcomes[start : start + WRITE_BATCH])


def arrivals(target_of_future, give_up_at, given_up):
    """Outcomes as they arrive, in lists to write at once: when WRITE_BATCH have arrived or
    WRITE_EVERY_SECONDS have passed; at `give_up_at` the probes still running, as `given_up`."""
    pending, arrived, written_at = set(target_of_future), [], time.monotonic()
    while pending and time.monotonic() < give_up_at:
        wait_for = max(min(WRITE_EVERY_SECONDS, give_up_at - time.monotonic()), 0)
        with no_connection():
            done, pending = wait(pending, timeout=wait_for, return_when=FIRST_COMPLETED)
        arrived += [(target_of_future[future], *future.result()) for future in done]
        if len(arrived) >= WRITE_BATCH or time.monotonic() - written_at >= WRITE_EVERY_SECONDS:
            yield arrived
            arrived, written_at = [], time.monotonic()
    yield arrived + [(target_of_future[future], None, given_up) for future in pending]


def probe(targets):
    """Probe every target at once, writing the outcomes in short batches as they arrive."""
    if not targets:
        return
    threads = min(len(targets), MAX_PROBES_AT_ONCE)
    deadline = ROUND_DEADLINE_TIMEOUTS * current_app.config["UPSTREAM_TIMEOUT"] * math.ceil(len(targets) / threads)
    given_up = UpstreamTimeout(f"no answer within {deadline:g} s (timeout)")
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probe")
    try:
        with no_connection():  # the read of the targets ends before the first probe starts
            target_of_future = {pool.submit(listing_or_error, target): target for target in targets}
        for outcomes in arrivals(target_of_future, time.monotonic() + deadline, given_up):
            write_outcomes(outcomes)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def probe_one(provider_id):
    """Probe one provider now (`check`)."""
    provider = provider_by_id(provider_id)
    probe([] if provider is None else [probe_of(provider)])


def probe_all(app):
    started = time.monotonic()
    all_targets = [probe_of(provider) for provider in all_providers()]
    probe(all_targets)
    if all_targets:
        log.info("probed %d providers in %.1f s", len(all_targets), time.monotonic() - started)
