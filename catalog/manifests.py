"""Manifests: providers declared in files or at URLs, synced into the registry.

A sync reads each configured location, validates it with the create body's schema and
applies it in one transaction, whole or not at all; providers of locations no longer
configured are removed, and providers created through the API are never touched. One
sync runs at a time per database (the lease "manifest-sync"), whether the scheduler, the
CLI or POST /api/v1/registry/sync (registry.py) started it.
"""

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import httpx
import sqlalchemy as sa
import yaml
from flask import current_app
from marshmallow import ValidationError

from access.crypto import UnopenableApiKey, cipher
from api.errors import SyncInProgress, flatten_messages
from jobs.scheduler import holder_name
from models import (
    ManifestSync,
    changed_field_names,
    db,
    new_id,
)
from observability import audit
from observability.metrics import record_manifest_sync
from schemas import ManifestSchema
from serving.hub import off_the_hub
from storage.connections import no_connection
from storage.jobs import (
    forget_manifest_syncs_except,
    last_manifest_syncs,
    release_lease,
    store_manifest_sync,
    try_lease,
)
from storage.providers import (
    delete_providers,
    delete_providers_of_location,
    edit_provider,
    first_clash,
    insert_providers,
    locations_other_than,
    provider_counts_of_locations,
    providers_of_location,
)
from upstreams.http import http_client
from upstreams.transport import deadline

log = logging.getLogger(__name__)
manifest_schema = ManifestSchema()

SYNC_LEASE = "manifest-sync"
SYNC_WAIT_SECONDS = 10  # how long a sync waits for a running one to finish before giving up
LEASE_POLL_SECONDS = 0.1
LEASE_BASE_SECONDS = 60
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_MANIFEST_ENTRIES = 1000
# An error is stored, shown by GET /registry and logged: it names this many problems, then a count.
PROBLEMS_SHOWN = 5
MAX_PROBLEM_CHARS = 200  # a problem names its field, which may be an unknown field's (long) name
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when PyYAML has it: about 5 times faster
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
DECLARED_FIELDS = ("name", "description", "watsonx_project_id", "watsonx_space_id")


class ManifestError(Exception):
    """Why a manifest changed nothing; the message never quotes a manifest's content."""


@dataclass
class SyncResult:
    location: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    error: str | None = None

    def describe(self):
        if self.error:
            return f"{self.location}: error: {self.error}"
        counts = f"{self.added} added, {self.updated} updated, {self.removed} removed, {self.unchanged} unchanged"
        return f"{self.location}: {counts}"


@dataclass(frozen=True)
class ManifestLocation:
    """A configured location: `uri` is shown to readers and stored as its providers' `registry`,
    `source` is what a sync reads (with a URL's credentials and query string); None when
    several configured locations share the `uri`."""

    uri: str
    source: str | None


def without_credentials(parts):
    return parts._replace(netloc=parts.netloc.rpartition("@")[2])


def shown_url(parts):
    """A URL without what may be a secret: credentials (user:password@) and the query string
    (a presigned URL's signature)."""
    return without_credentials(parts)._replace(query="").geturl()


def manifest_location(location):
    """A configured location as file:///abs/path or its URL as shown (shown_url)."""
    try:
        parts = urlsplit(location)
    except ValueError:  # not a usable URL: kept as configured, for its sync to report
        return ManifestLocation(location, location)
    if parts.scheme.lower() not in ("", "file"):
        return ManifestLocation(shown_url(parts), location)
    path = url2pathname(parts.path) if parts.scheme else location
    uri = Path(os.path.abspath(path)).as_uri()
    return ManifestLocation(uri, uri)


def configured_locations():
    """Each configured location once. URLs that differ only in what is not shown would be one
    location to readers and in `registry`: such a location has no source, and its sync fails."""
    sources_by_uri = {}
    for location in map(manifest_location, current_app.config["MANIFESTS"]):
        sources_by_uri.setdefault(location.uri, set()).add(location.source)
    return [
        ManifestLocation(uri, next(iter(sources)) if len(sources) == 1 else None)
        for uri, sources in sources_by_uri.items()
    ]


# Reading


def within_size_limit(content):
    if len(content) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"The manifest is larger than {MAX_MANIFEST_BYTES} bytes.")
    return content


def read_file(path):
    try:
        with open(path, "rb") as manifest_file:
            return within_size_limit(manifest_file.read(MAX_MANIFEST_BYTES + 1))
    except OSError as error:
        raise ManifestError(f"Cannot read the file: {error.strerror}.") from None


def basic_credentials(parts):
    """The user and password of a URL's user:password@, or None; sent as Basic auth."""
    if "@" not in parts.netloc:
        return None
    return unquote(parts.username or ""), unquote(parts.password or "")


def fetch_url(url):
    """The manifest at `url`. Its credentials go as Basic auth, not in the URL: httpx logs and
    quotes the URL it requests."""
    parts = urlsplit(url)
    url_without_credentials = without_credentials(parts).geturl()
    credentials = basic_credentials(parts)
    content = bytearray()  # grown in place: a server trickling small chunks costs no copy of all so far each
    timeout = current_app.config["UPSTREAM_TIMEOUT"]
    try:
        with (
            deadline(timeout),
            http_client().stream(
                "GET", url_without_credentials, auth=credentials, timeout=timeout, follow_redirects=True
            ) as answer,
        ):
            if answer.status_code != 200:
                raise ManifestError(f"Fetching the manifest answered HTTP {answer.status_code}.")
            for chunk in answer.iter_bytes():
                content += chunk
                within_size_limit(content)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as error:  # ValueError: a host or port httpx cannot use
        raise ManifestError(f"Cannot fetch the manifest: {error or type(error).__name__}.") from None
    return bytes(content)


def read_location(source):
    if source is None:
        raise ManifestError(
            "This location is configured more than once with different credentials or query strings, which are not "
            "shown; give each manifest a path of its own."
        )
    try:
        parts = urlsplit(source)
    except ValueError:
        raise ManifestError("The location is not a valid URL.") from None
    if parts.scheme == "file":
        return read_file(url2pathname(parts.path))
    if parts.scheme.lower() in ("http", "https"):
        return fetch_url(source)
    raise ManifestError("Unsupported location: use a path, a file:// URL or an http(s):// URL.")


def parse_document(content):
    """JSON when it parses as JSON, else YAML. Errors say where, never quoting the line: it may hold a key."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        pass
    try:
        return yaml.load(content, Loader=YAML_LOADER)
    except yaml.MarkedYAMLError as error:
        # Only where: PyYAML's wording quotes the text it stumbled on ("found undefined alias 'sk-...'").
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(f"Not valid YAML or JSON{where}.") from None
    except (yaml.YAMLError, RecursionError):
        raise ManifestError("Not valid YAML or JSON.") from None


class ManifestVariables:
    """What ${VAR} in a manifest reads: the environment given to create_app, read once,
    except the registry's own settings, which a manifest may not name (a reader would see
    them in a name, an upstream would receive them as a key)."""

    def __init__(self, environ, is_registry_setting):
        self._is_registry_setting = is_registry_setting
        self._values = {name: value for name, value in environ.items() if not is_registry_setting(name)}

    def value_of(self, name, field_path):
        if self._is_registry_setting(name):
            raise ManifestError(f"{field_path}: {name} is a setting of the registry; a manifest may not read it.")
        if name not in self._values:
            raise ManifestError(f"{field_path}: the environment variable {name} is not set.")
        return self._values[name]


def expand_text(text, variables, field_path):
    return VARIABLE.sub(lambda match: variables.value_of(match.group(1), field_path), text)


def expand_entry(entry, index, variables):
    if not isinstance(entry, dict):
        return entry
    return {
        field: expand_text(value, variables, f"model_providers.{index}.{field}") if isinstance(value, str) else value
        for field, value in entry.items()
    }


def with_variables(document, variables):
    """The document with ${VAR} in its entries' text fields replaced; the schema judges the rest."""
    entries = document.get("model_providers")
    if not isinstance(entries, list):
        return document
    expanded = [expand_entry(entry, index, variables) for index, entry in enumerate(entries)]
    return {**document, "model_providers": expanded}


def shortened(text, length):
    return text if len(text) <= length else text[: length - 1] + "…"


def describe_problems(messages):
    """The first few of a manifest's problems, then how many more: its error stays short however
    many entries are invalid."""
    problems = [f"{field}: {' '.join(texts)}" for field, texts in flatten_messages(messages).items()]
    described = "; ".join(shortened(problem, MAX_PROBLEM_CHARS) for problem in problems[:PROBLEMS_SHOWN])
    more = len(problems) - PROBLEMS_SHOWN
    return f"{described}; and {more} more problems." if more > 0 else described


def entries_of(content, variables):
    """The validated entries of a manifest's content, or a ManifestError saying why not.

    CPU work that grows with the manifest (parsing, validating): run off the gevent hub.
    """
    document = parse_document(content)
    if not isinstance(document, dict):
        raise ManifestError("The manifest must be a mapping with a model_providers list.")
    entries = document.get("model_providers")
    if isinstance(entries, list) and len(entries) > MAX_MANIFEST_ENTRIES:
        raise ManifestError(
            f"The manifest declares {len(entries)} providers; at most {MAX_MANIFEST_ENTRIES} are allowed."
        )
    try:
        return manifest_schema.load(with_variables(document, variables))["model_providers"]
    except ValidationError as error:
        raise ManifestError(describe_problems(error.messages)) from None


def load_manifest(source):
    """The validated entries of the manifest read from `source`, or a ManifestError saying why not."""
    content = read_location(source)
    return off_the_hub(entries_of, content, current_app.extensions["manifest_variables"])


# Applying


def record_change(provider_id, detail, changed_fields=()):
    """Audit a change of the sync: its actor is `system` (or the CLI user), even when an admin's
    POST /registry/sync asked for it (it only asked for what the manifests say); that request lends its request id."""
    audit.record("manifest.sync", provider_id, changed_fields, detail, by_system=True)


def refuse_clashes(location, entries):
    clash = first_clash(location, [entry["base_url"] for entry in entries])
    if clash is not None:
        origin = f"of the manifest {clash.manifest}" if clash.manifest else "created through the API"
        raise ManifestError(f"base_url {clash.base_url} is already registered by model provider {clash.id} ({origin}).")


def holds_api_key(provider, api_key):
    try:
        return provider.open_api_key() == api_key
    except UnopenableApiKey:  # sealed under a key no longer configured: the manifest's key replaces it
        return False


def changes_from_entry(provider, entry):
    """The column values that make a stored provider say what its entry says (none: unchanged)."""
    changes = {field: entry.get(field) for field in DECLARED_FIELDS if getattr(provider, field) != entry.get(field)}
    if not holds_api_key(provider, entry["api_key"]):
        changes["sealed_api_key"] = cipher.seal(entry["api_key"])
    return changes


def values_of_entry(location, entry):
    declared = {field: entry.get(field) for field in DECLARED_FIELDS}
    sealed_api_key = cipher.seal(entry["api_key"])
    return {
        "id": new_id(),
        "registry": location,
        "type": entry["type"],
        "base_url": entry["base_url"],
        "sealed_api_key": sealed_api_key,
        **declared,
    }


def apply_manifest(location, entries):
    """Bring the location's stored providers in line with its entries, uncommitted."""
    refuse_clashes(location, entries)
    stored = {provider.base_url: provider for provider in providers_of_location(location)}
    # An entry keeps its provider (and id) by base_url; a changed type makes it a new provider.
    kept = {
        entry["base_url"]: stored[entry["base_url"]]
        for entry in entries
        if entry["base_url"] in stored and stored[entry["base_url"]].type == entry["type"]
    }
    gone = [provider.id for base_url, provider in stored.items() if base_url not in kept]
    if gone:  # first, freeing the base_url of a replaced provider for its successor
        delete_providers(gone)
    for provider_id in gone:
        record_change(provider_id, detail=f"deleted: gone from {location}")
    changes = [
        (kept[entry["base_url"]], changes_from_entry(kept[entry["base_url"]], entry))
        for entry in entries
        if entry["base_url"] in kept
    ]
    for provider, values in changes:
        if values:
            if edit_provider(provider.id, provider.version, values) is None:
                raise ManifestError(f"Model provider {provider.id} was changed meanwhile; sync again.")
            record_change(provider.id, f"updated from {location}", changed_field_names(values))
    added = [values_of_entry(location, entry) for entry in entries if entry["base_url"] not in kept]
    if added:
        try:
            insert_providers(added)
        except sa.exc.IntegrityError:
            raise ManifestError(
                "A base_url of the manifest was registered meanwhile; sync again to see which."
            ) from None
    for values in added:
        fields = {column: value for column, value in values.items() if column not in ("id", "registry")}
        record_change(values["id"], f"created from {location}", changed_field_names(fields))
    updated = sum(bool(values) for _, values in changes)
    return SyncResult(location, added=len(added), updated=updated, removed=len(gone), unchanged=len(kept) - updated)


def record_sync(result):
    """Store how the location's sync went, committing its changes with it."""
    outcome = "error" if result.error else "ok"
    record_manifest_sync(failed=result.error is not None)
    store_manifest_sync(result.location, outcome, result.error)
    db.session.commit()


def sync_location(location):
    try:
        with no_connection():
            manifest = load_manifest(location.source)
        result = apply_manifest(location.uri, manifest)
    except ManifestError as error:
        db.session.rollback()
        result = SyncResult(location.uri, error=str(error))
    record_sync(result)
    return result


def remove_providers_of(location):
    removed = delete_providers_of_location(location)
    for provider_id in removed:
        record_change(provider_id, detail=f"deleted: {location} is no longer configured")
    return len(removed)


def remove_dropped_locations(locations):
    """Remove the providers (and sync state) of every location no longer configured."""
    dropped = locations_other_than(locations)
    results = [SyncResult(location, removed=remove_providers_of(location)) for location in dropped]
    forget_manifest_syncs_except(locations)
    db.session.commit()
    return results


def take_sync_lease(holder, location_count):
    # Long enough for every location to take its full upstream timeout.
    seconds = LEASE_BASE_SECONDS + current_app.config["UPSTREAM_TIMEOUT"] * location_count
    deadline = time.monotonic() + SYNC_WAIT_SECONDS
    while not try_lease(SYNC_LEASE, holder, seconds):
        if time.monotonic() >= deadline:
            raise SyncInProgress("A manifest sync is already running; try again shortly.")
        time.sleep(LEASE_POLL_SECONDS)


def sync_manifests():
    """Sync every configured location now, one sync per database at a time; the results."""
    locations = configured_locations()
    holder = holder_name()
    take_sync_lease(holder, len(locations))
    try:
        dropped = remove_dropped_locations([location.uri for location in locations])
        results = dropped + [sync_location(location) for location in locations]
    finally:
        db.session.rollback()  # what an unexpected error left half-applied must not ride on the release
        release_lease(SYNC_LEASE, holder)
    for result in results:
        log.log(logging.WARNING if result.error else logging.INFO, "manifest sync of %s", result.describe())
    return results


def sync_on_schedule(app):
    try:
        sync_manifests()
    except SyncInProgress:
        log.info("scheduled manifest sync skipped: another sync is still running")


def registry_status():
    locations = [location.uri for location in configured_locations()]
    last_syncs = last_manifest_syncs(locations)
    provider_counts = provider_counts_of_locations(locations)
    return [
        location_status(location, last_syncs.get(location), provider_counts.get(location, 0)) for location in locations
    ]


def location_status(location, last_sync, provider_count):
    last_sync = last_sync or ManifestSync(location=location)  # never synced: no time, outcome or error
    return {
        "location": location,
        "last_synced_at": last_sync.synced_at,
        "outcome": last_sync.outcome,
        "error": last_sync.error,
        "provider_count": provider_count,
    }
