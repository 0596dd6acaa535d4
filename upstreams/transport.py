"""The HTTP transport of upstream calls: a total deadline over all of a call's socket work.

httpx's timeouts bound each read: an upstream trickling a byte at a time, each within the
read timeout, holds a call for as long as it likes. While a `Deadline` bounds a block
(`with deadline.bounding():`), every connect, read and write of the calls made in it (in
that thread or greenlet) waits at most what is left of the deadline, and fails as an httpx
timeout once it has passed. A gateway call enters its one deadline for each piece of socket
work (the request, the answer's reads, each read of a stream); a listing, for all of it.

A gateway call's attempt at one provider (`with deadline.attempt():`) is bounded besides
until the provider starts its answer: its status and headers, or for a stream its first
event. The body of an answer whose headers came is read within `answer_begun()`, bounded by
the deadline alone.

A stream's reads block (httpx's sockets): a caller that must act while the upstream is
silent (keep its own client's connection alive) has the stream read beside it
(`each_within(items, silence=...)`), handed over through a queue it waits on for at most
that silence.
"""

import contextlib
import contextvars
import queue
import time

import httpcore
import httpx

from serving.hub import beside
from upstreams.errors import UpstreamTimeout

# (when the deadline ends, when the answer must have started or None), of the work under way
_bounds = contextvars.ContextVar("upstream_deadline", default=None)
_END = object()
SILENCE = object()  # what each_within(items, silence) yields for each silence of the items


@contextlib.contextmanager
def _bounded(ends_at, answer_by=None):
    token = _bounds.set((ends_at, answer_by))
    try:
        yield
    finally:
        _bounds.reset(token)


class Deadline:
    """The time a piece of upstream work may take in all, however the upstream trickles;
    `timeout`, httpx's timeouts of each request made within it (a connect may have a shorter
    limit of its own: a provider that cannot be reached soon is given up for the next);
    `answer_seconds`, how long one attempt may wait for its answer to start (None: no limit
    but the deadline)."""

    def __init__(self, seconds, connect_seconds=None, answer_seconds=None):
        self.ends_at = time.monotonic() + seconds
        self.timeout = httpx.Timeout(seconds, connect=min(connect_seconds or seconds, seconds))
        self.answer_seconds = answer_seconds

    def remaining(self):
        return self.ends_at - time.monotonic()

    def bounding(self):
        """Bound the socket work of the upstream calls made inside by this deadline."""
        return _bounded(self.ends_at)

    def attempt(self):
        """Bound one provider's attempt: by the deadline, and until its answer starts by
        `answer_seconds` from now."""
        answer_by = None if self.answer_seconds is None else time.monotonic() + self.answer_seconds
        return _bounded(self.ends_at, answer_by)

    def each_within(self, items, silence=None):
        """The iterator's items, each read within the deadline (so each read of a stream is),
        and the iterator closed when they end or when this generator is closed.

        With `silence` (seconds), SILENCE comes instead of an item whenever none came for that
        long: the items are then read beside the caller (ReadBeside).
        """
        if silence:
            yield from ReadBeside(items, self).handed_over(silence)
            return
        with contextlib.closing(items):
            yield from self.read(items)

    def read(self, items):
        while True:
            with self.bounding():
                item = next(items, _END)
            if item is _END:
                return
            yield item


class Ended:
    """The end of the items read beside: the error that ended them, or None."""

    def __init__(self, error):
        self.error = error


class ReadBeside:
    """An iterator's items read beside the caller (serving.hub.beside), each within the
    deadline, and handed over through a queue that the caller waits on for at most a silence
    (and the deadline); the items are closed by their reader, when they end or it is stopped.
    A stopped reader under gevent is interrupted where it waits; a thread stops after the
    item it is reading, whose read keeps the deadline."""

    def __init__(self, items, deadline):
        self.deadline = deadline
        self.queue = queue.SimpleQueue()  # the items, then an Ended
        self.stopped = False
        self.interrupt = beside(self.read, items)

    def read(self, items):
        error = None
        try:
            with contextlib.closing(items):
                for item in self.deadline.read(items):
                    if self.stopped:
                        return
                    self.queue.put(item)
                    time.sleep(0)  # the caller relays the item now, not after every item already received
        except BaseException as failure:  # handed over, or the reader interrupted
            error = failure
        finally:
            self.queue.put(Ended(error))

    def handed_over(self, silence):
        """Each item as it is handed over, SILENCE for each `silence` seconds without one."""
        try:
            while True:
                wait = min(silence, self.deadline.remaining())
                try:
                    item = self.queue.get(timeout=max(wait, 0))
                except queue.Empty:
                    if self.deadline.remaining() <= 0:
                        raise UpstreamTimeout("the stream took longer than the gateway allows") from None
                    yield SILENCE
                    continue
                if isinstance(item, Ended):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            self.stopped = True
            self.interrupt()


def deadline(seconds):
    """Bound the upstream calls made inside to `seconds` in all."""
    return Deadline(seconds).bounding()


def at_most(seconds):
    """Bound the upstream work inside to `seconds`, or to the deadline under way if it ends sooner."""
    bounds = _bounds.get()
    ends_at = time.monotonic() + seconds
    return _bounded(ends_at if bounds is None else min(ends_at, bounds[0]))


def answer_begun():
    """The answer's status and headers came: what is read inside (its body) is bounded by
    the deadline alone, no longer by the wait for the answer to start."""
    bounds = _bounds.get()
    return _bounded(bounds[0]) if bounds is not None else contextlib.nullcontext()


def remaining(timeout, timeout_error):
    """A socket operation's timeout, cut to what is left of the deadline (and of the wait
    for the answer to start)."""
    bounds = _bounds.get()
    if bounds is None:
        return timeout
    ends_at, answer_by = bounds
    left = (ends_at if answer_by is None else min(ends_at, answer_by)) - time.monotonic()
    if left <= 0:
        raise timeout_error("the deadline of the upstream call passed")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream):
        self._stream = stream

    def read(self, max_bytes, timeout=None):
        return self._stream.read(max_bytes, remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer, timeout=None):
        self._stream.write(buffer, remaining(timeout, httpcore.WriteTimeout))

    def close(self):
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        timeout = remaining(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info):
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self):
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        timeout = remaining(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        timeout = remaining(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds):
        self._backend.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport, over a connection pool whose sockets keep the deadline."""

    def __init__(self, limits):
        super().__init__(limits=limits, trust_env=False)
        # httpx takes no network backend, so its pool is built again, as httpx builds it, with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=DeadlineBackend(),
        )
