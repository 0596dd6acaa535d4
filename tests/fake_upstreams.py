"""Small local HTTP servers that speak the real formats of the upstream providers."""

import contextlib
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Where each flavour's base_url points, relative to the server root.
BASE_PATHS = {
    "openai": "/v1",
    "anthropic": "/v1",
    "watsonx": "",
    "github": "/inference",
    "rits": "/v1",
    "voyage": "/v1",
}


class QuietServer(ThreadingHTTPServer):
    """Says nothing when a client went away mid-answer (the registry's timeout at work).

    Printing that traceback from this thread made Python 3.11 parse source lines (for its
    caret markers) while the test's thread compiled URL rules, and 3.11's parser keeps a
    recursion counter shared by threads: a SystemError in an unrelated test.
    """

    daemon_threads = True

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


class FakeUpstream:
    """One upstream on a free loopback port; it can go down and come back on the same port."""

    def __init__(self, flavor="openai", api_key="sk-good", models=("gpt-4o", "gpt-4o-mini"), delay=0.0):
        self.flavor = flavor
        self.api_key = api_key
        self.models = list(models)
        self.delay = delay
        self.status = None  # force an HTTP status, e.g. 500
        self.body = None  # force a raw body, e.g. b"<html>"
        self.rendezvous = None  # a Rendezvous: answer 503 unless enough requests are in flight at once
        self.silent = False  # accept, read the request, never answer
        self.trickle_interval = None  # answer one byte every this many seconds
        self.streamed_bytes = None  # answer a listing of about this size, without Content-Length
        self.sent_bytes = 0
        self.stopped = threading.Event()
        self.hits = 0
        self.held = None  # with hold(): set while a request waits for release()
        self._release = None
        self._lock = threading.Lock()
        self._server = None
        self.port = None
        self.up()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}{BASE_PATHS[self.flavor]}"

    def up(self):
        handler = type("Handler", (UpstreamHandler,), {"upstream": self})
        self._server = QuietServer(("127.0.0.1", self.port or 0), handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self):
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def hold(self):
        """Keep every request waiting, once it arrived (`held` is set), until release()."""
        self.held, self._release = threading.Event(), threading.Event()

    def release(self):
        self._release.set()

    def wait_if_held(self):
        if self._release is not None:
            self.held.set()
            self._release.wait(timeout=30)

    def count_hit(self):
        with self._lock:
            self.hits += 1

    def count_sent(self, size):
        with self._lock:
            self.sent_bytes += size


class UpstreamHandler(BaseHTTPRequestHandler):
    upstream = None

    def log_message(self, format, *args):
        pass

    def answer(self, status, document):
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the registry may hang up on a body it refuses
            self.wfile.write(payload)

    def do_GET(self):
        upstream = self.upstream
        upstream.count_hit()
        upstream.wait_if_held()
        if upstream.delay:
            time.sleep(upstream.delay)
        if upstream.rendezvous is not None and not upstream.rendezvous.meet():
            return self.answer(503, {"error": "asked alone"})
        if upstream.silent:
            upstream.stopped.wait()
            return None
        if upstream.trickle_interval is not None:
            return self.trickle(upstream.trickle_interval)
        if upstream.streamed_bytes is not None:
            return self.stream_listing(upstream.streamed_bytes)
        if upstream.status is not None or upstream.body is not None:
            return self.answer(upstream.status or 200, upstream.body or {"error": "forced"})
        route = getattr(self, f"serve_{upstream.flavor}")
        return route(urlsplit(self.path))

    def trickle(self, interval):
        """A whole, valid answer, one byte at a time: each read is quick, the answer never ends in time."""
        listing = json.dumps({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]}).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(listing)}\r\n\r\n"
        try:
            for byte in head.encode() + listing:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                self.upstream.count_sent(1)
                if self.upstream.stopped.wait(interval):
                    return
        except OSError:  # the registry hung up
            return

    def stream_listing(self, size):
        """An OpenAI listing of about `size` bytes, streamed until the end or until the registry hangs up."""
        entry = b'{"id": "model-0000000000", "object": "model", "created": 1700000000, "owned_by": "fake"},'
        batch = entry * (65536 // len(entry))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()  # no Content-Length: the body ends when the connection closes
        try:
            self.wfile.write(b'{"object": "list", "data": [')
            for _ in range(size // len(batch)):
                self.wfile.write(batch)
                self.upstream.count_sent(len(batch))
            self.wfile.write(entry[:-1] + b"]}")
        except OSError:  # the registry hung up
            return

    def refuse_key(self, sent):
        # Like real upstreams, echo the key that was sent: the registry must not repeat it.
        self.answer(401, {"error": {"message": f"Incorrect API key provided: {sent}", "type": "invalid_request_error"}})

    def serve_models_list(self, url, sent_key, expected_key, owned_by):
        if url.path != "/v1/models":
            return self.answer(404, {"error": "not found"})
        if sent_key != expected_key:
            return self.refuse_key(sent_key)
        data = [
            {"id": model, "object": "model", "created": 1700000000, "owned_by": owned_by}
            for model in self.upstream.models
        ]
        self.answer(200, {"object": "list", "data": data})

    def serve_openai(self, url):
        expected = f"Bearer {self.upstream.api_key}" if self.upstream.api_key else None
        self.serve_models_list(url, self.headers.get("Authorization"), expected, "fake")

    def serve_rits(self, url):
        self.serve_models_list(url, self.headers.get("RITS_API_KEY"), self.upstream.api_key, "rits")

    def serve_anthropic(self, url):
        if url.path != "/v1/models" or not self.headers.get("anthropic-version"):
            return self.answer(400, {"type": "error", "error": {"type": "invalid_request_error"}})
        if self.headers.get("x-api-key") != self.upstream.api_key:
            return self.refuse_key(self.headers.get("x-api-key"))
        after_id = parse_qs(url.query).get("after_id", [None])[0]
        models = self.upstream.models
        start = models.index(after_id) + 1 if after_id in models else 0
        page = models[start : start + 1]  # one model per page, to exercise paging
        data = [
            {"type": "model", "id": model, "display_name": model.title(), "created_at": "2025-02-19T00:00:00Z"}
            for model in page
        ]
        has_more = start + 1 < len(models)
        self.answer(200, {"data": data, "has_more": has_more, "first_id": page[0], "last_id": page[-1]})

    def serve_watsonx(self, url):
        if url.path != "/ml/v1/foundation_model_specs" or "version" not in parse_qs(url.query):
            return self.answer(400, {"errors": [{"code": "missing_version"}]})
        resources = [
            {
                "model_id": model,
                "label": model.split("/")[-1],
                "provider": "IBM",
                "functions": [{"id": "text_generation"}],
                "lifecycle": [{"id": "available", "start_date": "2024-01-01"}],
            }
            for model in self.upstream.models
        ]
        resources.append(
            {
                "model_id": "ibm/granite-withdrawn",
                "label": "withdrawn",
                "provider": "IBM",
                "lifecycle": [
                    {"id": "available", "start_date": "2023-01-01"},
                    {"id": "withdrawn", "start_date": "2024-06-01"},
                ],
            }
        )
        self.answer(200, {"total_count": len(resources), "limit": 200, "resources": resources})

    def serve_github(self, url):
        if url.path != "/catalog/models":
            return self.answer(404, {"error": "not found"})
        if self.headers.get("Authorization") != f"Bearer {self.upstream.api_key}":
            return self.refuse_key(self.headers.get("Authorization"))
        catalog = [
            {"id": model, "name": model.split("/")[-1].upper(), "publisher": model.split("/")[0], "registry": "azureml"}
            for model in self.upstream.models
        ]
        self.answer(200, catalog)

    def serve_voyage(self, url):
        self.answer(404, {"detail": "Not Found"})


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
