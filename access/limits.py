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

import atexit
import logging
import math
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from itertools import groupby
from operator import attrgetter

import sqlalchemy as sa
from flask import Flask, current_app, g, request

from access.auth import auth
from api.errors import LimitExceeded
from models import utcnow
from observability.metrics import record_gateway_refusal
from storage import limits as ledger
from storage.connections import direct_transaction, no_connection

log = logging.getLogger(__name__)

# The WSGI environ's flag asking the server to close the connection after this answer
# (serving/worker.py): a refused flood of calls gives its connections back at once.
CLOSE_CONNECTION_KEY = "registry.close_connection"
# Seconds between two deletions of a token's rows that no window counts any more, per process.
PRUNE_INTERVAL = 10
# Seconds the first end of a batch waits for others before they are written together.
WRITE_DELAY = 0.05
PRUNED_MEMORY = 10000


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


@dataclass(frozen=True, eq=False)  # each end is itself: two alike are two calls
class CallEnd:
    app: Flask
    token_id: str
    admitted_in: datetime | None  # the bucket of its slot, if it has one
    tokens: int
    ended_at: datetime


class CallEnds:
    """The ends of limited tokens' calls, written off the calls' path (none waits for them, no
    transaction runs while a call streams) by a thread of this process, in batches: the
    first end waits WRITE_DELAY for others to join it. Until an end is written, this
    process's admissions count it (`pending`); another process may see its slot held that
    much longer."""

    def __init__(self):
        self._waiting = []
        self._writing = []
        self._condition = threading.Condition()
        self._writer = None
        self._pruned_at = {}  # token id -> when this process last deleted its old rows

    def add(self, end):
        with self._condition:
            self._waiting.append(end)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_forever, name="limit-ends", daemon=True)
                self._writer.start()
            self._condition.notify()

    def pending(self, token_id):
        """(slots, tokens) of the token's calls ended in this process and not yet written."""
        with self._condition:
            ends = [end for end in self._waiting + self._writing if end.token_id == token_id]
        return sum(end.admitted_in is not None for end in ends), sum(end.tokens for end in ends)

    def flush(self):
        """Write what is waiting now, in this thread (at the process's exit)."""
        self._write(self._take())

    def _take(self):
        """The ends waiting, now being written."""
        with self._condition:
            taken, self._waiting = self._waiting, []
            self._writing += taken
        return taken

    def _write_forever(self):
        while True:
            with self._condition:
                while not self._waiting:
                    self._condition.wait()
            time.sleep(WRITE_DELAY)  # the calls that end meanwhile join the batch
            self._write(self._take())

    def _write(self, ends):
        """Write ends in transactions of their own, one per app. One that fails is logged: its
        slots then expire by themselves."""
        for app, batch in groupby(ends, key=attrgetter("app")):
            batch = list(batch)
            with app.app_context():
                try:
                    with direct_transaction() as transaction:
                        self._write_in(transaction, batch)
                except sa.exc.SQLAlchemyError as error:
                    log.warning("could not write the ends of %d calls (their slots expire): %s", len(batch), error)
                except Exception:
                    log.exception("could not write the ends of %d calls (their slots expire)", len(batch))

    def _write_in(self, transaction, ends):
        """Write taken ends in a transaction committed right after. They stop counting as
        pending before the commit: on SQLite an admission, which waits for the write lock
        the transaction holds, then finds them in the database; elsewhere one that reads
        meanwhile counts their slots as still held, which refuses, never admits, too many."""
        try:
            ledger.write_ends(transaction, ends, self._due_for_pruning(ends), slot_lifetime())
        finally:
            with self._condition:
                self._writing = [end for end in self._writing if end not in ends]

    def _due_for_pruning(self, ends):
        """The tokens of the ends whose old rows this process has not deleted for a while."""
        now = time.monotonic()
        due = {end.token_id for end in ends if self._pruned_at.get(end.token_id, 0) < now - PRUNE_INTERVAL}
        self._pruned_at.update(dict.fromkeys(due, now))
        if len(self._pruned_at) > PRUNED_MEMORY:
            self._pruned_at.clear()
        return due


call_ends = CallEnds()
atexit.register(call_ends.flush)


@dataclass
class Admission:
    """A call let in: its place among this worker's calls, and for a limited token its
    admission in the database, both given back once by `end`."""

    app: Flask
    in_flight: InFlight
    caller_key: tuple | None
    token_id: str | None = None  # a limited token's, once admitted within its limits
    admitted_in: datetime | None = None
    ended: bool = field(default=False)

    def end(self, tokens=0):
        if self.ended:
            return
        self.ended = True
        self.in_flight.leave(self.caller_key)
        if self.token_id is not None:
            call_ends.add(CallEnd(self.app, self.token_id, self.admitted_in, tokens, utcnow()))


def init_limits(app):
    app.extensions["limits"] = InFlight(app.config["GATEWAY_CALLS_PER_WORKER"], app.config["DEFAULT_MAX_PARALLEL"])


def with_rate_limit_headers(response):
    """A gateway answer of a limited token carries its x-ratelimit-* headers; a call still
    running when its answer closes (never iterated, or an error on the way) is ended then."""
    headers = g.get("rate_limit_headers")
    if headers:
        response.headers.extend(headers)
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
            # The admission takes a connection of its own: the request's are given back first,
            # or a burst of calls, each holding one while it waits for another, empties the pool.
            with no_connection():
                admit_within_token_limits(call.admission, caller.token_id, caller.limits)
    except LimitExceeded:
        request.environ[CLOSE_CONNECTION_KEY] = True
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
    with only token limits is read: its limits admit a call while the tokens are below them.
    A change of its limits since the request's credentials were read applies."""
    now = utcnow()
    names = ledger.limit_names_of(limits)
    window_of = partial(ledger.window_of, slot_lifetime=slot_lifetime())
    if limits.requests_per_minute is None and limits.max_parallel is None:
        limits, window, exceeded = judged(window_of, token_id, names, now)
    else:
        with ledger.locked_token(token_id) as transaction:
            limits, window, exceeded = judged(partial(window_of, transaction=transaction), token_id, names, now)
            if limits and not exceeded:
                admission.admitted_in = ledger.admit(transaction, token_id, now)
    if not limits:  # gone, or its limits lifted meanwhile
        return
    g.rate_limit_headers = rate_limit_headers(limits, window, now, admitted=not exceeded)
    if exceeded:
        raise over_limits(token_id, exceeded, limits, window, now)
    admission.token_id = token_id


def slot_lifetime():
    """How long a slot counts if its process dies before its call ends."""
    return timedelta(seconds=current_app.config["GATEWAY_TIMEOUT"]) + ledger.SLOT_MARGIN


def judged(window_of, token_id, limit_names, now):
    """(limits, window, the names of the limits the call is over) of the token now, this
    process's ends not yet written included; (None, None, None) when the token is gone."""
    read = window_of(token_id, limit_names, now)
    if read is not None and ledger.limit_names_of(read[0]) - limit_names:  # limits added meanwhile
        read = window_of(token_id, ledger.limit_names_of(read[0]), now)
    if read is None:
        return None, None, None
    limits, window = read
    slots, tokens = call_ends.pending(token_id)
    if slots or tokens:
        window = replace(
            window,
            in_flight=window.in_flight - slots,
            minute_tokens=window.minute_tokens + tokens,
            day_tokens=window.day_tokens + tokens,
        )
    return limits, window, exceeded_limits(limits, window)


def exceeded_limits(limits, window):
    """The names of the limits the window has reached."""
    used = {
        "requests_per_minute": window.requests,
        "max_parallel": window.in_flight,
        "tokens_per_minute": window.minute_tokens,
        "tokens_per_day": window.day_tokens,
    }
    return [
        name for name, count in used.items() if getattr(limits, name) is not None and count >= getattr(limits, name)
    ]


def seconds_until(moment, now):
    return max(1, math.ceil((moment - now).total_seconds()))


def waits(token_id, exceeded, limits, window, now):
    """{limit name: seconds until it would admit a call} of each limit the call is over."""
    seconds = {}
    for name in exceeded:
        if name == "max_parallel":
            seconds[name] = 1  # a slot comes free when a call ends
        else:
            counted = getattr(window, ledger.COUNTED[name][2])
            seconds[name] = seconds_until(below_limit_at(token_id, name, counted, getattr(limits, name), now), now)
    return seconds


def below_limit_at(token_id, limit_name, counted, limit, now):
    """When the window's count will have fallen below the limit, its oldest buckets gone
    (the tokens of this process's ends not yet written last: they are in the current bucket)."""
    window_length = ledger.COUNTED[limit_name][1]
    span = timedelta(seconds=ledger.SPANS[window_length])
    for starts_at, bucket_count in ledger.buckets_of(token_id, limit_name, now):
        counted -= bucket_count
        if counted < limit:
            return starts_at + span + window_length
    return ledger.bucket_start(now, span.seconds) + span + window_length


def over_limits(token_id, exceeded, limits, window, now):
    """The refusal of a call over the token's limits: Retry-After when every one admits it."""
    exceeded = waits(token_id, exceeded, limits, window, now)
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
        oldest_bucket = window.oldest_request_bucket or ledger.bucket_start(now, ledger.SECOND_SPAN)
        leaves_at = oldest_bucket + timedelta(seconds=ledger.SECOND_SPAN) + ledger.MINUTE
        headers.update(
            {
                "x-ratelimit-limit-requests": str(limits.requests_per_minute),
                "x-ratelimit-remaining-requests": str(max(0, limits.requests_per_minute - used)),
                "x-ratelimit-reset-requests": duration((leaves_at - now).total_seconds()),
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
