"""FakeUpstream: one fake provider of a flavor, on a free loopback port, serving its
format's listing and calls; what a test turns (the knobs) and what it was sent."""

import threading

from tests.fakes.anthropic import AnthropicHandler
from tests.fakes.openai import OpenAIHandler
from tests.fakes.server import QuietServer
from tests.fakes.watsonx import IAM_PATH, WatsonxHandler

# Each flavor: the handler of its wire format, and the path its base_url adds to the server's root.
FLAVORS = {
    "openai": (OpenAIHandler, "/v1"),
    "rits": (OpenAIHandler, "/v1"),
    "github": (OpenAIHandler, "/inference"),
    "voyage": (OpenAIHandler, "/v1"),
    "watsonx": (WatsonxHandler, ""),
    "anthropic": (AnthropicHandler, "/v1"),
}


class FakeUpstream:
    """One upstream provider; it can go down and come back on the same port.

    Knobs, each for every listing and call unless said: `delay` (seconds before answering),
    `hold()`/`release()` (`held` is set once a request waits), `rendezvous`, `silent` (read
    the request, never answer), `trickle_interval` (answer one byte every that many
    seconds), `answer_with(...)` and `fail_with(...)` (one forced answer for all);
    for listings `streamed_bytes`; for model calls `script(handler, body)` (a hostile
    upstream), `pieces` (the answer's text, a stream chunk each), `chunk_interval`,
    `break_after_chunks`; for IAM `iam_script(handler)` and `token_lifetime`.

    Seen: `hits` (listings and calls), `calls` ((path, headers, body) of each call),
    `sent_bytes` (of trickles and streamed listings), `iam_exchanges` and `tokens`,
    `streams_cut_by_client`.
    """

    def __init__(
        self,
        flavor="openai",
        api_key="sk-model-key",
        models=("gpt-4o", "gpt-4o-mini", "text-embedding-3-small"),
        delay=0.0,
    ):
        self.flavor = flavor
        self.api_key = api_key
        self.models = list(models)
        self.delay = delay
        self.pieces = ["Hel", "lo", "!"]
        self.chunk_interval = 0.0
        self.forced = None  # (status, document or bytes, headers)
        self.failure = None  # (status, message, headers): an error in the format's shape
        self.script = None
        self.iam_script = None
        self.silent = False
        self.trickle_interval = None
        self.streamed_bytes = None  # a listing of about this size, without Content-Length
        self.rendezvous = None  # answer 503 unless enough requests are in flight at once
        self.break_after_chunks = None  # close a stream after this many events
        self.token_lifetime = 3600
        self.hits = 0
        self.connections = 0  # accepted
        self.calls = []
        self.sent_bytes = 0
        self.iam_exchanges = 0
        self.tokens = set()
        self.streams_cut_by_client = 0
        self.held = None
        self._release = None
        self._lock = threading.Lock()
        self._server = None
        self.port = None
        self.up()

    @property
    def root(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self):
        return self.root + FLAVORS[self.flavor][1]

    @property
    def iam_url(self):
        return self.root + IAM_PATH

    # Up and down -----------------------------------------------------------------------------

    def up(self):
        handler_class, base_path = FLAVORS[self.flavor]
        handler = type("Handler", (handler_class,), {"upstream": self, "base_path": base_path})
        self.stopped = threading.Event()
        self._server = QuietServer(("127.0.0.1", self.port or 0), handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self):
        """Stop serving: new connections are refused, and open ones closed."""
        self.stopped.set()
        self._server.close()

    # Knobs -----------------------------------------------------------------------------------

    def answer_with(self, status, body, headers=None):
        """Answer every listing and call with this status and body (a document, or raw bytes)."""
        self.forced = (status, body, headers or {})

    def fail_with(self, status, message="forced failure", headers=None):
        """Answer every listing and call with this status and an error in the format's shape."""
        self.failure = (status, message, headers or {})

    def hold(self):
        """Keep every request waiting, once it arrived (`held` is set), until release()."""
        self.held, self._release = threading.Event(), threading.Event()

    def release(self):
        self._release.set()

    def wait_if_held(self):
        if self._release is not None:
            self.held.set()
            self._release.wait(timeout=30)

    # What it was sent ------------------------------------------------------------------------

    def count_hit(self, path, headers, body):
        """One listing (body None) or call."""
        with self._lock:
            self.hits += 1
            if body is not None:
                self.calls.append((path, headers, body))

    def count_connection(self):
        with self._lock:
            self.connections += 1

    def count_sent(self, size):
        with self._lock:
            self.sent_bytes += size

    def count_cut_stream(self):
        with self._lock:
            self.streams_cut_by_client += 1

    def new_iam_token(self):
        with self._lock:
            self.iam_exchanges += 1
            token = f"iam-token-{self.iam_exchanges}"
            self.tokens.add(token)
        return token
