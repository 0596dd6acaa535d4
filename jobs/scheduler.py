"""Background work with one owner per database: the prober and the manifest sync.

The scheduler's thread runs in the jobs process (`python -m jobs`, which gunicorn's master
starts beside its workers), never in a worker nor from a route; the jobs are registered by
create_app. Each tick, the thread tries to take or renew the lease row "scheduler"; only
the holder runs jobs, so one database gets one prober however many instances serve it.
Job start times are stored too, so a new holder keeps the same rhythm, and a job that runs
at start runs once per server start.
"""

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from models import db, utcnow
from storage.jobs import claim_if_due, release_lease, try_lease

log = logging.getLogger(__name__)

SCHEDULER_LEASE = "scheduler"
TICK_SECONDS = 0.5
LEASE_SECONDS = 15


def holder_name():
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Job:
    name: str
    interval_setting: str  # the configuration key of the seconds between runs; 0 runs it never
    function: Callable  # called with the app, inside its app context
    at_start: bool = False  # also once when the server starts, whatever the interval


class Scheduler:
    """The background jobs of one app and the thread that runs them.

    create_app() registers the jobs (app.extensions["scheduler"]); the jobs process starts
    the thread (jobs/__main__.py), as may an embedding application, with
    `app.extensions["scheduler"].start()`.
    """

    def __init__(self, app):
        self.app = app
        self.jobs = []
        self._stop = threading.Event()
        self._thread = None

    def add_job(self, name, interval_setting, function, at_start=False):
        self.jobs.append(Job(name, interval_setting, function, at_start))

    def interval(self, job):
        return self.app.config[job.interval_setting]

    def has_periodic_jobs(self):
        return any(self.interval(job) > 0 for job in self.jobs)

    def start(self, started_at=None):
        """Run the jobs in a thread of this process; `started_at` (naive UTC, default now) is
        when the server started, so a jobs process started again runs the jobs at start
        only when no process has run them since."""
        if not self.has_periodic_jobs() and not any(job.at_start for job in self.jobs):
            return
        self._stop.clear()
        arguments = (started_at or utcnow(),)
        self._thread = threading.Thread(target=self._run, args=arguments, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self, started_at):
        """Tick until stopped; without periodic jobs, only until the jobs at start have run
        (here or in another process of this server)."""
        holder = holder_name()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="job") as executor:
            running, at_start_settled = None, False
            while not self._stop.wait(TICK_SECONDS):
                idle = running is None or running.done()
                if at_start_settled and idle and not self.has_periodic_jobs():
                    break
                with self.app.app_context():
                    try:
                        if try_lease(SCHEDULER_LEASE, holder, LEASE_SECONDS) and idle:
                            running = self._start_due_jobs(executor, started_at)
                            at_start_settled = True
                    except Exception:
                        log.exception("scheduler tick failed")
                    finally:
                        db.session.remove()
            with self.app.app_context():
                release_lease(SCHEDULER_LEASE, holder)

    def _start_due_jobs(self, executor, started_at):
        due = [job for job in self.jobs if claim_if_due(job, self.interval(job), started_at)]
        return executor.submit(run_jobs, self.app, due) if due else None


def run_jobs(app, jobs):
    for job in jobs:
        with app.app_context():
            try:
                job.function(app)
            except Exception:
                log.exception("background job %s failed", job.name)
            finally:
                db.session.remove()
