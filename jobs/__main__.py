"""The background jobs in a process of their own: `python -m jobs [APP]` (default wsgi:app).

gunicorn's master starts one beside its workers (gunicorn.conf.py), so a probe round never
shares a worker with the requests; an operator can run one by hand the same way. It runs
until SIGTERM or SIGINT, or until the process named by --exit-with ends.
"""

from gevent import monkey

# As in gunicorn's gevent workers, before anything else is imported: the prober's thousand
# probes at once are greenlets here too, not a thousand threads.
monkey.patch_all()

import argparse  # noqa: E402
import logging.config  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
from datetime import datetime  # noqa: E402

from gunicorn.util import import_app  # noqa: E402

from observability.logs import LOG_FORMATS, logging_config  # noqa: E402

PARENT_CHECK_SECONDS = 1.0


def arguments():
    parser = argparse.ArgumentParser(prog="python -m jobs", description=__doc__.splitlines()[0])
    parser.add_argument("app", nargs="?", default="wsgi:app", help="the app, as gunicorn names it (module:name)")
    parser.add_argument(
        "--server-started-at",
        type=datetime.fromisoformat,
        help="naive UTC start of the server this process serves: its jobs that run at start run once per server start",
    )
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="as the server's LOG_FORMAT")
    parser.add_argument("--exit-with", type=int, metavar="PID", help="end when the process PID (the parent) ends")
    return parser.parse_args()


def wait_for_stop(exit_with):
    """Until SIGTERM or SIGINT, or until the parent `exit_with` is gone (then this process
    was orphaned: its server was killed without a chance to stop it)."""
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    while not stop.wait(PARENT_CHECK_SECONDS):
        if exit_with is not None and os.getppid() != exit_with:
            return


def main():
    options = arguments()
    logging.config.dictConfig(logging_config(options.log_format))
    scheduler = getattr(import_app(options.app), "extensions", {}).get("scheduler")
    if scheduler is not None:
        scheduler.start(started_at=options.server_started_at)
    try:
        wait_for_stop(options.exit_with)
    finally:
        if scheduler is not None:
            scheduler.stop()


main()
