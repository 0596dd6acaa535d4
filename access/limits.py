"""Limits on gateway calls, checked before any provider is called.

- A token's own limits (requests_per_minute, tokens_per_minute, tokens_per_day,
  max_parallel) are exact across workers and instances: its admissions are made one at a
  time in the database (storage/limits.py), in one short transaction. A token without
  limits costs nothing here but the counters below.
- Calls in flight per caller without a max_parallel of its own (a token, a Basic user):
  REGISTRY_DEFAULT_MAX_PARALLEL, counted in this process (per worker).
- Calls in flight in this worker: at most its gateway share of the worker's connections,
  so the rest stay free for the other routes (/healthz, the API) however busy the gateway.

A call admitted is ended exactly once: by gateway.call.call_finished, which every call
reaches, or else when its answer is closed.
"""

import logging
import math
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import sqlalchemy as sa
from flask import Flask, current_app, g, has_app_context, request

from access.auth import auth
from api.errors import LimitExceeded
from models import db, utcnow
from observability.metrics import record_gateway_refusal
from storage import limits as ledger

log = logging.getLogger(__name__)

# The WSGI environ's flag asking the server to close the connection after this answer
# (serving/worker.py): a refused flood of calls gives its connections back at once.
CLOSE_CONNECTION_KEY = "registry.close_connection"
# A slot whose process died comes back this long after its call's deadline.
SLOT_MARGIN = timedelta(seconds=60)


class InFlight:
    """Gateway calls in flight in this process: at most `capacity` in all, and at most
    `default_max_parallel` per caller without a max_parallel of its own."""

    def __init__(self, capacity, default_max_parallel):
        self.capacity = capacity
        self.default_max_parallel = default_max_parallel
        self._total = 0
        self._by_caller = {}
        self._lock = threading.Lock()

    def enter(self, caller_key):
        """Count a call in, or say which limit refuses it ("worker_capacity", "default_max_parallel")."""
        with self._lock:
            if self._total >= self.capacity:
                return "worker_capacity"
            if caller_key is not None:
                if self._by_caller.get(caller_key, 0) >= self.default_max_parallel:
                    return "default_max_parallel"
                self._by_caller[caller_key] = self._by_caller.get(caller_key, 0) + 1
            self._total += 1
            return None

    def leave(self, caller_key):
        with self._lock:
            self._total -= 1
            if caller_key is not None:
                left = self._by_caller.pop(caller_key) - 1
                if left:
                    self._by_caller[caller_key] = left


def tokens_of(usage):
    """The tokens (input + output) of an OpenAI-shaped usage, 0 when none was reported."""
    usage = usage or {}
    counts = [usage.get(name) for name in ("prompt_tokens", "completion_tokens")]
    counted = [count for count in counts if isinstance(count, int)]
    if counted:
        return sum(counted)
    total = usage.get("total_tokens")
    return total if isinstance(total, int) else 0


@dataclass
class Admission:
    """A call let in: its place among this worker's calls, and for a limited token its
    admission in the database, both given back once by `end`."""

    app: Flask
    in_flight: InFlight
    caller_key: tuple | None
    token_id: str | None = None  # a limited token's, once admitted within its limits
    admission_id: int | None = None
    ended: bool = field(default=False)

    def end(self, usage=None):
        if self.ended:
            return
        self.ended = True
        self.in_flight.leave(self.caller_key)
        if self.token_id is not None:
            self.write_end(tokens_of(usage))

    def write_end(self, tokens):
        """Free the slot and count the tokens: after the call, never while it streams. A
        database that refuses is logged; the slot then expires by itself."""
        with nullcontext() if has_app_context() else self.app.app_context():
            try:
                ledger.end_call(self.token_id, self.admission_id, tokens, utcnow())
                db.session.commit()
            except sa.exc.SQLAlchemyError as error:
                db.session.rollback()
                log.warning("could not end call %s of token %s: %s", self.admission_id, self.token_id, error)


def init_limits(app):
    app.extensions["limits"] = InFlight(app.config["GATEWAY_CALLS_PER_WORKER"], app.config["DEFAULT_MAX_PARALLEL"])
    app.after_request(with_rate_limit_headers)


def with_rate_limit_headers(response):
    """A gateway answer of a limited token carries its x-ratelimit-* headers; a call still
    running when its answer closes (never iterated, or an error on the way) is ended then."""
    headers = g.get("rate_limit_headers")
    if headers:
        response.headers.update(headers)
    admission = g.get("admission")
    if admission is not None and not admission.ended:
        response.call_on_close(admission.end)
    return response


def caller_key(caller):
    """Whose calls in flight the default max_parallel counts, or None for a token with its own."""
    if caller.token_id is None:
        return ("user", caller.id)
    if caller.limits is not None and caller.limits.max_parallel is not None:
        return None
    return ("token", caller.token_id)


def admit(call):
    """Let the gateway call in (call.admission), within its caller's limits and this worker's
    room, or raise LimitExceeded: before any provider is called."""
    caller = auth.current_user()
    in_flight = current_app.extensions["limits"]
    key = caller_key(caller)
    try:
        refusal = in_flight.enter(key)
        if refusal is not None:
            raise refused_in_worker(refusal, in_flight)
        call.admission = g.admission = Admission(current_app._get_current_object(), in_flight, key)
        if caller.limits:
            admit_within_token_limits(call.admission, caller.token_id, caller.limits)
    except LimitExceeded:
        request.environ[CLOSE_CONNECTION_KEY] = True
        raise
    except BaseException:
        db.session.rollback()  # the token's lock, if it was taken
        raise


def refused_in_worker(refusal, in_flight):
    record_gateway_refusal(refusal)
    if refusal == "worker_capacity":
        message = f"The gateway is at its capacity of {in_flight.capacity} calls in flight here; retry in 1 s."
        return LimitExceeded(503, message, refusal, 1)
    message = (
        f"Your calls in flight reached the default max_parallel of {in_flight.default_max_parallel}; "
        "retry when one of them ends."
    )
    return LimitExceeded(429, message, refusal, 1, error_type="requests")


def admit_within_token_limits(admission, token_id, limits):
    """Count the token's call in the database, or refuse it. A token with requests_per_minute
    or max_parallel is locked (its admissions one at a time, everywhere) and gets a row; one
    with only token limits is read: its limits admit a call while the tokens are below them."""
    now = utcnow()
    needs_row = limits.requests_per_minute is not None or limits.max_parallel is not None
    if needs_row:
        limits = ledger.lock_token_limits(token_id)  # what the token has now, under its lock
        if not limits:
            db.session.commit()
            return
    window = ledger.window_of(token_id, limits, now, locked=needs_row)
    exceeded = exceeded_limits(token_id, limits, window, now)
    g.rate_limit_headers = rate_limit_headers(limits, window, now, admitted=not exceeded)
    if exceeded:
        db.session.commit()
        raise over_limits(exceeded, limits, window)
    if limits.requests_per_minute is not None or limits.max_parallel is not None:
        slot_expires_at = None
        if limits.max_parallel is not None:
            slot_expires_at = now + timedelta(seconds=current_app.config["GATEWAY_TIMEOUT"]) + SLOT_MARGIN
        admission.admission_id = ledger.admit(token_id, now, slot_expires_at)
    db.session.commit()
    admission.token_id = token_id


def seconds_until(moment, now):
    return max(1, math.ceil((moment - now).total_seconds()))


def exceeded_limits(token_id, limits, window, now):
    """{limit name: seconds until it would admit a call} of each limit the call is over."""
    exceeded = {}
    if limits.requests_per_minute is not None and window.requests >= limits.requests_per_minute:
        leaving = ledger.nth_oldest_request(token_id, now, window.requests - limits.requests_per_minute)
        exceeded["requests_per_minute"] = seconds_until(leaving + ledger.MINUTE, now)
    if limits.max_parallel is not None and window.in_flight >= limits.max_parallel:
        exceeded["max_parallel"] = 1  # a slot comes free when a call ends
    for name, tokens, window_length in (
        ("tokens_per_minute", window.minute_tokens, ledger.MINUTE),
        ("tokens_per_day", window.day_tokens, ledger.DAY),
    ):
        limit = getattr(limits, name)
        if limit is not None and tokens >= limit:
            exceeded[name] = seconds_until(below_limit_at(token_id, window_length, tokens, limit, now), now)
    return exceeded


def below_limit_at(token_id, window_length, tokens, limit, now):
    """When the window's tokens will have fallen below the limit, its oldest buckets gone."""
    span = timedelta(seconds=ledger.SPANS[window_length])
    for starts_at, bucket_tokens in ledger.token_buckets(token_id, window_length, now):
        tokens -= bucket_tokens
        if tokens < limit:
            return starts_at + span + window_length
    return now


def over_limits(exceeded, limits, window):
    """The refusal of a call over the token's limits: Retry-After when every one admits it."""
    longest = max(exceeded, key=exceeded.get)
    record_gateway_refusal(longest)
    reasons = "; ".join(limit_reason(name, limits, window) for name in exceeded)
    message = f"This token is over its limits: {reasons}. Retry in {exceeded[longest]} s."
    error_type = "tokens" if longest.startswith("tokens_") else "requests"
    return LimitExceeded(429, message, longest, exceeded[longest], error_type=error_type)


def limit_reason(name, limits, window):
    limit = getattr(limits, name)
    used = {
        "requests_per_minute": f"{window.requests} calls in the last 60 s",
        "max_parallel": f"{window.in_flight} calls in flight",
        "tokens_per_minute": f"{window.minute_tokens} tokens in the last 60 s",
        "tokens_per_day": f"{window.day_tokens} tokens in the last 24 h",
    }[name]
    return f"{name} {limit} ({used})"


def duration(seconds):
    """OpenAI's form of a reset time: 45s, 6m0s, 23h59m0s."""
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def rate_limit_headers(limits, window, now, admitted):
    """OpenAI's x-ratelimit-* headers for the token's request and token limits (the tokens'
    of the minute, else of the day). Reset: until the window's oldest call or tokens leave it."""
    headers = {}
    if limits.requests_per_minute is not None:
        used = window.requests + admitted
        oldest = window.oldest_request or now
        headers.update(
            {
                "x-ratelimit-limit-requests": str(limits.requests_per_minute),
                "x-ratelimit-remaining-requests": str(max(0, limits.requests_per_minute - used)),
                "x-ratelimit-reset-requests": duration((oldest + ledger.MINUTE - now).total_seconds()),
            }
        )
    tokens_limits = (
        (limits.tokens_per_minute, window.minute_tokens, window.oldest_minute_bucket, ledger.MINUTE),
        (limits.tokens_per_day, window.day_tokens, window.oldest_day_bucket, ledger.DAY),
    )
    for limit, tokens, oldest_bucket, window_length in tokens_limits:
        if limit is not None:
            span = timedelta(seconds=ledger.SPANS[window_length])
            leaves_at = oldest_bucket + span + window_length if oldest_bucket else now
            headers.update(
                {
                    "x-ratelimit-limit-tokens": str(limit),
                    "x-ratelimit-remaining-tokens": str(max(0, limit - tokens)),
                    "x-ratelimit-reset-tokens": duration((leaves_at - now).total_seconds()),
                }
            )
            break
    return headers
