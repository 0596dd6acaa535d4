"""What every listing shares: one GET within the listing's deadline and size cap, its
failures as the upstream error family, and each model entry checked before it is used (an
entry that is not usable is left out, a document that is not a listing fails it).

`observe(provider_type, seconds)`, given by the caller, hears of each HTTP call's time.
"""

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import httpx

from upstreams.errors import UpstreamFailure, UpstreamTimeout
from upstreams.http import http_client, parse_json, read_capped

log = logging.getLogger(__name__)

MAX_MODEL_ID_LENGTH = 256
MAX_LABEL_LENGTH = 1024  # owned_by, display_name
# A model "created" later than this after now is absurd (a clock a little ahead is not).
LATEST_CREATED_AHEAD_SECONDS = 366 * 24 * 3600


@dataclass(frozen=True)
class UpstreamModel:
    id: str
    created: int = 0
    owned_by: str = ""
    display_name: str | None = None


def send(target, url, observe, headers=None, params=None):
    """GET `url`: (status, body), within the deadline of the listing and the size cap."""
    started = time.perf_counter()
    try:
        with http_client().stream("GET", url, headers=headers, params=params, timeout=target.timeout) as response:
            return response.status_code, read_capped(response)
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"{target.base_url} did not answer within {target.timeout:g} s (timeout)") from None
    except httpx.ConnectError:
        raise UpstreamFailure(f"could not connect to {target.base_url} (connection refused or unreachable)") from None
    except httpx.HTTPError as error:
        raise UpstreamFailure(f"request to {target.base_url} failed: {type(error).__name__}") from None
    except (httpx.InvalidURL, ValueError):  # a host or port the HTTP client cannot use
        raise UpstreamFailure(f"{target.base_url} cannot be requested (host or port not usable)") from None
    finally:
        observe(target.type, time.perf_counter() - started)


def get_json(target, url, observe, headers=None, params=None):
    status, body = send(target, url, observe, headers, params)
    if status in (401, 403):
        raise UpstreamFailure(f"the upstream rejected the API key (HTTP {status})", status)
    if status != 200:
        raise UpstreamFailure(f"the upstream answered HTTP {status} to {urlsplit(url).path}")
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
        raise UpstreamFailure(f"unexpected response from the upstream: no model list in {key or 'the body'}")
    return entries


def usable_models(target, entries, entry_model):
    """The models of the entries `entry_model` can read; the others are left out, logged in one line."""
    models = [entry_model(entry) if isinstance(entry, dict) else None for entry in entries]
    usable = [model for model in models if model is not None]
    if len(usable) < len(models):
        log.warning(
            "%d of %d model entries from %s left out: no usable id, or a field of the wrong type or range",
            len(models) - len(usable),
            len(models),
            target.base_url,
        )
    return usable
