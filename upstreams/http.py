"""What every upstream call shares: the one pooled HTTP client, the request and the failures
it can meet, the answer read within its size cap and checked for shape, the SSE events of
a stream, and removing the provider's key (and any token) from upstream text.

The caller bounds the socket work by the call's deadline (upstreams/transport.py).
"""

import base64
import binascii
import bisect
import json
import re
import string
import threading
from contextlib import closing, suppress
from functools import lru_cache
from itertools import islice
from urllib.parse import unquote

import httpx

from serving.hub import off_the_hub
from upstreams.errors import UpstreamError, UpstreamFailure, UpstreamRefusal, UpstreamTimeout
from upstreams.transport import DeadlineTransport, answer_begun, at_most

UPSTREAM_TEXT_LIMIT = 2000  # an upstream error's message, as passed on
UPSTREAM_FIELD_LIMIT = 200  # its type, param and code
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a non-streamed answer (or error)
MAX_EVENT_BYTES = 1024 * 1024  # one line, and one event, of a stream
FLOAT32_MAX = 3.4028234663852886e38
MAX_COUNT = 2**53  # the largest token count taken from an upstream
# What is read after a stream's last event, to keep its connection (read_the_rest).
REST_SECONDS, REST_EVENTS = 0.05, 4
REDACTED = "[redacted]"


MAX_LISTING_BYTES = 4 * 1024 * 1024
# Listings, probes and manifest fetches at once: a probe round's threads (jobs/prober.py) each
# need a connection, so that none waits for one behind black-holed upstreams.
LISTING_CONNECTIONS = 1000
DEFAULT_GATEWAY_CONNECTIONS = 800
INLINE_JSON_BYTES = 64 * 1024  # parsed in well under a millisecond


class Clients:
    """The process's two pools: the gateway's, capped at the calls a worker lets in at once
    (access/limits.py), and the listings' own, so that model calls never starve a probe."""

    def __init__(self):
        self.gateway_connections = DEFAULT_GATEWAY_CONNECTIONS
        self._clients = {}
        self._lock = threading.Lock()

    def get(self, purpose):
        with self._lock:
            if purpose not in self._clients:
                cap = self.gateway_connections if purpose == "gateway" else LISTING_CONNECTIONS
                self._clients[purpose] = new_client(cap)
            return self._clients[purpose]


class KeptNone(httpx.Cookies):
    """A cookie jar that keeps no cookie (httpx's client has no switch for that)."""

    def extract_cookies(self, response):
        pass


KEPT_NONE = KeptNone()


class UpstreamClient(httpx.Client):
    """httpx's client with a cookie jar that keeps nothing: a cookie an upstream sets (a
    session, an affinity) came with one caller's call, and is never sent with another's."""

    @property
    def cookies(self):
        return KEPT_NONE


def new_client(max_connections):
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=20)
    # Uncompressed answers: the size cap then counts what the upstream really sent.
    return UpstreamClient(
        transport=DeadlineTransport(limits),
        headers={"Accept-Encoding": "identity"},
        follow_redirects=False,
        trust_env=False,
    )


clients = Clients()


def cap_gateway_connections(max_connections):
    """The gateway pool's cap in this process (create_app gives a worker's gateway share)."""
    clients.gateway_connections = max_connections


def http_client():
    """The client of listings, probes and manifest fetches."""
    return clients.get("listing")


def gateway_client():
    """The client of model calls."""
    return clients.get("gateway")


def read_capped(response, limit=MAX_LISTING_BYTES):
    """The answer's body, refused once it is over `limit` bytes (read in chunks, never whole)."""
    too_large = UpstreamFailure(f"the upstream's answer is over {limit // (1024 * 1024)} MiB (refused)")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def json_of(text, parse_constant=None, secrets=()):
    """The JSON document in `text` (str or bytes), without the secrets; `parse_constant` as
    json.loads takes it (listings take NaN, whose entries are then left out; the gateway
    refuses it)."""
    try:
        return without_secrets(json.loads(text, parse_constant=parse_constant), text, secrets)
    except RecursionError:
        raise UpstreamFailure("unexpected response from the upstream: JSON nested too deep") from None
    except ValueError:  # UnicodeDecodeError included
        raise UpstreamFailure("unexpected response from the upstream: not JSON") from None


def parse_json(body, parse_constant=None, secrets=()):
    """The JSON document of an upstream's body: a large one parsed in a thread (a few MiB of
    JSON is milliseconds of CPU, which would stall the worker's other connections), a small
    one here, where the hand-off to a thread would cost more than the parse."""
    if len(body) <= INLINE_JSON_BYTES:
        return json_of(body, parse_constant, secrets)
    return off_the_hub(json_of, body, parse_constant, secrets)


def refuse_constant(name):
    """NaN and Infinity are not JSON: an answer holding them would be relayed as invalid JSON."""
    raise ValueError(f"{name} is not JSON")


def strict_json(body, secrets=()):
    return parse_json(body, refuse_constant, secrets)


# Secrets out of upstream text ---------------------------------------------------------------
#
# An upstream may echo what it was sent: in an error (a key it refused, a request it dumps) or
# in an answer (a test server reflecting its Authorization header). The provider's key goes
# wherever MIN_KEY_RUN of its characters stand in a row (a key with its end masked, a key cut
# across two fields); an IAM token goes whole. Each is looked for as sent, behind JSON escapes
# (`\u0073k-...`), percent-encoded, and in base64 whatever its line breaks, ASCII case ignored.

MIN_KEY_RUN = 12
MAX_FOUND_PIECES = 32  # a key of up to 192 characters is looked for piece by piece, at C speed
BASE64_PIECE = 8
# A JSON escape, or a run of percent-encoded bytes: undone before secrets are looked for.
ESCAPE = re.compile(r'\\u([0-9a-fA-F]{4})|\\(["\\/bfnrt])|((?:%[0-9a-fA-F]{2})+)')
ASCII_ESCAPE = re.compile(r"\\u00[2-7][0-9a-fA-F]|\\/")  # a printable ASCII character escaped in JSON
JSON_ESCAPED = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}  # the others stand for themselves
# What may stand between two characters of wrapped base64: white space, or its JSON escapes.
WRAPPING = re.compile(r"(?:\s|\\[nrt])+")
# Case is ignored in ASCII only, and a space may show as +: the length of a text stays the same.
NORMAL = str.maketrans(string.ascii_uppercase + "+", string.ascii_lowercase + " ")


def normal(text):
    return text.translate(NORMAL)


def base64_cores(secret):
    """What any base64 (standard or URL-safe) of a text holding the secret contains, whatever
    the secret's offset: the characters that encode only the secret's bytes."""
    raw = secret.encode()
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw).decode()
        core = encoded[-(-8 * offset // 6) : 8 * (offset + len(raw)) // 6]
        if len(core) >= 8:  # shorter pieces would match innocent text
            cores |= {core, core.translate(str.maketrans("+/", "-_"))}
    return cores


class Secret:
    """A secret as it is looked for: every run of at least `min_run` of its characters.

    Such a run covers one of the secret's pieces of (min_run + 1) // 2 characters at offsets
    0, piece, 2 * piece, ...: each is found at C speed (str.find), and only around one is the
    run measured, character by character. A long secret, with more such pieces than
    MAX_FOUND_PIECES, instead has every piece of it (at any offset) looked up at every
    piece-th place of the text: a cost that does not grow with the secret.
    """

    def __init__(self, text, min_run):
        self.length = len(text)
        self.text = normal(text)
        self.min_run = min(min_run, self.length)
        self.piece = (self.min_run + 1) // 2
        aligned = range(0, self.length - self.piece + 1, self.piece)
        self.scanned = len(aligned) > MAX_FOUND_PIECES
        self.pieces = {}
        for offset in range(self.length - self.piece + 1) if self.scanned else aligned:
            self.pieces.setdefault(self.text[offset : offset + self.piece], []).append(offset)
        self.base64_cores = base64_cores(text)

    def hits(self, view):
        """(where in `view`, offset in the secret) of its pieces in `view`: one in each run, at least."""
        if self.scanned:
            for at in range(0, len(view) - self.piece + 1, self.piece):
                for offset in self.pieces.get(view[at : at + self.piece], ()):
                    yield at, offset
            return
        for piece, offsets in self.pieces.items():
            at = view.find(piece)
            while at >= 0:
                for offset in offsets:
                    yield at, offset
                at = view.find(piece, at + 1)

    def runs(self, view):
        """(start, end) in `view` (normalized) of each run of at least min_run of the secret's characters."""
        runs, measured = [], {}  # measured: shift (where the secret would start) -> the runs measured on it
        for at, offset in self.hits(view):
            shift = at - offset
            if any(start <= at < end for start, end in measured.get(shift, ())):
                continue  # a piece of a run already measured
            run = self.run_around(view, shift, offset)
            measured.setdefault(shift, []).append(run)
            if run[1] - run[0] >= self.min_run:
                runs.append(run)
        return runs

    def run_around(self, view, shift, offset):
        """How far `view` agrees with the secret around its piece at `offset`, found at `shift + offset`."""
        start, end = offset, offset + self.piece
        while start > 0 and shift + start > 0 and view[shift + start - 1] == self.text[start - 1]:
            start -= 1
        while end < self.length and shift + end < len(view) and view[shift + end] == self.text[end]:
            end += 1
        return shift + start, shift + end


@lru_cache(maxsize=1024)
def secret(text, min_run):
    """The Secret of a text, made once per process: a provider's key is looked for on every call."""
    return Secret(text, min_run)


def secrets_of(target, *tokens):
    """What an upstream's text must lose: the provider's key, and the tokens (its IAM tokens) whole."""
    wanted = [secret(target.api_key, MIN_KEY_RUN), *(secret(token, len(token)) for token in tokens)]
    return [secret for secret in wanted if secret.length]


def wrapped_end(view, at, core):
    """Where the base64 `core` ends when it starts at `at` in `view`, line breaks and white
    space inside it skipped; None when it does not stand there whole."""
    matched = 0
    while matched < len(core):
        gap = WRAPPING.match(view, at) if matched else None
        at = gap.end() if gap else at
        if at >= len(view) or view[at] != core[matched]:
            return None
        at, matched = at + 1, matched + 1
    return at


def base64_spans(view, secrets):
    """(start, end) in `view` of each base64 core of a secret, white space inside it ignored.

    Wrapped lines being longer than 16 characters, one of a core's first two 8-character
    pieces stands unbroken: found at C speed, the core is then followed from there.
    """
    spans = set()
    for core in {core for secret in secrets for core in secret.base64_cores}:
        for offset in (0, BASE64_PIECE):
            piece = core[offset : offset + BASE64_PIECE]
            at = view.find(piece) if len(piece) == BASE64_PIECE else -1
            while at >= 0:
                start = base64_start(view, at, core, offset)
                end = wrapped_end(view, start, core) if start is not None else None
                if end is not None:
                    spans.add((start, end))
                at = view.find(piece, at + 1)
    return list(spans)


def base64_start(view, at, core, offset):
    """Where `core` would start in `view` when its character `offset` stands at `at` (white
    space, or its JSON escapes, skipped); None when the characters before do not agree."""
    for character in reversed(core[:offset]):
        at -= 1
        while at >= 0 and view[at] != character:
            if view[at].isspace():
                at -= 1
            elif at >= 1 and view[at - 1] == "\\" and view[at] in "nrt":
                at -= 2
            else:
                return None
        if at < 0:
            return None
    return at


def secret_spans(view, secrets):
    """(start, end) of every place in `view` where a secret shows, as sent or in base64."""
    normalized = normal(view)
    return [span for secret in secrets for span in secret.runs(normalized)] + base64_spans(view, secrets)


class Decoded:
    """A text with its JSON escapes and percent-encoding undone (`view`), and the way back:
    each escape's place in the view and in the text."""

    def __init__(self, text):
        self.text = text
        self.view_starts, self.view_ends, self.text_starts, self.text_ends = [], [], [], []
        pieces, position, size = [], 0, 0
        for escape in escapes_in(text):
            literal = text[position : escape.start()]
            meaning = unescaped(escape)
            pieces += [literal, meaning]
            self.view_starts.append(size + len(literal))
            size += len(literal) + len(meaning)
            self.view_ends.append(size)
            self.text_starts.append(escape.start())
            self.text_ends.append(escape.end())
            position = escape.end()
        pieces.append(text[position:])
        self.view = "".join(pieces)

    def in_text(self, position, end=False):
        """Where a view position falls in the text: an escape it falls in is taken whole."""
        escape = bisect.bisect_right(self.view_starts, position) - 1
        if escape < 0:
            return position
        if position < self.view_ends[escape]:
            inside = end and position > self.view_starts[escape]
            return self.text_ends[escape] if inside else self.text_starts[escape]
        return self.text_ends[escape] + position - self.view_ends[escape]

    def redacted(self, view_spans):
        """The text with each span (of the view) replaced by REDACTED, overlapping spans as one."""
        spans = sorted((self.in_text(start), self.in_text(end, end=True)) for start, end in view_spans)
        pieces, position = [], 0
        for start, end in spans:
            if start >= position:
                pieces += [self.text[position:start], REDACTED]
            position = max(position, end)
        return "".join(pieces) + self.text[position:]


def escapes_in(text):
    """Each JSON or percent escape in the text, in order; the places where one may start
    are found at C speed (a regular expression would look at every character)."""
    next_at = {marker: text.find(marker) for marker in "\\%"}
    while any(at >= 0 for at in next_at.values()):
        at = min(at for at in next_at.values() if at >= 0)
        escape = ESCAPE.match(text, at)
        if escape:
            yield escape
        end = escape.end() if escape else at + 1
        for marker, found in next_at.items():
            if 0 <= found < end:
                next_at[marker] = text.find(marker, end)


def unescaped(escape):
    code, character, percent_encoded = escape.groups()
    if code:
        return chr(int(code, 16))
    if character:
        return JSON_ESCAPED.get(character, character)
    return bytes.fromhex(percent_encoded.replace("%", "")).decode(errors="replace")


def redact(text, secrets):
    """The text without the secrets, in any of the forms they are looked for in."""
    if not secrets:
        return text
    decoded = Decoded(text)
    spans = secret_spans(decoded.view, secrets)
    return decoded.redacted(spans) if spans else text


def scrubbed(value, limit, secrets):
    """An upstream error field as text (JSON when it is not a string), its secrets removed
    and then cut to `limit`; None stays None.

    Only the text's start is scrubbed (a long text would hold the worker for a scan of
    megabytes): `margin` covers the longest form a secret can take (12 characters for each
    of its own: a percent-encoded 4-byte character, or a JSON-escaped surrogate pair; its
    base64 is shorter, with line breaks as wrapping puts them), so a secret cut off at the
    end of the piece can only be in its last `margin` characters, which are dropped.
    """
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    margin = max((12 * secret.length for secret in secrets), default=0)
    if len(text) <= limit + margin:
        return redact(text, secrets)[:limit]
    piece = redact(text[: limit + 2 * margin], secrets)
    return piece[: min(limit, len(piece) - margin)]


def may_hold(text, secrets):
    """Whether a secret may show in the text, looked for at C speed: as sent, and
    percent-decoded (its JSON escapes are not undone)."""
    views = [text, unquote(text)] if "%" in text else [text]
    return any(secret_spans(view, secrets) for view in views)


def strings_redacted(value, secrets):
    """A JSON document with the secrets removed from each of its strings (object keys too)."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [strings_redacted(item, secrets) for item in value]
    if isinstance(value, dict):
        return {redact(key, secrets): strings_redacted(item, secrets) for key, item in value.items()}
    return value


def without_secrets(document, raw, secrets):
    """An accepted answer (or stream chunk), parsed from `raw`, with the secrets removed
    from each of its strings.

    The answer is looked through whole once, at C speed (as received, or as JSON writes it
    again when it escapes printable ASCII characters, as no common encoder does); only one
    where a secret may show has its strings scrubbed one by one. So the work is linear in
    the answer's size: up to 16 MiB for an answer, 1 MiB for an event.
    """
    if not secrets:
        return document
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if ASCII_ESCAPE.search(text):
        text = json.dumps(document, ensure_ascii=False)
    return strings_redacted(document, secrets) if may_hold(text, secrets) else document


def error_fields(document):
    """{message, type, param, code} as far as the upstream's error document gives them."""
    if not isinstance(document, dict):
        return {}
    if isinstance(document.get("error"), dict):  # OpenAI and most compatible servers
        return {key: document["error"][key] for key in ("message", "type", "param", "code") if key in document["error"]}
    errors = document.get("errors")
    if isinstance(errors, list) and errors:  # watsonx
        first = errors[0]
        return (
            {"message": first.get("message"), "code": first.get("code")}
            if isinstance(first, dict)
            else {"message": first}
        )
    if isinstance(document.get("error"), str):
        return {"message": document["error"]}
    return {}


def upstream_error(response, target, *secrets):
    """The upstream's error as OpenAI's {message, type, param, code} of text or null, whatever
    shape it used, without the key or the secrets, cut to size."""
    body = read_body(response, target)
    try:
        document = strict_json(body)
    except UpstreamError:
        document = None
    error = {"message": body.decode(errors="replace"), "type": "upstream_error", "param": None, "code": None}
    error.update(error_fields(document))
    secrets = secrets_of(target, *secrets)
    passed_on = {key: scrubbed(value, UPSTREAM_FIELD_LIMIT, secrets) for key, value in error.items()}
    passed_on["message"] = scrubbed(error["message"], UPSTREAM_TEXT_LIMIT, secrets) or f"HTTP {response.status_code}"
    passed_on["type"] = passed_on["type"] or "upstream_error"
    return passed_on


# Requests and answers -----------------------------------------------------------------------


def check_status(response, target, *secrets):
    """Return when the upstream accepted the call (2xx); pass its 4xx about the request on;
    anything else (429, 5xx, 3xx, the registry's key refused) fails this provider."""
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (401, 403):
        # The registry's key for this provider, not the client's token, was refused.
        raise UpstreamFailure(f"provider {target.provider_id} rejected the registry's API key", status=status)
    if 400 <= status < 500 and status != 429:
        raise UpstreamRefusal(status, upstream_error(response, target, *secrets))
    raise UpstreamFailure(
        f"provider {target.provider_id} answered HTTP {status}",
        status=status,
        retry_after=response.headers.get("Retry-After"),
    )


def open_response(target, method, url, deadline, *, headers=None, json_body=None, params=None, data=None, secrets=()):
    """The upstream's accepted response, streaming (the caller closes it), or the failure.

    Retries are ours (the failover to the next provider), never the HTTP client's.
    """
    client = gateway_client()
    request = client.build_request(
        method, url, headers=headers, json=json_body, params=params, data=data, timeout=deadline.timeout
    )
    try:
        response = client.send(request, stream=True)
    except httpx.ConnectTimeout:
        if deadline.remaining() <= 0:
            raise UpstreamTimeout(f"provider {target.provider_id} could not be reached in time") from None
        raise UpstreamFailure(f"could not connect to provider {target.provider_id} in time") from None
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"provider {target.provider_id} did not answer in time") from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError):
        raise UpstreamFailure(f"could not reach provider {target.provider_id}") from None
    try:
        check_status(response, target, *secrets)
    except BaseException:
        response.close()
        raise
    return response


def read_body(response, target):
    """The response's body, up to MAX_ANSWER_BYTES: its answer has begun (its headers came),
    so it is read within the call's deadline alone."""
    try:
        with answer_begun():
            return read_capped(response, MAX_ANSWER_BYTES)
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"provider {target.provider_id} did not answer in time") from None
    except httpx.HTTPError:
        raise UpstreamFailure(f"provider {target.provider_id} broke off its answer") from None
    except UpstreamError as error:
        raise UpstreamFailure(f"provider {target.provider_id}: {error}") from None


def read_json(response, target, *tokens):
    """The accepted response's JSON body (and the response closed), without the key or the tokens."""
    with closing(response):
        body = read_body(response, target)
    try:
        return strict_json(body, secrets_of(target, *tokens))
    except UpstreamError as error:
        raise UpstreamFailure(f"provider {target.provider_id}: {error}") from None


# The shapes of answers ----------------------------------------------------------------------


def is_count(value):
    """A token count: an integer a double holds exactly (the metrics add them up as doubles;
    a larger one is no real count, and would overflow or stick a counter at +Inf)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def is_usage(usage):
    """Absent, or an object whose token counts (those the gateway counts) are integers in range."""
    if usage is None:
        return True
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    return isinstance(usage, dict) and all(usage.get(name) is None or is_count(usage[name]) for name in counts)


def is_list_of_objects(value):
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def is_float32_base64(text):
    try:
        return len(base64.b64decode(text, validate=True)) % 4 == 0
    except binascii.Error:
        return False


def is_vector(embedding):
    """A list of numbers float32 can hold (NaN and infinities excluded), or their base64."""
    if isinstance(embedding, str):
        return is_float32_base64(embedding)
    return isinstance(embedding, list) and all(
        isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX
        for value in embedding
    )


def wrong_shape(target, what):
    return UpstreamFailure(f"provider {target.provider_id} answered {what} of an unexpected shape")


def checked_completion(document, target, what="a chat completion"):
    """The completion (or stream chunk): an object whose `choices` is a list of objects, its
    `usage` absent or counted in integers; else this provider failed."""
    if not (isinstance(document, dict) and is_list_of_objects(document.get("choices"))):
        raise wrong_shape(target, what)
    if not is_usage(document.get("usage")):
        raise wrong_shape(target, f"{what} with a usage")
    return document


def checked_embeddings(document, target):
    """The embeddings: an object whose `data` is a list of objects, each `embedding` a vector."""
    data = document.get("data") if isinstance(document, dict) else None
    if not (is_list_of_objects(data) and all(is_vector(item.get("embedding")) for item in data)):
        raise wrong_shape(target, "embeddings")
    if not is_usage(document.get("usage")):
        raise wrong_shape(target, "embeddings with a usage")
    return document


# Streams ------------------------------------------------------------------------------------


def capped_lines(response, target):
    """The stream's lines (bytes) as they arrive; a line longer than MAX_EVENT_BYTES fails it.
    Lines end with LF (a CR before it is dropped), as every SSE server ends them."""
    too_long = UpstreamFailure(f"provider {target.provider_id} sent a stream line over {MAX_EVENT_BYTES} bytes")
    pending = b""
    for chunk in response.iter_bytes():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
        if len(pending) > MAX_EVENT_BYTES:
            raise too_long
    if pending:
        yield pending


def sse_events(response, target):
    """The data of each server-sent event, as each arrives; the stream's own errors raised as
    ours, and an event over MAX_EVENT_BYTES a failure."""
    data_lines, size = [], 0
    try:
        for line in capped_lines(response, target):
            if line.startswith(b"data:"):
                data_lines.append(line[5:].removeprefix(b" "))
                size += len(data_lines[-1])
                if size > MAX_EVENT_BYTES:
                    raise UpstreamFailure(f"provider {target.provider_id} sent an event over {MAX_EVENT_BYTES} bytes")
            elif not line and data_lines:
                yield b"\n".join(data_lines)
                data_lines, size = [], 0
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"provider {target.provider_id} stopped sending in time") from None
    except httpx.HTTPError:
        raise UpstreamFailure(f"provider {target.provider_id} broke off its stream") from None
    if data_lines:
        yield b"\n".join(data_lines)


def has_finished(event):
    return any(choice.get("finish_reason") for choice in event["choices"])


def read_the_rest(events):
    """Read what follows a stream's last event (the end of its chunked body) for a moment,
    so that its connection goes back to the pool instead of being closed: a new connection
    for every stream costs a connect (and a TLS handshake). Whatever comes or fails is dropped."""
    with suppress(UpstreamError), at_most(REST_SECONDS):
        for _ in islice(events, REST_EVENTS):
            pass


def json_events(response, target, *tokens):
    """Each event of an SSE stream as a checked chunk without the key or the tokens, until
    `[DONE]`; an error event raises (without them too), and so does a stream that ends
    before the model finished (a cut connection)."""
    finished = False
    secrets = secrets_of(target, *tokens)
    events = sse_events(response, target)
    for data in events:
        if data.strip() == b"[DONE]":
            read_the_rest(events)
            return
        try:
            event = json_of(data, refuse_constant, secrets)
        except UpstreamError as error:
            raise UpstreamFailure(f"provider {target.provider_id} sent an event that is not usable: {error}") from None
        if isinstance(event, dict) and "error" in event and "choices" not in event:
            message = scrubbed(event["error"], UPSTREAM_TEXT_LIMIT, secrets)
            raise UpstreamFailure(f"provider {target.provider_id} failed mid-stream: {message}")
        checked_completion(event, target, "a stream chunk")
        finished = finished or has_finished(event)
        yield event
    if not finished:
        raise UpstreamFailure(f"provider {target.provider_id} ended its stream before the model finished")


def started(chunks, target):
    """The stream with its first chunk already read, so that a provider whose stream fails
    before any chunk fails the attempt (and the next provider is tried)."""
    try:
        first = next(chunks)
    except StopIteration:
        raise UpstreamFailure(f"provider {target.provider_id} ended its stream without a chunk") from None
    except BaseException:
        chunks.close()
        raise

    def resumed():
        with closing(chunks):
            yield first
            yield from chunks

    return resumed()
