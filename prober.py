"""The health prober: lists every provider's models, keeping its `state` and the model index true.

A round reads the providers, ends its transaction, probes them all at once in threads
(greenlets under gevent), and writes the outcomes as they arrive in short transactions of
at most WRITE_BATCH providers, so no connection waits on an upstream and the database's
write lock is never held for long. README ("The prober") says why threads.
"""

import logging
import math
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from flask import current_app

from catalog import provider_connection, replace_models
from crypto import UnopenableApiKey
from errors import UpstreamError
from models import PROVIDERS, ModelProvider, db, release_connections, utcnow
from scheduler import scheduler
from upstreams import Connection, list_models

log = logging.getLogger(__name__)

# One thread per provider up to this many: a round over that many providers that all fail
# to answer costs one upstream timeout; larger ones take a timeout per this many.
MAX_PROBES_AT_ONCE = 1000
# A round gives up on probes still running after this many upstream timeouts (per wave of
# MAX_PROBES_AT_ONCE), whatever an upstream or a name lookup does.
ROUND_DEADLINE_TIMEOUTS = 1.5
WRITE_BATCH = 100  # outcomes per write transaction
WRITE_EVERY_SECONDS = 0.5  # outcomes wait at most this long to be written


@dataclass(frozen=True)
class Target:
    """What a probe needs of a provider, read before the probe so no connection waits on it."""

    id: str
    type: str
    state: str
    consecutive_failures: int
    updated_at: datetime
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
        provider.updated_at,
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


def record_probe(target, upstream_models, error):
    """Store one probe's outcome: online after one success, offline after N failures in a row.

    Nothing is stored when the provider was changed or deleted since it was read: the probe
    may have asked its old upstream.
    """
    if error is None:
        failures, state, last_error = 0, "online", None
    else:
        failures = target.consecutive_failures + 1
        offline = failures >= current_app.config["PROBE_FAILURES"]
        state, last_error = ("offline" if offline else target.state), str(error)
    # A probe is not an edit: updated_at keeps its value.
    recorded = db.session.execute(
        sa.update(PROVIDERS)
        .where(PROVIDERS.c.id == target.id, PROVIDERS.c.updated_at == target.updated_at)
        .values(
            state=state,
            consecutive_failures=failures,
            last_checked_at=utcnow(),
            last_error=last_error,
            updated_at=PROVIDERS.c.updated_at,
        )
    )
    if recorded.rowcount == 0:
        return
    if error is None:
        replace_models(target.id, upstream_models)
    if state != target.state:
        log.warning(
            "provider %s (%s) is now %s%s", target.id, target.type, state, f": {last_error}" if last_error else ""
        )


def write_outcomes(outcomes):
    for start in range(0, len(outcomes), WRITE_BATCH):
        for target, upstream_models, error in outcomes[start : start + WRITE_BATCH]:
            record_probe(target, upstream_models, error)
        db.session.commit()


def probe(targets):
    """Probe every target at once, writing the outcomes in short batches as they arrive."""
    release_connections()
    if not targets:
        return
    threads = min(len(targets), MAX_PROBES_AT_ONCE)
    timeout = current_app.config["UPSTREAM_TIMEOUT"]
    deadline = ROUND_DEADLINE_TIMEOUTS * timeout * math.ceil(len(targets) / threads)
    give_up_at = time.monotonic() + deadline
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="probe")
    try:
        target_of_future = {pool.submit(listing_or_error, target): target for target in targets}
        pending, arrived, written_at = set(target_of_future), [], time.monotonic()
        while pending and time.monotonic() < give_up_at:
            wait_for = min(WRITE_EVERY_SECONDS, give_up_at - time.monotonic())
            done, pending = wait(pending, timeout=max(wait_for, 0), return_when=FIRST_COMPLETED)
            arrived += [(target_of_future[future], *future.result()) for future in done]
            if len(arrived) >= WRITE_BATCH or time.monotonic() - written_at >= WRITE_EVERY_SECONDS:
                write_outcomes(arrived)
                arrived, written_at = [], time.monotonic()
        given_up = UpstreamError(f"no answer within {deadline:g} s (timeout)")
        write_outcomes(arrived + [(target_of_future[future], None, given_up) for future in pending])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def targets(query):
    """Targets of the providers `query` selects; the session's transaction ends with the read."""
    providers = db.session.scalars(query).all()
    found = [target_of(provider) for provider in providers]
    release_connections()
    return found


def probe_one(provider_id):
    """Probe one provider now (`check`)."""
    probe(targets(sa.select(ModelProvider).where(ModelProvider.id == provider_id)))


@scheduler.job("probe", "PROBE_INTERVAL")
def probe_all(app):
    started = time.monotonic()
    all_targets = targets(sa.select(ModelProvider))
    probe(all_targets)
    if all_targets:
        log.info("probed %d providers in %.1f s", len(all_targets), time.monotonic() - started)
