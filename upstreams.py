"""Clients for the upstream providers: list a provider's models in its own format.

One pooled HTTP client serves the whole process. Failures raise UpstreamError with a
message that says what happened (refused, timeout, key rejected, unexpected answer) and
never carries the key or the upstream's body (some upstreams echo the key back).
"""

import threading
from dataclasses import dataclass
from datetime import date, datetime
from urllib.parse import urlsplit

import httpx

from errors import UpstreamError

ANTHROPIC_VERSION = "2023-06-01"
WATSONX_API_VERSION = "2024-05-01"
VOYAGE_MODELS = (
    "voyage-3.5",
    "voyage-3.5-lite",
    "voyage-3-large",
    "voyage-code-3",
    "voyage-finance-2",
    "voyage-law-2",
    "voyage-multilingual-2",
    "voyage-context-3",
)
MAX_PAGES = 20


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
            # The gateway holds one connection per stream in flight: hundreds per process.
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
            _client = httpx.Client(limits=limits, follow_redirects=False, trust_env=False)
        return _client


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


def list_openai_compatible(connection, auth_headers):
    document = get_json(connection, f"{connection.base_url}/models", headers=auth_headers)
    return [
        UpstreamModel(
            id=str(entry["id"]),
            created=unix_seconds(entry.get("created")),
            owned_by=str(entry.get("owned_by") or ""),
            display_name=entry.get("display_name"),
        )
        for entry in model_entries(document, "data")
    ]


def list_anthropic(connection):
    headers = {"x-api-key": connection.api_key, "anthropic-version": ANTHROPIC_VERSION}
    models, params = [], {"limit": 1000}
    for _ in range(MAX_PAGES):
        document = get_json(connection, f"{connection.base_url}/models", headers=headers, params=params)
        models += [
            UpstreamModel(
                id=str(entry["id"]),
                created=unix_seconds(entry.get("created_at")),
                owned_by="anthropic",
                display_name=entry.get("display_name"),
            )
            for entry in model_entries(document, "data")
        ]
        if not document.get("has_more") or not document.get("last_id"):
            break
        params = {"limit": 1000, "after_id": document["last_id"]}
    return models


def is_withdrawn(spec, today):
    return any(
        stage.get("id") == "withdrawn" and str(stage.get("start_date") or "0000") <= today.isoformat()
        for stage in spec.get("lifecycle") or []
        if isinstance(stage, dict)
    )


def list_watsonx(connection):
    params = {"version": WATSONX_API_VERSION, "limit": 200}
    document = get_json(connection, f"{connection.base_url}/ml/v1/foundation_model_specs", params=params)
    today = date.today()
    return [
        UpstreamModel(
            id=str(spec["model_id"]), owned_by=str(spec.get("provider") or "ibm"), display_name=spec.get("label")
        )
        for spec in model_entries(document, "resources", id_key="model_id")
        if not is_withdrawn(spec, today)
    ]


def list_github(connection):
    parts = urlsplit(connection.base_url)
    catalog = get_json(
        connection, f"{parts.scheme}://{parts.netloc}/catalog/models", headers=bearer(connection.api_key)
    )
    return [
        UpstreamModel(id=str(entry["id"]), owned_by=str(entry.get("publisher") or ""), display_name=entry.get("name"))
        for entry in model_entries(catalog, None)
    ]


def list_voyage(connection):
    # Voyage has no model listing: its catalogue is fixed, and any answer from the host is the check.
    send(connection, connection.base_url)
    return [UpstreamModel(id=model_id, owned_by="voyage") for model_id in VOYAGE_MODELS]


def list_models(connection):
    """The upstream's models, or UpstreamError saying why they could not be listed."""
    if connection.type == "anthropic":
        return list_anthropic(connection)
    if connection.type == "watsonx":
        return list_watsonx(connection)
    if connection.type == "github":
        return list_github(connection)
    if connection.type == "voyage":
        return list_voyage(connection)
    if connection.type == "rits":
        return list_openai_compatible(connection, {"RITS_API_KEY": connection.api_key})
    return list_openai_compatible(connection, bearer(connection.api_key))
