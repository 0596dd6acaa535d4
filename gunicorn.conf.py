"""gunicorn settings for the registry: `gunicorn -c gunicorn.conf.py wsgi:app`."""

import glob
import os
import shutil
import socket
import sys
import tempfile
from datetime import UTC, datetime

from observability.logs import ACCESS_LOG_FORMAT, logging_config
from serving.jobs_process import JobsProcess, jobs_command

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
# gevent workers (docs/production.md): each connection is a greenlet, so a request
# waiting on an upstream or a client sending its headers slowly costs a little memory, not
# one of a handful of threads. CPU-heavy work (password hashes, match) runs off the hub
# (serving.off_the_hub), so it cannot stall the worker's other connections. The worker is
# gevent's, answering gunicorn's own refusals as problem documents (serving/worker.py).
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "serving.worker.RegistryWorker"
worker_connections = int(os.environ.get("GUNICORN_WORKER_CONNECTIONS", "1000"))
# Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads connections over
# the workers; on one shared socket, whichever worker woke first took them, and one worker
# could end up serving every keep-alive client while the other idled. on_starting below
# makes sure no other server already listens there, since SO_REUSEPORT would share it.
reuse_port = True
timeout = 60
# No runtime control socket: its default path is one per user, shared by every instance.
control_socket_disable = True
graceful_timeout = 10
keepalive = 5
# gunicorn refuses these before the app sees the request (414 and 431), as problem documents.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190
# Access log without credentials: the method and path (no query, no headers), with the
# request id and the authenticated user's name. Every line escaped; LOG_FORMAT=json makes
# each line, access and error alike, one JSON object (logs.py).
accesslog = "-"
access_log_format = ACCESS_LOG_FORMAT
logger_class = "observability.logs.AccessLogger"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
LOG_FORMAT = os.environ.get("LOG_FORMAT", "text").strip().lower() or "text"
logconfig_dict = logging_config(LOG_FORMAT)


def prepare_metrics_directory(server):
    """Give the workers a clean folder for their metrics (prometheus_client's multiprocess mode).

    An operator's PROMETHEUS_MULTIPROC_DIR is emptied of old values; else a private folder
    is made, and removed again at exit.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for values_file in glob.glob(os.path.join(directory, "*.db")):
            os.remove(values_file)
    else:
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="registry-metrics-")
        server.made_metrics_directory = directory


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    jobs_process = getattr(server, "jobs_process", None)
    if jobs_process is not None:
        jobs_process.stop(timeout=graceful_timeout)
    made = getattr(server, "made_metrics_directory", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)


# The master's hold on its addresses (claim_address), for as long as it runs.
claimed_sockets = []


def bound_socket(address, reuse_port):
    host = address[0]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn's own: TIME_WAIT is free
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def claim_address(address):
    """Fail when another socket is bound to `address`; else hold it, so a later server fails.

    A bind without SO_REUSEPORT fails on any socket already bound there, SO_REUSEPORT or not.
    It is then replaced by a bound, never listening, SO_REUSEPORT socket that the master
    keeps: the workers' own SO_REUSEPORT listeners may join it, another server's first bind
    may not, and since it never listens it is never handed a connection.
    """
    bound_socket(address, reuse_port=False).close()
    claimed_sockets.append(bound_socket(address, reuse_port=True))


def on_starting(server):
    claim_addresses(server)
    prepare_metrics_directory(server)


def shown_address(address):
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_jobs_process(server):
    """The prober, the manifest sync and the audit pruning run in a process of their own,
    never in a worker; the database lease picks one such process per database."""
    server_started_at = datetime.now(UTC).replace(tzinfo=None)
    command = jobs_command(server.app.app_uri, server_started_at, LOG_FORMAT, server.pid)
    server.jobs_process = JobsProcess(command, server.log)
    server.jobs_process.start()


def when_ready(server):
    """Start the jobs process, and say where the registry listens: with SO_REUSEPORT the
    workers bind, and gunicorn's own "Listening at" line names no address."""
    start_jobs_process(server)
    for address in server.cfg.address:
        shown = f"http://{shown_address(address)}" if isinstance(address, tuple) else f"unix:{address}"
        server.log.info("the registry listens at %s", shown)


def on_reload(server):
    jobs_process = getattr(server, "jobs_process", None)
    if jobs_process is not None:
        jobs_process.restart()


def claim_addresses(server):
    """Refuse an address where another server listens, rather than share it through SO_REUSEPORT."""
    if server.master_pid:  # a re-executed master (USR2) succeeds its parent on the same address
        return
    for address in server.cfg.address:
        if not isinstance(address, tuple):  # a Unix socket path: gunicorn's own bind refuses a taken one
            continue
        try:
            claim_address(address)
        except OSError as error:
            server.log.error(
                "cannot listen on %s: %s (another server listens there; it is not shared)",
                shown_address(address),
                error.strerror,
            )
            sys.exit(1)


def post_request(worker, req, environ, resp):
    """Let the worker's other connections run between two requests of one keep-alive connection.

    A greenlet yields only when it would block: a client that sends its next request at once
    (on another core) keeps its greenlet serving it, and the other connections wait; a
    median of 0.4 ms came with a 99th percentile of 200 ms to 2 s under 16 connections.
    """
    import gevent

    gevent.sleep(0)


def worker_exit(server, worker):
    """A worker stopping gracefully writes the usage events it still holds."""
    from observability.usage import stop_recording

    stop_recording()
