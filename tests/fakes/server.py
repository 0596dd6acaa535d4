"""What every fake upstream shares: the threaded server, the request handler that applies a
test's knobs (holds, delays, forced answers, silence, trickles) before the wire format
answers, and the transport (JSON answers, trickled bytes, SSE streams). Each wire format's
module subclasses FakeHandler with its listing, its calls and its error shape."""

import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.fakes.model import interval_of


class QuietServer(ThreadingHTTPServer):
    """Says nothing when a client went away mid-answer (the registry's timeout at work).

    Printing that traceback from this thread made Python 3.11 parse source lines (for its
    caret markers) while the test's thread compiled URL rules, and 3.11's parser keeps a
    recursion counter shared by threads: a SystemError in an unrelated test.
    """

    daemon_threads = True
    request_queue_size = 1024  # a benchmark opens hundreds of streams at once

    def __init__(self, address, handler_class):
        super().__init__(address, handler_class)
        self._connections = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close(self):
        """Stop serving and close every connection, kept-alive ones included, as a server
        that went down does: a client's pool sees them closed, and connects anew (refused)."""
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Rendezvous:
    """Holds each request until `parties` of them, to any upstreams sharing it, are in flight
    at once; False when that did not happen within `timeout` seconds."""

    def __init__(self, parties, timeout):
        self._barrier = threading.Barrier(parties, timeout=timeout)

    def meet(self):
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            return False
        return True


class BlackHole:
    """A loopback port that accepts connections and never answers, nor closes them."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self._listener.getsockname()[1]
        self.accepted = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def base_url(self, path="/v1"):
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self):
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self):
        self._closed.set()
        self._listener.close()
        for connection in self.accepted:
            connection.close()


def sse_event(document, event=None):
    """One server-sent event of a JSON document, named when `event` is given."""
    named = f"event: {event}\n" if event else ""
    return f"{named}data: {json.dumps(document)}\n\n".encode()


class FakeHandler(BaseHTTPRequestHandler):
    """One request to a FakeUpstream (`upstream`, with `base_path` the path its base_url adds).

    A wire format's subclass gives `serve_listing(path, query)`, `call_routes()` ({path under
    the base: method(body)}), `refusal(path, body)` (what the real server answers to a call
    without the right key or fields, else None) and `error_document(path, status, message)`;
    `own_routes()` are answered apart from the knobs (watsonx's IAM).
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    upstream = None
    base_path = ""
    stream_open = False  # a stream's body begun and not ended

    def setup(self):
        super().setup()
        self.upstream.count_connection()

    def log_message(self, format, *args):
        pass

    # What a wire format gives --------------------------------------------------------------

    def serve_listing(self, path, query):
        self.answer(404, self.error_document(path, 404, "no listing here"))

    def call_routes(self):
        return {}

    def own_routes(self):
        return {}

    def refusal(self, path, body):
        return None

    def error_document(self, path, status, message):
        return {"error": {"message": message}}

    # The knobs, then the wire format ---------------------------------------------------------

    def do_GET(self):
        url = urlsplit(self.path)
        if self.knobs_answered(url, None):
            return None
        if self.upstream.streamed_bytes is not None:
            return self.stream_listing(self.upstream.streamed_bytes)
        return self.serve_listing(self.path_under_base(url.path), parse_qs(url.query))

    def do_POST(self):
        url = urlsplit(self.path)
        body = self.read_body()
        own_route = self.own_routes().get(url.path)
        if own_route is not None:
            return own_route(body)
        if self.knobs_answered(url, body):
            return None
        path = self.path_under_base(url.path)
        route = self.call_routes().get(path)
        if route is None:
            return self.answer(404, self.error_document(path, 404, f"no route {url.path}"))
        refusal = self.refusal(path, body)
        if refusal:
            return self.answer(*refusal)
        (self.upstream.script or (lambda handler, body: route(body)))(self, body)
        self.end_stream()

    def path_under_base(self, path):
        return path.removeprefix(self.base_path) if path.startswith(self.base_path) else path

    def knobs_answered(self, url, body):
        """Count the request and apply the test's knobs: True when they answered it (or
        decided it gets no answer), False to let the wire format answer."""
        upstream = self.upstream
        path = self.path_under_base(url.path)
        upstream.count_hit(url.path, dict(self.headers), body)
        upstream.wait_if_held()
        if upstream.delay:
            time.sleep(upstream.delay)
        if upstream.rendezvous is not None and not upstream.rendezvous.meet():
            self.answer(503, self.error_document(path, 503, "asked alone"))
            return True
        if upstream.silent:
            upstream.stopped.wait()
            self.close_connection = True
            return True
        if upstream.forced is not None:
            self.answer(*upstream.forced)
            return True
        if upstream.failure is not None:
            status, message, headers = upstream.failure
            self.answer(status, self.error_document(path, status, message), headers)
            return True
        return False

    # Reading and answering ----------------------------------------------------------------

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return {name: values[0] for name, values in parse_qs(raw.decode()).items()}
        return json.loads(raw) if raw else {}

    def answer(self, status, document, headers=None):
        """A JSON document (or raw bytes) with this status; one byte at a time with `trickle_interval`."""
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(payload)), **(headers or {})}
        if self.upstream.trickle_interval is not None:
            head = f"HTTP/1.1 {status} Answer\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            self.close_connection = True
            return self.send_trickled(head.encode() + b"\r\n" + payload, 1, self.upstream.trickle_interval)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the registry may hang up on a body it refuses
            self.wfile.write(payload)
        return None

    def send_trickled(self, data, piece_size, interval):
        """`data` a piece at a time, `interval` seconds apart, until its end, the upstream
        going down, or the registry hanging up (as it should: each read is quick, the whole
        never ends in time)."""
        try:
            for start in range(0, len(data), piece_size):
                self.wfile.write(data[start : start + piece_size])
                self.wfile.flush()
                self.upstream.count_sent(min(piece_size, len(data) - start))
                if self.upstream.stopped.wait(interval):
                    return
        except OSError:
            return

    def trickle(self, payload, piece_size, interval, headers=()):
        """A 200 answer sent a few bytes at a time (no Content-Length: it ends when the connection does)."""
        self.send_response(200)
        for name, value in headers or (("Content-Type", "application/json"),):
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.send_trickled(payload, piece_size, interval)

    def stream_listing(self, size):
        """An OpenAI listing of about `size` bytes, streamed until the end or until the registry hangs up."""
        entry = b'{"id": "model-0000000000", "object": "model", "created": 1700000000, "owned_by": "fake"},'
        batch = entry * (65536 // len(entry))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()  # no Content-Length: the body ends when the connection closes
        self.close_connection = True
        try:
            self.wfile.write(b'{"object": "list", "data": [')
            for _ in range(size // len(batch)):
                self.wfile.write(batch)
                self.upstream.count_sent(len(batch))
            self.wfile.write(entry[:-1] + b"]}")
        except OSError:
            return

    def start_stream(self):
        """A stream's headers: its body chunked, its connection kept for the next request, as
        the real servers send them."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.stream_open = True

    def send_events(self, events, interval):
        """Each event as it is due, in a chunk of its own (`break_after_chunks` closes the
        connection short of the body's end); a client gone away (the registry closing its
        call) is counted."""
        upstream = self.upstream
        try:
            for number, event in enumerate(events):
                if upstream.break_after_chunks is not None and number >= upstream.break_after_chunks:
                    self.close_connection = True
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if interval:
                    time.sleep(interval)
        except (BrokenPipeError, ConnectionResetError):
            upstream.count_cut_stream()
            self.close_connection = True

    def end_stream(self):
        """The end of a stream's body, unless its connection is being closed short of it."""
        if self.stream_open and not self.close_connection:
            with contextlib.suppress(OSError):
                self.wfile.write(b"0\r\n\r\n")
        self.stream_open = False

    def stream(self, events, body):
        """Answer with these SSE events, `chunk_interval` (or a benchmark's `fake_interval`) apart."""
        self.start_stream()
        self.send_events(events, interval_of(self.upstream, body))
