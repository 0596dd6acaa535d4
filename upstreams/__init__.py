"""Clients for the upstream providers: list a provider's models in its own format.

One pooled HTTP client serves the whole process. Every listing has a total deadline (the
connection's timeout, however the upstream trickles) and reads at most MAX_LISTING_BYTES
per answer. What an upstream sends is checked before it is used: a model entry that is not
usable is left out, a document that is not a listing fails it. Failures raise UpstreamError
with a message that says what happened (refused, timeout, key rejected, unexpected answer)
and never carries the key or the upstream's body (some upstreams echo the key back).
Each wire format has its module here; `list_models` picks it by the provider's type.
"""

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import httpx

from observability.metrics import timed_upstream_call
from serving.hub import off_the_hub
from upstreams.transport import DeadlineTransport, deadline

log = logging.getLogger(__name__)

MAX_LISTING_BYTES = 4 * 1024 * 1024
MAX_MODEL_ID_LENGTH = 256
MAX_LABEL_LENGTH = 1024  # owned_by, display_name
# A model "created" later than this after now is absurd (a clock a little ahead is not).
LATEST_CREATED_AHEAD_SECONDS = 366 * 24 * 3600


class UpstreamError(Exception):
    """An upstream provider failed; the message says how, never with the key."""


@dataclass(frozen=True)
class Connection:
    """What it takes to reach one provider: no database, no app context needed."""

    type: str
    base_url: str
    api_key: str
    timeout: float


@dataclass(frozen=True)
class UpstreamModel:
    id: str
    created: int = 0
    owned_by: str = ""
    display_name: str | None = None


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
    too_large = UpstreamError(f"the upstream's answer is over {limit // (1024 * 1024)} MiB (refused)")
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


@timed_upstream_call
def send(connection, url, headers=None, params=None):
    """GET `url`: (status, body), within the deadline of the listing and the size cap."""
    try:
        with http_client().stream("GET", url, headers=headers, params=params, timeout=connection.timeout) as response:
            return response.status_code, read_capped(response)
    except httpx.TimeoutException:
        raise UpstreamError(f"{connection.base_url} did not answer within {connection.timeout:g} s (timeout)") from None
    except httpx.ConnectError:
        raise UpstreamError(f"could not connect to {connection.base_url} (connection refused or unreachable)") from None
    except httpx.HTTPError as error:
        raise UpstreamError(f"request to {connection.base_url} failed: {type(error).__name__}") from None
    except (httpx.InvalidURL, ValueError):  # a host or port the HTTP client cannot use
        raise UpstreamError(f"{connection.base_url} cannot be requested (host or port not usable)") from None


def json_of(text, parse_constant=None):
    """The JSON document in `text` (str or bytes); `parse_constant` as json.loads takes it
    (listings take NaN, whose entries are then left out; the gateway refuses it)."""
    try:
        return json.loads(text, parse_constant=parse_constant)
    except RecursionError:
        raise UpstreamError("unexpected response from the upstream: JSON nested too deep") from None
    except ValueError:  # UnicodeDecodeError included
        raise UpstreamError("unexpected response from the upstream: not JSON") from None


def parse_json(body, parse_constant=None):
    return off_the_hub(json_of, body, parse_constant)  # a few MiB of JSON is milliseconds of CPU


def get_json(connection, url, headers=None, params=None):
    status, body = send(connection, url, headers, params)
    if status in (401, 403):
        raise UpstreamError(f"the upstream rejected the API key (HTTP {status})")
    if status != 200:
        raise UpstreamError(f"the upstream answered HTTP {status} to {urlsplit(url).path}")
    return parse_json(body)


def bearer(api_key):
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def is_text(value, max_length):
    """A string that can be shown and stored as it is: no control characters or lone surrogates."""
    return isinstance(value, str) and len(value) <= max_length and value.isprintable()


def unix_seconds(value):
    """Unix seconds from a number or an RFC 3339 string, 0 when absent; None when not a sane time."""
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError):
            return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    if not 0 <= value <= time.time() + LATEST_CREATED_AHEAD_SECONDS:
        return None
    return int(value)


def upstream_model(model_id, created=None, owned_by=None, display_name=None):
    """The model an entry describes, or None when the entry is not usable (it is left out)."""
    if not model_id or not is_text(model_id, MAX_MODEL_ID_LENGTH):
        return None
    if not all(label is None or is_text(label, MAX_LABEL_LENGTH) for label in (owned_by, display_name)):
        return None
    created_seconds = unix_seconds(created)
    if created_seconds is None:
        return None
    return UpstreamModel(id=model_id, created=created_seconds, owned_by=owned_by or "", display_name=display_name)


def model_entries(document, key):
    """The list of entries under `key` (the body itself when None); an answer without one is unexpected."""
    entries = document.get(key) if isinstance(document, dict) else document if key is None else None
    if not isinstance(entries, list):
        raise UpstreamError(f"unexpected response from the upstream: no model list in {key or 'the body'}")
    return entries


def usable_models(connection, entries, entry_model):
    """The models of the entries `entry_model` can read; the others are left out, logged in one line."""
    models = [entry_model(entry) if isinstance(entry, dict) else None for entry in entries]
    usable = [model for model in models if model is not None]
    if len(usable) < len(models):
        log.warning(
            "%d of %d model entries from %s left out: no usable id, or a field of the wrong type or range",
            len(models) - len(usable),
            len(models),
            connection.base_url,
        )
    return usable


def list_models(connection):
    """The upstream's models, or UpstreamError saying why they could not be listed."""
    from upstreams import anthropic, github, openai, voyage, watsonx  # they import this module's shared parts

    with deadline(connection.timeout):
        if connection.type == "anthropic":
            return anthropic.list_models(connection)
        if connection.type == "watsonx":
            return watsonx.list_models(connection)
        if connection.type == "github":
            return github.list_models(connection)
        if connection.type == "voyage":
            return voyage.list_models(connection)
        if connection.type == "rits":
            return openai.list_models(connection, {"RITS_API_KEY": connection.api_key})
        return openai.list_models(connection, bearer(connection.api_key))
