"""Prometheus metrics: GET /metrics, the sum over every gunicorn worker.

Under gunicorn each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR
(gunicorn.conf.py makes and cleans that folder at start), and a scrape through any worker
adds up the files of all of them. Without that variable, as in a single process, the
values are this process's own. prometheus_client reads the variable itself, when it is
imported and when a metric is made.

Label values come only from fixed sets (methods, route templates, provider types, states,
outcomes) or from ids the registry itself knows: never a raw path, key, token, password or
anything else a client typed.
"""

import logging
import os
import time
from functools import cache

import sqlalchemy as sa
from flask import Blueprint, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector

from models import PROVIDER_TYPES, STATES
from storage.providers import provider_counts

log = logging.getLogger(__name__)
metrics_bp = Blueprint("metrics", __name__)
own_metrics = CollectorRegistry(auto_describe=True)

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
UNMATCHED_ROUTE = "unmatched"
UNKNOWN = "unknown"
GATEWAY_OUTCOMES = (
    "ok",
    "client_error",
    "not_found",
    "unavailable",
    "upstream_error",
    "timeout",
    "cancelled",
    "limited",
    "interrupted",
)
REFUSAL_LIMITS = (
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "max_parallel",
    "default_max_parallel",
    "worker_capacity",
)
TOKEN_KINDS = ("prompt", "completion")  # the input and the output tokens
# Counters are doubles: a larger count would lose units, or overflow (a 400-digit one raises,
# a 308-digit one sticks the counter at +Inf). The gateway refuses such usage from upstreams.
MAX_TOKENS = 2**53
LONG_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "registry_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ("method", "route", "status"),
    registry=own_metrics,
)
REQUEST_SECONDS = Histogram(
    "registry_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template.",
    ("method", "route"),
    registry=own_metrics,
)
PROBES = Counter(
    "registry_probes",
    "Health probes of providers, by provider type and outcome.",
    ("type", "outcome"),
    registry=own_metrics,
)
UPSTREAM_SECONDS = Histogram(
    "registry_upstream_request_duration_seconds",
    "Time of one HTTP call to an upstream provider (listing, probe, verification), by provider type.",
    ("type",),
    registry=own_metrics,
)
MANIFEST_SYNCS = Counter(
    "registry_manifest_syncs", "Syncs of one manifest location, by outcome.", ("outcome",), registry=own_metrics
)
FAILED_LOGINS = Counter(
    "registry_failed_logins",
    "Failed authentications, by the kind of credential (password or token).",
    ("credential",),
    registry=own_metrics,
)
GATEWAY_CALLS = Counter(
    "registry_gateway_requests",
    "Model calls through the gateway, by provider type, model and outcome.",
    ("type", "model", "outcome"),
    registry=own_metrics,
)
GATEWAY_CALLS_STARTED = Counter(
    "registry_gateway_requests_started",
    "Model calls through the gateway as they start, by provider type and model: less "
    "registry_gateway_requests_total, the calls in flight or cut off by a worker's death.",
    ("type", "model"),
    registry=own_metrics,
)
GATEWAY_SECONDS = Histogram(
    "registry_gateway_request_duration_seconds",
    "Time of a gateway call to its end (the whole stream when streaming), by provider type and model.",
    ("type", "model"),
    buckets=LONG_CALL_BUCKETS,
    registry=own_metrics,
)
GATEWAY_FIRST_CHUNK_SECONDS = Histogram(
    "registry_gateway_time_to_first_chunk_seconds",
    "Time from a streaming gateway call to its first chunk, by provider type and model.",
    ("type", "model"),
    buckets=LONG_CALL_BUCKETS,
    registry=own_metrics,
)
GATEWAY_TOKENS = Counter(
    "registry_gateway_tokens",
    "Usage tokens the upstreams reported for gateway calls, by provider type, model and direction "
    "(kind prompt: input, completion: output), as the usage events count them.",
    ("type", "model", "kind"),
    registry=own_metrics,
)
GATEWAY_REFUSALS = Counter(
    "registry_gateway_refusals",
    "Gateway calls refused before any provider was called, by the limit that refused them.",
    ("limit",),
    registry=own_metrics,
)
USAGE_EVENTS_DROPPED = Counter(
    "registry_usage_events_dropped",
    "Usage events dropped unwritten, by reason: backlog (the oldest, while the database refused "
    "them for too long) or unstorable (the database refused them as they were).",
    ("reason",),
    registry=own_metrics,
)


def known_or_unknown(value, known):
    return value if value in known else UNKNOWN


# Requests


def route_template(served):
    return served.url_rule.rule if served.url_rule is not None else UNMATCHED_ROUTE


def start_timer():
    g.metrics_started = time.perf_counter()


@cache
def request_series(method, route, status):
    """The request counter and duration histogram of one kind of answer. labels() checks and
    locks on every call; these label values are few (methods, route templates, statuses)."""
    return REQUESTS.labels(method, route, str(status)), REQUEST_SECONDS.labels(method, route)


def count_request(response):
    served = request._get_current_object()  # one read through the proxy, not one per attribute
    requests, seconds = request_series(
        known_or_unknown(served.method, HTTP_METHODS), route_template(served), response.status_code
    )
    requests.inc()
    started = g.pop("metrics_started", None)
    if started is not None:
        seconds.observe(time.perf_counter() - started)
    return response


def init_metrics(app):
    """Count and time every request, and serve /metrics; REGISTRY_METRICS=false leaves both out."""
    if not app.config["METRICS"]:
        return
    app.before_request(start_timer)
    app.after_request(count_request)
    app.register_blueprint(metrics_bp)


# What the rest of the registry records: one call each


def count_probe(provider_type, succeeded):
    PROBES.labels(known_or_unknown(provider_type, PROVIDER_TYPES), "success" if succeeded else "failure").inc()


def record_manifest_sync(failed):
    MANIFEST_SYNCS.labels("error" if failed else "ok").inc()


def record_failed_login(credential="password"):
    FAILED_LOGINS.labels(credential).inc()


def observe_upstream_call(provider_type, seconds):
    """Time one HTTP call to an upstream (the listings' observer: upstreams/ is given it)."""
    UPSTREAM_SECONDS.labels(known_or_unknown(provider_type, PROVIDER_TYPES)).observe(seconds)


def gateway_labels(provider_type, model_id):
    return known_or_unknown(provider_type, PROVIDER_TYPES), model_id or UNKNOWN


def record_gateway_call_started(provider_type, model_id):
    """Count a gateway call as it starts, with the labels record_gateway_call will count it by."""
    GATEWAY_CALLS_STARTED.labels(*gateway_labels(provider_type, model_id)).inc()


def record_gateway_call(provider_type, model_id, outcome, seconds, time_to_first_chunk=None, tokens=(None, None)):
    """Count one gateway call (for the gateway's routes).

    `model_id` is the registry model id ("type:upstream id") as the model index knows it,
    or None when the index does not know the requested model: it is then counted as
    "unknown", so a label never holds what a client typed. `outcome` is one of
    GATEWAY_OUTCOMES; `time_to_first_chunk` (seconds) for streams; `tokens` the (input,
    output) tokens the upstream reported, each None when it did not.
    """
    if outcome not in GATEWAY_OUTCOMES:
        raise ValueError(f"outcome must be one of {GATEWAY_OUTCOMES}, not {outcome!r}")
    labels = gateway_labels(provider_type, model_id)
    GATEWAY_CALLS.labels(*labels, outcome).inc()
    GATEWAY_SECONDS.labels(*labels).observe(seconds)
    if time_to_first_chunk is not None:
        GATEWAY_FIRST_CHUNK_SECONDS.labels(*labels).observe(time_to_first_chunk)
    for kind, count in zip(TOKEN_KINDS, tokens, strict=True):
        if count and count <= MAX_TOKENS:
            GATEWAY_TOKENS.labels(*labels, kind).inc(count)


def count_dropped_usage_events(count, reason="backlog"):
    USAGE_EVENTS_DROPPED.labels(reason).inc(count)


def record_gateway_refusal(limit):
    """Count a gateway call refused by a limit (one of REFUSAL_LIMITS)."""
    GATEWAY_REFUSALS.labels(known_or_unknown(limit, REFUSAL_LIMITS)).inc()


# The scrape


class ProviderCounts:
    """Providers by type and state, read from the database at each scrape (zeros included,
    so an alert on offline providers has a series to watch from the start). Left out while
    the database does not answer, so the rest of the scrape still reaches Prometheus."""

    def collect(self):
        try:
            stored = provider_counts()
        except sa.exc.SQLAlchemyError as error:
            log.warning(
                "registry_providers left out of /metrics: the database does not answer (%s)", type(error).__name__
            )
            return
        counts = {(provider_type, state): 0 for provider_type in PROVIDER_TYPES for state in STATES}
        for provider_type, state, count in stored:
            counts[(provider_type, state)] = count
        family = GaugeMetricFamily(
            "registry_providers", "Model providers, by type and state.", labels=("type", "state")
        )
        for (provider_type, state), count in counts.items():
            family.add_metric((provider_type, state), count)
        yield family


class Scrape:
    """Everything one scrape shows: every worker's values (or this process's) and the providers."""

    def __init__(self, *collectors):
        self.collectors = collectors

    def collect(self):
        for collector in self.collectors:
            yield from collector.collect()


def values_collector():
    multiprocess_directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return MultiProcessCollector(None, multiprocess_directory) if multiprocess_directory else own_metrics


@metrics_bp.route("/metrics")
def exposition():
    """Prometheus metrics of every worker, in the text exposition format"""
    body = generate_latest(Scrape(values_collector(), ProviderCounts()))
    return current_app.response_class(body, mimetype=None, content_type=CONTENT_TYPE_PLAIN_0_0_4)
