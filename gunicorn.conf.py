"""gunicorn settings for the registry: `gunicorn -c gunicorn.conf.py wsgi:app`."""

import os

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
# Requests are short and mostly wait on SQLite or an upstream: a few processes, each
# with threads, use both cores without the memory of one process per request.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
worker_class = "gthread"
timeout = 60
graceful_timeout = 10
keepalive = 5
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


def post_worker_init(worker):
    """Each worker runs a scheduler thread; the database lease lets only one do the work."""
    from scheduler import scheduler

    scheduler.start(worker.wsgi)


def worker_exit(server, worker):
    from scheduler import scheduler

    scheduler.stop()
