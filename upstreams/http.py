"""What every upstream call shares: the one pooled HTTP client, the request and the failures
it can meet, the answer read within its size cap and checked for shape, the SSE events of
a stream, and removing the provider's key (and any token) from upstream text.

The caller bounds the socket work by the call's deadline (upstreams/transport.py).
"""

import base64
import binascii
import json
import re
import threading
from contextlib import closing

import httpx

from serving.hub import off_the_hub
from upstreams.errors import UpstreamError, UpstreamFailure, UpstreamRefusal, UpstreamTimeout
from upstreams.transport import DeadlineTransport

UPSTREAM_TEXT_LIMIT = 2000  # an upstream error's message, as passed on
UPSTREAM_FIELD_LIMIT = 200  # its type, param and code
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a non-streamed answer (or error)
MAX_EVENT_BYTES = 1024 * 1024  # one line, and one event, of a stream
FLOAT32_MAX = 3.4028234663852886e38
REDACTED = "[redacted]"


MAX_LISTING_BYTES = 4 * 1024 * 1024
INLINE_JSON_BYTES = 64 * 1024  # parsed in well under a millisecond

_client = None
_client_lock = threading.Lock()


def http_client():
    global _client
    with _client_lock:
        if _client is None:
            # No cap on connections: the prober's threads bound them, and a probe waiting for a
            # pooled connection behind black-holed upstreams would fail for their delay.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=20)
            # Uncompressed answers: the size cap then counts what the upstream really sent.
            _client = httpx.Client(
                transport=DeadlineTransport(limits),
                headers={"Accept-Encoding": "identity"},
                follow_redirects=False,
                trust_env=False,
            )
        return _client


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


def json_of(text, parse_constant=None):
    """The JSON document in `text` (str or bytes); `parse_constant` as json.loads takes it
    (listings take NaN, whose entries are then left out; the gateway refuses it)."""
    try:
        return json.loads(text, parse_constant=parse_constant)
    except RecursionError:
        raise UpstreamFailure("unexpected response from the upstream: JSON nested too deep") from None
    except ValueError:  # UnicodeDecodeError included
        raise UpstreamFailure("unexpected response from the upstream: not JSON") from None


def parse_json(body, parse_constant=None):
    """The JSON document of an upstream's body: a large one parsed in a thread (a few MiB of
    JSON is milliseconds of CPU, which would stall the worker's other connections), a small
    one here, where the hand-off to a thread would cost more than the parse."""
    if len(body) <= INLINE_JSON_BYTES:
        return json_of(body, parse_constant)
    return off_the_hub(json_of, body, parse_constant)


def refuse_constant(name):
    """NaN and Infinity are not JSON: an answer holding them would be relayed as invalid JSON."""
    raise ValueError(f"{name} is not JSON")


def strict_json(body):
    return parse_json(body, refuse_constant)


# Secrets out of upstream text ---------------------------------------------------------------


def percent_encodable(character):
    """The character as sent or percent-encoded (either case of hex digits; a space also as +)."""
    forms = [re.escape(character), "".join(f"%{byte:02x}" for byte in character.encode())]
    return "(?:" + "|".join(forms + (["\\+"] if character == " " else [])) + ")"


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


def secret_pattern(secret):
    url_encoded = "".join(percent_encodable(character) for character in secret)
    return "|".join([url_encoded, *(re.escape(core) for core in sorted(base64_cores(secret)))])


def redact(text, *secrets):
    """The text without the secrets: as sent, URL-encoded or in base64 (case ignored)."""
    patterns = [secret_pattern(secret) for secret in secrets if secret]
    if not patterns:
        return text
    return re.sub("|".join(patterns), REDACTED, text, flags=re.IGNORECASE)


def scrubbed(value, limit, secrets):
    """An upstream error field as text (JSON when it is not a string), its secrets removed
    and then cut to `limit`; None stays None.

    Only the text's start is scrubbed (a long text would hold the worker for a scan of
    megabytes): `margin` covers the longest form a secret can take, so a secret cut off at
    the end of the piece can only be in its last `margin` characters, which are dropped.
    """
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    margin = max((12 * len(secret) for secret in secrets if secret), default=0)  # %XX of 4 UTF-8 bytes a character
    if len(text) <= limit + margin:
        return redact(text, *secrets)[:limit]
    piece = redact(text[: limit + 2 * margin], *secrets)
    return piece[: min(limit, len(piece) - margin)]


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
    secrets = (target.api_key, *secrets)
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
    client = http_client()
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
    """The response's body, up to MAX_ANSWER_BYTES."""
    try:
        return read_capped(response, MAX_ANSWER_BYTES)
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"provider {target.provider_id} did not answer in time") from None
    except httpx.HTTPError:
        raise UpstreamFailure(f"provider {target.provider_id} broke off its answer") from None
    except UpstreamError as error:
        raise UpstreamFailure(f"provider {target.provider_id}: {error}") from None


def read_json(response, target):
    """The accepted response's JSON body (and the response closed)."""
    with closing(response):
        body = read_body(response, target)
    try:
        return strict_json(body)
    except UpstreamError as error:
        raise UpstreamFailure(f"provider {target.provider_id}: {error}") from None


# The shapes of answers ----------------------------------------------------------------------


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_usage(usage):
    """Absent, or an object whose token counts (those the gateway counts) are integers."""
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


def json_events(response, target, *secrets):
    """Each event of an SSE stream as a checked chunk, until `[DONE]`; an error event raises
    (without the key or the secrets), and so does a stream that ends before the model
    finished (a cut connection)."""
    finished = False
    for data in sse_events(response, target):
        if data.strip() == b"[DONE]":
            return
        try:
            event = json_of(data, refuse_constant)
        except UpstreamError as error:
            raise UpstreamFailure(f"provider {target.provider_id} sent an event that is not usable: {error}") from None
        if isinstance(event, dict) and "error" in event and "choices" not in event:
            message = scrubbed(event["error"], UPSTREAM_TEXT_LIMIT, (target.api_key, *secrets))
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
