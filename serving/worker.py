"""The registry's gunicorn worker: gevent's, with its refusals and its closes made the registry's.

gunicorn.conf.py names it (`worker_class`); the gunicorn modules themselves stay untouched.
"""

import gc

import gevent
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

# Seconds before the graceful timeout (at most half of it) at which a stopping worker ends the
# connections it still serves: the master kills it at the timeout, and its calls, ended
# first, still record their outcome and usage, which the worker writes as it exits.
INTERRUPT_MARGIN = 2.0


def interrupt_after(graceful_timeout):
    return max(graceful_timeout - INTERRUPT_MARGIN, graceful_timeout / 2)


class RefusalRecorder:
    """Stands in for the client's socket while gunicorn writes one of its refusals, keeping
    the status line it chose, so that the registry answers it in its own words instead."""

    def __init__(self):
        self.written = b""

    def gettimeout(self):
        return 0.0  # non-blocking: gunicorn then writes with sendall alone

    def sendall(self, data):
        self.written += data

    def status(self):
        """(status, reason) of the recorded answer's status line, or a 500 when none was written."""
        status_line = self.written.split(b"\r\n", 1)[0].decode("latin-1")
        _version, status, reason = (status_line.split(" ", 2) + ["", ""])[:3]
        return (int(status), reason) if status.isdigit() else (500, "Internal Server Error")


def closing_when_asked(wsgi_app, close_connection_key):
    """The app, with the connection closed after an answer whose environ asks so: gunicorn
    drops a Connection header the app sets, and keeps the connection unless its own
    response (start_response's object) is made to close."""

    def app(environ, start_response):
        body = wsgi_app(environ, start_response)
        if environ.get(close_connection_key):
            start_response.__self__.force_close()
        return body

    return app


class RegistryWorker(GeventWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = set()  # the greenlets serving a connection

    def load_wsgi(self):
        super().load_wsgi()
        from access.limits import CLOSE_CONNECTION_KEY  # an app module: imported once gevent has patched

        self.wsgi = closing_when_asked(self.wsgi, CLOSE_CONNECTION_KEY)
        # What loading the app made lives as long as the worker: frozen, the collector's full
        # runs stop walking those objects (over 100,000) again and again as requests come.
        gc.freeze()

    def handle_error(self, req, client, addr, exc):
        """gunicorn's refusals (414, 431, a request line that is not HTTP) as problem documents.

        gunicorn classifies the error, logs it and writes an HTML page; the page goes to a
        recorder, since its message can quote the raw request line or a header.
        """
        recorder = RefusalRecorder()
        super().handle_error(req, recorder, addr, exc)
        # Imported here: the master loads this class before its workers patch the standard
        # library for gevent, and the app's modules must be imported after that.
        from api.errors import refusal_answer

        status, reason = recorder.status()
        try:
            util.write_nonblock(client, refusal_answer(status, reason, self.cfg))
        except OSError:
            self.log.debug("Failed to send error message.")
        util.close_graceful(client)

    def handle_request(self, listener_name, req, sock, addr):
        """Read what the client still sends before closing: closing with unread bytes (a
        refused body over 64 KiB) sends a reset that can destroy the answer before the client
        reads it. gevent's worker closes at once, where gunicorn's threaded worker drains."""
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except StopIteration:  # the answer ends the connection
            util.close_graceful(sock)
            raise

    def handle(self, listener, client, addr):
        self.connections.add(gevent.getcurrent())
        try:
            super().handle(listener, client, addr)
        finally:
            self.connections.discard(gevent.getcurrent())

    def handle_exit(self, sig, frame):
        """A graceful stop: the connections still open near its end are ended by this worker
        (GreenletExit in each), before the master's kill ends them unrecorded."""
        super().handle_exit(sig, frame)
        gevent.spawn_later(interrupt_after(self.cfg.graceful_timeout), self.end_connections)

    def end_connections(self):
        if self.connections:
            self.log.warning("ending %d connections before the graceful timeout", len(self.connections))
            gevent.killall(list(self.connections), block=False)
