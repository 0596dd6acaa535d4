"""Background work with one owner per database: the prober and the manifest sync.

Every gunicorn worker runs a scheduler thread (started by gunicorn.conf.py, never by a
route). Each tick, the thread tries to take or renew the lease row "scheduler"; only the
holder runs jobs, so one database gets one prober however many workers and instances
serve it. Job start times are stored too, so a new holder keeps the same rhythm.
"""

import logging
import os
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import sqlalchemy as sa

from models import JobRun, Lease, db, utcnow

log = logging.getLogger(__name__)

SCHEDULER_LEASE = "scheduler"
TICK_SECONDS = 0.5
LEASE_SECONDS = 15


def holder_name():
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def try_lease(name, holder, seconds):
    """Take or renew the lease `name` for `seconds`; True when `holder` has it.

    Writes only to take a free or expired lease or to renew one past half its life, so
    the ticks of every worker cost the database a read. The conditional UPDATE settles a
    race for an existing row on every database (on PostgreSQL a waiting UPDATE re-checks
    its condition on the row its rival wrote); while no row exists one is inserted, and
    the primary key settles that race.
    """
    now = utcnow()
    lease = db.session.get(Lease, name)
    if lease is not None:
        mine, remaining = lease.holder == holder, lease.expires_at - now
        db.session.rollback()
        if not mine and remaining > timedelta(0):
            return False
        if mine and remaining > timedelta(seconds=seconds / 2):
            return True
    expires_at = now + timedelta(seconds=seconds)
    renewed = db.session.execute(
        sa.update(Lease)
        .where(Lease.name == name, sa.or_(Lease.holder == holder, Lease.expires_at < now))
        .values(holder=holder, expires_at=expires_at)
    )
    if renewed.rowcount == 0:
        if db.session.scalar(sa.select(Lease.holder).where(Lease.name == name)) is not None:
            db.session.rollback()
            return False
        db.session.add(Lease(name=name, holder=holder, expires_at=expires_at))
    try:
        db.session.commit()
        return True
    except sa.exc.IntegrityError:  # another holder inserted the first row meanwhile
        db.session.rollback()
        return False


def release_lease(name, holder):
    db.session.execute(sa.delete(Lease).where(Lease.name == name, Lease.holder == holder))
    db.session.commit()


def claim_if_due(job_name, interval, now_anyway=False):
    """Record a start of `job_name` when `interval` seconds have passed since the last, or `now_anyway`."""
    now = utcnow()
    run = db.session.get(JobRun, job_name)
    if not now_anyway and run is not None and now - run.last_started_at < timedelta(seconds=interval):
        return False
    if run is None:
        db.session.add(JobRun(name=job_name, last_started_at=now))
    else:
        run.last_started_at = now
    db.session.commit()
    return True


class Scheduler:
    def __init__(self):
        self.jobs = []  # (name, interval config key, run on takeover, function of the app)
        self._stop = threading.Event()
        self._thread = None

    def job(self, name, interval_setting, on_takeover=False):
        """Run the decorated function every `interval_setting` seconds; with `on_takeover` also
        as soon as a process becomes the lease holder, so a fresh start does not wait an interval."""

        def register(function):
            self.jobs.append((name, interval_setting, on_takeover, function))
            return function

        return register

    def start(self, app):
        if not any(app.config[setting] > 0 for _, setting, _, _ in self.jobs):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(app,), name="scheduler", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self, app):
        holder = holder_name()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="job") as executor:
            running, holding = None, False
            while not self._stop.wait(TICK_SECONDS):
                with app.app_context():
                    try:
                        was_holding, holding = holding, try_lease(SCHEDULER_LEASE, holder, LEASE_SECONDS)
                        if holding and (running is None or running.done()):
                            running = self._start_due_jobs(app, executor, took_over=not was_holding)
                    except Exception:
                        log.exception("scheduler tick failed")
                    finally:
                        db.session.remove()
            with app.app_context():
                release_lease(SCHEDULER_LEASE, holder)

    def _start_due_jobs(self, app, executor, took_over):
        due = [
            function
            for name, setting, on_takeover, function in self.jobs
            if app.config[setting] > 0 and claim_if_due(name, app.config[setting], took_over and on_takeover)
        ]
        return executor.submit(run_jobs, app, due) if due else None


def run_jobs(app, functions):
    for function in functions:
        with app.app_context():
            try:
                function(app)
            except Exception:
                log.exception("background job %s failed", function.__name__)
            finally:
                db.session.remove()


scheduler = Scheduler()
