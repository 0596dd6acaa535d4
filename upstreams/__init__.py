"""Clients for the upstream providers: list a provider's models in its own format.

One pooled HTTP client serves the whole process. Failures raise UpstreamError with a
message that says what happened (refused, timeout, key rejected, unexpected answer) and
never carries the key or the upstream's body (some upstreams echo the key back).
Each wire format has its module here; `list_models` picks it by the provider's type.
"""

import threading
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import httpx

from metrics import timed_upstream_call


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
            # pooled connection behind black-holed upstreams would fail for their delay. The
            # gateway holds one per stream in flight, and reuses many between calls.
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
            _client = httpx.Client(limits=limits, follow_redirects=False, trust_env=False)
        return _client


@timed_upstream_call
def send(connection, url, headers=None, params=None):
    try:
        return http_client().get(url, headers=headers, params=params, timeout=connection.timeout)
    except httpx.TimeoutException:
        raise UpstreamError(f"{connection.base_url} did not answer within {connection.timeout:g} s (timeout)") from None
    except httpx.ConnectError:
        raise UpstreamError(f"could not connect to {connection.base_url} (connection refused or unreachable)") from None
    except httpx.HTTPError as error:
        raise UpstreamError(f"request to {connection.base_url} failed: {type(error).__name__}") from None
    except (httpx.InvalidURL, ValueError):  # a host or port the HTTP client cannot use
        raise UpstreamError(f"{connection.base_url} cannot be requested (host or port not usable)") from None


def get_json(connection, url, headers=None, params=None):
    response = send(connection, url, headers, params)
    if response.status_code in (401, 403):
        raise UpstreamError(f"the upstream rejected the API key (HTTP {response.status_code})")
    if response.status_code != 200:
        raise UpstreamError(f"the upstream answered HTTP {response.status_code} to {urlsplit(url).path}")
    try:
        return response.json()
    except ValueError:
        raise UpstreamError("unexpected response from the upstream: not JSON") from None


def bearer(api_key):
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def unix_seconds(value):
    """Unix seconds from a number or an RFC 3339 string; 0 when the upstream gave neither."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    try:
        return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def model_entries(document, key, id_key="id"):
    """The entries under `key` that name a model; an answer without such a list is unexpected."""
    entries = document.get(key) if isinstance(document, dict) else document if key is None else None
    if not isinstance(entries, list):
        raise UpstreamError(f"unexpected response from the upstream: no model list in {key or 'the body'}")
    return [entry for entry in entries if isinstance(entry, dict) and entry.get(id_key)]


def list_models(connection):
    """The upstream's models, or UpstreamError saying why they could not be listed."""
    from upstreams import anthropic, github, openai, voyage, watsonx  # they import this module's shared parts

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
