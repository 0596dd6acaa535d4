"""Usage events: one per gateway call, recorded where the call ends (gateway/call.py) and
written off its path.

Recording appends the event to the process's buffer; a background thread of the process
(a greenlet in a gevent worker) writes what is pending every FLUSH_SECONDS, in batches of
one INSERT each (storage/usage.py), and the rest when the process stops gracefully
(gunicorn's worker_exit hook, and atexit): so no call waits on the database for its
usage, no transaction is open while a call streams, and a killed process loses at most
its last FLUSH_SECONDS of events. A database that refuses a batch keeps it pending for
the next try; past MAX_PENDING events the oldest are dropped, logged and counted.
"""

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from datetime import timedelta

import sqlalchemy as sa

from models import db, utcnow
from observability.metrics import count_dropped_usage_events
from storage.usage import delete_usage_before, insert_usage

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5
# Events per INSERT, and per transaction: on SQLite 500 hold the write lock for 10 to 20 ms.
BATCH_SIZE = 500
# Between two batches of a backlog: a gevent worker's requests run, and other writers take the lock.
PAUSE_BETWEEN_BATCHES = 0.01
MAX_PENDING = 50_000  # per process: at a few hundred calls a second, minutes of a database outage
# What a database that cannot take a batch now raises (down, locked, disk full, no free
# connection): the batch is tried again. Any other error would fail again, so its batch is dropped.
PASSING_FAULTS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


class UsageRecorder:
    """The usage events of one app in this process (app.extensions["usage"]), and the thread
    that writes them, started with the first event."""

    def __init__(self, app):
        self.app = app
        self._pending = deque()
        self._lock = threading.Lock()  # the buffer's
        self._writing = threading.Lock()  # one flush at a time
        self._stop = threading.Event()
        self._thread = None
        self._dropped = 0  # since the last log line that said so
        self._failing = False  # the last batch was refused

    def record(self, event):
        """Keep an event (a dict of its columns) to be written within FLUSH_SECONDS."""
        with self._lock:
            self._pending.append(event)
            self._drop_oldest_over(MAX_PENDING)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="usage-events", daemon=True)
                self._thread.start()
                RECORDERS.add(self)

    def _drop_oldest_over(self, limit):
        excess = len(self._pending) - limit
        for _ in range(excess):
            self._pending.popleft()
        if excess > 0:
            self._dropped += excess
            count_dropped_usage_events(excess)

    def _run(self):
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()

    def flush(self):
        """Write every pending event, batch by batch; stop at a batch the database refuses,
        which stays pending. True when nothing is left pending."""
        with self._writing:
            self._say_dropped()
            while batch := self._take_batch():
                if not self._write(batch):
                    self._give_back(batch)
                    return False
                if self._pending:
                    time.sleep(PAUSE_BETWEEN_BATCHES)
            return True

    def stop(self):
        """Stop the thread and write what is pending (a graceful stop)."""
        self._stop.set()
        self.flush()

    def _take_batch(self):
        with self._lock:
            return [self._pending.popleft() for _ in range(min(BATCH_SIZE, len(self._pending)))]

    def _give_back(self, batch):
        with self._lock:
            self._pending.extendleft(reversed(batch))
            self._drop_oldest_over(MAX_PENDING)

    def _write(self, batch):
        """True when the batch was stored, or dropped as unstorable; False when it should be tried again."""
        with self.app.app_context():
            try:
                insert_usage(batch)
                db.session.commit()
            except PASSING_FAULTS as error:
                db.session.rollback()
                if not self._failing:
                    log.warning("usage events wait for the database: %s", type(error).__name__)
                self._failing = True
                return False
            except Exception:
                db.session.rollback()
                log.exception("%d usage events could not be stored and were dropped", len(batch))
                count_dropped_usage_events(len(batch), "unstorable")
            finally:
                db.session.remove()
        if self._failing:
            log.warning("usage events are stored again")
        self._failing = False
        return True

    def _say_dropped(self):
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        if dropped:
            log.error(
                "dropped the %d oldest usage events: over %d waited for the database in this process",
                dropped,
                MAX_PENDING,
            )


RECORDERS = weakref.WeakSet()  # every recorder whose thread started in this process


@atexit.register
def stop_recording():
    """Write every recorder's pending events: at a worker's graceful exit (gunicorn.conf.py), and at exit."""
    for recorder in list(RECORDERS):
        recorder.stop()


def init_usage(app):
    app.extensions["usage"] = UsageRecorder(app)


def prune_old_usage(app):
    """Delete the usage older than REGISTRY_USAGE_RETENTION_DAYS (whole days of the daily totals)."""
    delete_usage_before(utcnow() - timedelta(days=app.config["USAGE_RETENTION_DAYS"]))
