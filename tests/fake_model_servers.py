"""Small local model servers that speak the real wire formats of model calls: OpenAI's chat
completions (JSON and SSE chunks) and embeddings, as OpenAI-compatible upstreams serve them;
watsonx.ai's text/chat, text/chat_stream (SSE) and text/embeddings; and IBM's IAM token
endpoint. Each lists its models too, so the registry can route to it."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.fake_upstreams import QuietServer

BASE_PATHS = {"openai": "/v1", "anthropic": "/v1", "rits": "/v1", "watsonx": ""}
IAM_PATH = "/identity/token"


class ModelHTTPServer(QuietServer):
    request_queue_size = 1024  # a benchmark opens hundreds of streams at once


class FakeModelServer:
    """One model server on a free loopback port; what it was sent is kept in `calls`."""

    def __init__(self, flavor="openai", api_key="sk-model-key", models=("gpt-4o", "text-embedding-3-small")):
        self.flavor = flavor
        self.api_key = api_key
        self.models = list(models)
        self.pieces = ["Hel", "lo", "!"]  # the answer's content, one stream chunk each
        self.chunk_interval = 0.0
        self.delay = 0.0  # before answering a model call
        self.forced = None  # (status, document, headers) answered to model calls instead
        self.script = None  # script(handler, body) answers model calls instead: a hostile upstream
        self.iam_script = None  # iam_script(handler) answers token exchanges instead
        self.break_after_chunks = None  # close the connection after this many chunks
        self.token_lifetime = 3600  # of IAM tokens
        self.calls = []  # (path, headers, body) of each model call
        self.iam_exchanges = 0
        self.tokens = set()  # IAM tokens handed out
        self.streams_cut_by_client = 0
        self.is_down = False
        self.lock = threading.Lock()
        handler = type("Handler", (ModelHandler,), {"server_state": self})
        self._server = ModelHTTPServer(("127.0.0.1", 0), handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def root(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self):
        return self.root + BASE_PATHS[self.flavor]

    @property
    def iam_url(self):
        return self.root + IAM_PATH

    def fail_with(self, status, message="forced failure", headers=None):
        self.forced = (status, {"error": {"message": message, "type": "server_error", "code": None}}, headers or {})

    def model_calls(self, suffix):
        return [call for call in self.calls if call[0].endswith(suffix)]

    def down(self):
        """Stop serving: new connections are refused, and kept-alive ones closed unanswered."""
        self.is_down = True
        self._server.shutdown()
        self._server.server_close()


def completion_id():
    return f"chatcmpl-{time.monotonic_ns()}"


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def knobs_of(body):
    """A benchmark's knobs, `fake_pieces=N` and `fake_interval=S` among the words of the last
    message: there they reach the fake through every protocol, unknown fields of the body not."""
    text = (body.get("messages") or [{}])[-1].get("content")
    words = text.split() if isinstance(text, str) else []
    return dict(word.split("=", 1) for word in words if word.startswith(("fake_pieces=", "fake_interval=")))


def pieces_of(state, body):
    """The stream's pieces; a benchmark's `fake_pieces` asks for that many."""
    pieces = knobs_of(body).get("fake_pieces")
    return ["tok "] * int(pieces) if pieces else state.pieces


def interval_of(state, body):
    """Seconds between a stream's chunks; a benchmark's `fake_interval` sets them."""
    return float(knobs_of(body).get("fake_interval", state.chunk_interval))


def tool_call_of(body):
    """A call of the request's first tool, as a model asked to use it would answer."""
    function = body["tools"][0]["function"]["name"]
    return [{"id": "call_1", "type": "function", "function": {"name": function, "arguments": '{"city": "Paris"}'}}]


def message_of(state, body):
    """The answer's message: a tool call when tools were offered to answer the user (after a
    tool's result, the answer), JSON in JSON mode, else the pieces."""
    asks_a_tool = body.get("tools") and body.get("tool_choice", body.get("tool_choice_option")) != "none"
    if asks_a_tool and body["messages"][-1].get("role") == "user":
        return {"role": "assistant", "content": None, "tool_calls": tool_call_of(body)}
    if (body.get("response_format") or {}).get("type") == "json_object":
        return {"role": "assistant", "content": '{"answer": "Hello!"}'}
    return {"role": "assistant", "content": "".join(state.pieces)}


class ModelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server_state = None

    def log_message(self, format, *args):
        pass

    def answer(self, status, document, headers=None):
        self.answer_bytes(status, json.dumps(document).encode(), headers)

    def answer_bytes(self, status, payload, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def trickle(self, payload, piece_size, interval, headers=()):
        """A 200 answer sent a few bytes at a time (no Content-Length: it ends when the connection does)."""
        self.send_response(200)
        for name, value in headers or (("Content-Type", "application/json"),):
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for start in range(0, len(payload), piece_size):
                self.wfile.write(payload[start : start + piece_size])
                self.wfile.flush()
                time.sleep(interval)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the registry gave up, as it should

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return {name: values[0] for name, values in parse_qs(raw.decode()).items()}
        return json.loads(raw) if raw else {}

    # Listing, for routing --------------------------------------------------------------

    def do_GET(self):
        state = self.server_state
        url = urlsplit(self.path)
        if state.flavor == "watsonx" and url.path == "/ml/v1/foundation_model_specs":
            resources = [{"model_id": model, "label": model, "provider": "IBM"} for model in state.models]
            return self.answer(200, {"total_count": len(resources), "resources": resources})
        if url.path != "/v1/models":
            return self.answer(404, {"error": {"message": "not found"}})
        if state.flavor == "anthropic":
            data = [{"type": "model", "id": model, "created_at": "2025-02-19T00:00:00Z"} for model in state.models]
            return self.answer(200, {"data": data, "has_more": False, "last_id": state.models[-1]})
        data = [{"id": model, "object": "model", "created": 1700000000, "owned_by": "fake"} for model in state.models]
        return self.answer(200, {"object": "list", "data": data})

    # Model calls -------------------------------------------------------------------------

    def do_POST(self):
        state = self.server_state
        if state.is_down:
            self.close_connection = True
            return
        url = urlsplit(self.path)
        body = self.read_body()
        if url.path == IAM_PATH:
            return self.serve_iam(body)
        with state.lock:
            state.calls.append((url.path, dict(self.headers), body))
        if state.delay:
            time.sleep(state.delay)
        refusal = self.refusal(url, body)
        if refusal:
            return self.answer(*refusal)
        if state.forced:
            return self.answer(*state.forced)
        if state.script:
            return state.script(self, body)
        route = {
            "/v1/chat/completions": self.serve_openai_chat,
            "/v1/embeddings": self.serve_openai_embeddings,
            "/ml/v1/text/chat": self.serve_watsonx_chat,
            "/ml/v1/text/chat_stream": self.serve_watsonx_chat_stream,
            "/ml/v1/text/embeddings": self.serve_watsonx_embeddings,
        }.get(url.path)
        if route is None:
            return self.answer(404, {"error": {"message": f"no route {url.path}"}})
        return route(body)

    def refusal(self, url, body):
        """What the real server answers to a call without the right key or fields, else None."""
        state = self.server_state
        if state.flavor == "watsonx":
            query = parse_qs(url.query)
            if "version" not in query:
                return 400, {"errors": [{"code": "missing_version", "message": "version is required"}]}
            if self.headers.get("Authorization", "").removeprefix("Bearer ") not in state.tokens:
                return 401, {"errors": [{"code": "authentication_token_not_valid", "message": "bad token"}]}
            if not (body.get("project_id") or body.get("space_id")):
                return 400, {"errors": [{"code": "invalid_input", "message": "project_id or space_id required"}]}
            return None
        sent = self.headers.get("Authorization")
        if sent != f"Bearer {state.api_key}":
            # Like real upstreams, quote the key that was sent: the registry must not repeat it.
            return 401, {"error": {"message": f"Incorrect API key provided: {sent}", "type": "invalid_request_error"}}
        if state.flavor == "rits" and self.headers.get("RITS_API_KEY") != state.api_key:
            return 401, {"error": {"message": "RITS_API_KEY missing"}}
        if body.get("model") not in state.models:
            return 404, {
                "error": {"message": f"The model {body.get('model')} does not exist", "code": "model_not_found"}
            }
        return None

    def serve_iam(self, form):
        state = self.server_state
        if state.iam_script:
            return state.iam_script(self)
        if form.get("grant_type") != "urn:ibm:params:oauth:grant-type:apikey" or form.get("apikey") != state.api_key:
            return self.answer(400, {"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found."})
        with state.lock:
            state.iam_exchanges += 1
            token = f"iam-token-{state.iam_exchanges}"
            state.tokens.add(token)
        time.sleep(0.05)  # an exchange takes a moment, so concurrent callers overlap
        now = int(time.time())
        lifetime = state.token_lifetime
        document = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "expiration": now + lifetime}
        return self.answer(200, document)

    def start_stream(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def send_events(self, events, interval):
        """Each event as it is due; a client gone away (the registry closing its call) is counted."""
        state = self.server_state
        try:
            for number, event in enumerate(events):
                if state.break_after_chunks is not None and number >= state.break_after_chunks:
                    return  # the connection closes without [DONE]
                self.wfile.write(event)
                self.wfile.flush()
                if interval:
                    time.sleep(interval)
        except (BrokenPipeError, ConnectionResetError):
            with state.lock:
                state.streams_cut_by_client += 1
        finally:
            self.close_connection = True

    def serve_openai_chat(self, body):
        state = self.server_state
        identity = {"id": completion_id(), "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            choice = {"index": 0, "message": message_of(state, body), "finish_reason": "stop", "logprobs": None}
            completion = {**identity, "object": "chat.completion", "choices": [choice], "usage": USAGE}
            return self.answer(200, {**completion, "system_fingerprint": "fp_fake"})
        self.start_stream()
        self.send_events(self.openai_events(state, body, identity), interval_of(state, body))

    def openai_events(self, state, body, identity):
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        usage = {"usage": None} if include_usage else {}

        def chunk(delta, finish_reason=None):
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            document = {**identity, "object": "chat.completion.chunk", "choices": [choice], **usage}
            return b"data: " + json.dumps(document).encode() + b"\n\n"

        message = message_of(state, body)
        pieces = pieces_of(state, body)
        if message.get("tool_calls"):
            yield chunk(
                {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **message["tool_calls"][0]}]}
            )
        else:
            yield chunk({"role": "assistant", "content": ""})
            for piece in pieces if message["content"] == "".join(state.pieces) else [message["content"]]:
                yield chunk({"content": piece})
        yield chunk({}, "tool_calls" if message.get("tool_calls") else "stop")
        if include_usage:
            document = {**identity, "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
            yield b"data: " + json.dumps(document).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def serve_openai_embeddings(self, body):
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": index, "embedding": [0.5, -0.25, float(len(str(text)))]}
            for index, text in enumerate(inputs)
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return self.answer(200, {"object": "list", "data": data, "model": body["model"], "usage": usage})

    def watsonx_identity(self, body):
        return {
            "id": completion_id(),
            "model_id": body["model_id"],
            "model": body["model_id"],
            "created": int(time.time()),
            "model_version": "1.0.0",
            "created_at": "2024-10-13T09:27:40.835Z",
        }

    def serve_watsonx_chat(self, body):
        choice = {"index": 0, "message": message_of(self.server_state, body), "finish_reason": "stop"}
        return self.answer(200, {**self.watsonx_identity(body), "choices": [choice], "usage": USAGE})

    def serve_watsonx_chat_stream(self, body):
        state = self.server_state
        identity = self.watsonx_identity(body)

        message = message_of(state, body)

        def events():
            if message.get("tool_calls"):
                pieces = [{"role": "assistant", "tool_calls": [{"index": 0, **message["tool_calls"][0]}]}]
            else:
                pieces = [{"role": "assistant", "content": ""}] + [{"content": piece} for piece in state.pieces]
            for number, delta in enumerate(pieces, start=1):
                choice = {"index": 0, "finish_reason": None, "delta": delta}
                data = json.dumps({**identity, "choices": [choice]})
                yield f"id: {number}\nevent: message\ndata: {data}\n\n".encode()
            finish = "tool_calls" if message.get("tool_calls") else "stop"
            last = {**identity, "choices": [{"index": 0, "finish_reason": finish, "delta": {}}], "usage": USAGE}
            yield f"id: {len(pieces) + 1}\nevent: message\ndata: {json.dumps(last)}\n\n".encode()

        self.start_stream()
        self.send_events(events(), interval_of(state, body))

    def serve_watsonx_embeddings(self, body):
        results = [{"embedding": [0.5, -0.25, float(len(text))]} for text in body["inputs"]]
        document = {
            "model_id": body["model_id"],
            "results": results,
            "created_at": "2024-10-13T09:27:40.835Z",
            "input_token_count": len(body["inputs"]),
        }
        return self.answer(200, document)


def main():
    """Serve one OpenAI-compatible fake until killed, printing its port (bench/gateway.py)."""
    server = FakeModelServer("openai", api_key="sk-bench", models=["gpt-4o"])
    print(server.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
