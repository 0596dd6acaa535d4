"""gunicorn settings for the registry: `gunicorn -c gunicorn.conf.py wsgi:app`."""

import json
import os
from datetime import UTC, datetime

from gunicorn import util

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
# Requests are short and mostly wait on SQLite or an upstream: a few processes, each
# with threads, use both cores without the memory of one process per request.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread"
# Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads connections over
# the workers; on one shared socket, whichever worker woke first took them, and one worker
# could end up serving every keep-alive client while the other idled. (So a second server
# started on the same port shares it rather than failing to bind.)
reuse_port = True
timeout = 60
# No runtime control socket: its default path is one per user, shared by every instance.
control_socket_disable = True
graceful_timeout = 10
keepalive = 5
# gunicorn refuses these before the app sees the request (414 and 431), as problem documents below.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# Access log without credentials: the request line (path and query) but no headers.
accesslog = "-"
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# The registry's own log lines (state changes, audits) go to stderr beside gunicorn's.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": ["error_console"]},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}


# Read by the master before it forks: the workers' schedulers share it, so the jobs that
# run at start (the manifest sync) run once per server start, not once per worker.
SERVER_STARTED_AT = datetime.now(UTC).replace(tzinfo=None)


def scheduler_of(worker):
    """The app's scheduler (scheduler.py); none when the worker failed to load the app, or
    for an app without one (bench/bare_app.py)."""
    return getattr(getattr(worker, "wsgi", None), "extensions", {}).get("scheduler")


def post_worker_init(worker):
    """Each worker runs a scheduler thread; the database lease lets only one do the work."""
    scheduler = scheduler_of(worker)
    if scheduler is not None:
        scheduler.start(started_at=SERVER_STARTED_AT)


def worker_exit(server, worker):
    scheduler = scheduler_of(worker)
    if scheduler is not None:
        scheduler.stop()


GUNICORN_REFUSALS = {
    400: "The request is not valid HTTP/1.1.",
    414: f"The request line (method, path and query) is over {limit_request_line} bytes.",
    431: f"A request header is over {limit_request_field_size} bytes, or there are over {limit_request_fields}.",
}


def write_problem(sock, status, reason, message):
    """gunicorn's own refusals as problem documents, like every other error of the registry.

    gunicorn writes them as HTML through util.write_error; its message can quote the raw
    request line or a header, so the detail is a fixed sentence per status instead.
    """
    problem = {
        "type": "about:blank",
        "title": reason,
        "status": status,
        "detail": GUNICORN_REFUSALS.get(status, f"{reason}."),
    }
    body = json.dumps(problem)
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/problem+json\r\n"
    util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode("latin-1"))


util.write_error = write_problem
