"""The background jobs' process, started and stopped by gunicorn's master (gunicorn.conf.py).

A probe round over thousands of providers is thousands of greenlets and many short writes:
run inside a worker, it delayed that worker's requests by seconds. The master runs
`python -m jobs` beside its workers instead, starts it again when it dies, and stops it when
the server stops; the process itself ends when the master does, even a killed one.
"""

import contextlib
import os
import signal
import sys
import threading
import time

FIRST_RESTART_DELAY = 1.0
LAST_RESTART_DELAY = 30.0
# A process that ran this long before it died is started again after the first delay; one
# that died sooner (an app that fails to load) after twice the previous delay.
STEADY_SECONDS = 60.0


def jobs_command(app_uri, server_started_at, log_format, master_pid):
    return [
        sys.executable,
        "-m",
        "jobs",
        app_uri,
        f"--server-started-at={server_started_at.isoformat()}",
        f"--log-format={log_format}",
        f"--exit-with={master_pid}",
    ]


def wait_for_exit_status(pid):
    """The exit status of the child `pid` once it ends; None when gunicorn's master reaped it
    first (its loop reaps every child that ends, its workers' and others')."""
    try:
        _pid, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


class JobsProcess:
    """One jobs process, kept running by a thread of the master until stop().

    Spawned with posix_spawn, not subprocess: the master forks workers meanwhile, and a worker
    would inherit (and keep open) the pipe through which subprocess learns of the exec.
    """

    def __init__(self, command, log):
        self.command = command
        self.log = log
        self.stopping = threading.Event()
        self.restarting = threading.Event()
        self.starting = threading.Lock()  # stop() never misses a process being started
        self.pid = None
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._keep_running, name="jobs-process", daemon=True)
        self.thread.start()

    def _keep_running(self):
        delay = FIRST_RESTART_DELAY
        while True:
            with self.starting:
                if self.stopping.is_set():
                    return
                # A session of its own: a terminal's Ctrl-C or a signal to the server's process
                # group reaches the master, which stops the jobs process after its workers.
                self.pid = os.posix_spawn(self.command[0], self.command, os.environ, setsid=True)
            started = time.monotonic()
            self.log.info("started the jobs process (pid: %s)", self.pid)
            exit_status = wait_for_exit_status(self.pid)
            if self.stopping.is_set():
                return
            if self.restarting.is_set():
                self.restarting.clear()
                delay = FIRST_RESTART_DELAY
                continue
            steady = time.monotonic() - started >= STEADY_SECONDS
            delay = FIRST_RESTART_DELAY if steady else min(delay * 2, LAST_RESTART_DELAY)
            message = "the jobs process (pid: %s) ended (status %s); starting it again in %.0f s"
            self.log.error(message, self.pid, exit_status, delay)
            if self.stopping.wait(delay):
                return

    def restart(self):
        """Stop the process (SIGTERM) and start a new one at once: after a reload (SIGHUP) the
        jobs run the reloaded code and configuration, as the new workers do."""
        with self.starting:
            if self.pid is not None and not self.stopping.is_set():
                self.restarting.set()
                self.signal(signal.SIGTERM)

    def stop(self, timeout):
        """Ask the process to stop (SIGTERM); kill it when it has not within `timeout` seconds."""
        with self.starting:
            self.stopping.set()
        if self.thread is None:
            return
        self.signal(signal.SIGTERM)
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.log.warning("the jobs process (pid: %s) did not stop in %s s: killed", self.pid, timeout)
            self.signal(signal.SIGKILL)
        self.thread.join()

    def signal(self, signal_number):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal_number)
