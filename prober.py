"""The health prober: keeps every provider's `state` true to whether its upstream answers."""

import logging
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa
from flask import current_app

from catalog import list_or_error, provider_connection, remember_models
from crypto import UnopenableApiKey
from models import PROVIDER_ROWS, PROVIDERS, db, provider_of, providers_of, read_connection, release_connections, utcnow

log = logging.getLogger(__name__)

PROBE_PARALLELISM = 4


def record_probe(provider, upstream_models, error):
    """Store one probe's outcome: online after one success, offline after N failures in a row."""
    if error is None:
        failures, state, last_error = 0, "online", None
        remember_models(provider, upstream_models)
    else:
        failures = provider.consecutive_failures + 1
        offline = failures >= current_app.config["PROBE_FAILURES"]
        state, last_error = ("offline" if offline else provider.state), str(error)
    if state != provider.state:
        log.warning(
            "provider %s (%s) is now %s%s", provider.id, provider.type, state, f": {last_error}" if last_error else ""
        )
    # A probe is not an edit: updated_at and version keep their values. The outcome is dropped
    # when the provider was edited meanwhile: it was of a base_url or key no longer stored.
    db.session.execute(
        sa.update(PROVIDERS)
        .where(PROVIDERS.c.id == provider.id, PROVIDERS.c.version == provider.version)
        .values(
            state=state,
            consecutive_failures=failures,
            last_checked_at=utcnow(),
            last_error=last_error,
            updated_at=PROVIDERS.c.updated_at,
        )
    )


def connection_or_error(provider):
    try:
        return provider_connection(provider), None
    except UnopenableApiKey as error:  # unusable until the operator restores the key
        return None, error


def attempt(connection_and_error):
    connection, error = connection_and_error
    return (None, error) if error is not None else list_or_error(connection)


def probe(providers):
    connections = [connection_or_error(provider) for provider in providers]
    release_connections()  # none is held while the upstreams answer; the outcomes are written after
    with ThreadPoolExecutor(max_workers=PROBE_PARALLELISM, thread_name_prefix="probe") as pool:
        outcomes = list(pool.map(attempt, connections))
    for provider, (upstream_models, error) in zip(providers, outcomes, strict=True):
        record_probe(provider, upstream_models, error)
    db.session.commit()


def probe_one(provider):
    probe([provider])
    return provider_of(read_connection().execute(PROVIDER_ROWS.where(PROVIDERS.c.id == provider.id)))


def probe_all(app):
    providers = providers_of(read_connection().execute(PROVIDER_ROWS))
    if providers:
        probe(providers)
        log.debug("probed %d providers", len(providers))
