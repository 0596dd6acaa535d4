"""Manifests: providers declared in files or at URLs, synced into the registry."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from catalog.manifests import MAX_MANIFEST_BYTES, MAX_MANIFEST_ENTRIES
from models import PROVIDER_ROWS, db, provider_of
from models import PROVIDERS as PROVIDER_TABLE
from tests.conftest import ROOT, basic_auth, client_as, provider_body, registry_environ

PROVIDERS = "/api/v1/model_providers"
REGISTRY = "/api/v1/registry"
SYNC = "/api/v1/registry/sync"
OPENAI_KEY = "sk-manifest-openai-1111"
ROTATED_KEY = "sk-manifest-openai-2222"
LITERAL_KEY = "sk-literal-in-the-manifest-3333"
API_CREATED_URL = "https://api-created.example.com/v1"

OPENAI = """
  - type: openai
    base_url: https://api.openai.com/v1
    name: OpenAI
    api_key: ${OPENAI_API_KEY}"""
RENAMED_OPENAI = """
  - type: openai
    base_url: HTTPS://API.OpenAI.com:443/v1/
    name: OpenAI (renamed)
    description: Declared in a file
    api_key: ${OPENAI_API_KEY}"""
OLLAMA = """
  - type: ollama
    base_url: http://localhost:11434/v1
    api_key: \"\""""
ANTHROPIC = f"""
  - type: anthropic
    base_url: https://api.anthropic.com/v1
    api_key: {LITERAL_KEY}"""


def manifest(*entries):
    return "model_providers:" + "".join(entries) + "\n"


# Each broken manifest also carries valid changes (a rename, a new provider), which must not apply.
BROKEN_MANIFESTS = {
    "bad YAML": (
        manifest(RENAMED_OPENAI, OLLAMA, ANTHROPIC, f"\n  - type: openai\n    api_key: {LITERAL_KEY}: oops"),
        "Not valid YAML or JSON at line 14, column 45.",
    ),
    "YAML quoting a key in its error": (
        manifest(RENAMED_OPENAI, OLLAMA, f"\n  - {{type: groq, base_url: https://g.example, api_key: *{LITERAL_KEY}}}"),
        "Not valid YAML or JSON at line 10, column 56.",
    ),
    "YAML tag quoting a key in its error": (
        manifest(
            RENAMED_OPENAI, OLLAMA, f"\n  - {{type: groq, base_url: https://g.example, api_key: !{LITERAL_KEY} k}}"
        ),
        "Not valid YAML or JSON at line 10, column 56.",
    ),
    "not a mapping": ("- type: openai\n  base_url: https://api.openai.com/v1\n", "must be a mapping"),
    "not text": (b"\x00\xff\xfe" + LITERAL_KEY.encode(), "Not valid YAML or JSON"),
    "too large": ("#" * (MAX_MANIFEST_BYTES + 1), "larger than"),
    "unreadable": (None, "Cannot read the file: No such file or directory"),
    "invalid entry": (
        manifest(
            RENAMED_OPENAI,
            OLLAMA,
            ANTHROPIC,
            f"\n  - {{type: openia, base_url: https://typo.example, api_key: {LITERAL_KEY}}}",
        ),
        "model_providers.3.type: Must be one of",
    ),
    "duplicate base_url": (
        manifest(OPENAI, OLLAMA, ANTHROPIC, RENAMED_OPENAI),
        "model_providers.3.base_url: Same base_url as model_providers.0.",
    ),
    "missing variable": (
        manifest(
            RENAMED_OPENAI, OLLAMA, ANTHROPIC, "\n  - {type: groq, base_url: https://g.example, api_key: '${UNSET}'}"
        ),
        "model_providers.3.api_key: the environment variable UNSET is not set.",
    ),
    "clash with an API-created provider": (
        manifest(RENAMED_OPENAI, OLLAMA, ANTHROPIC, f"\n  - {{type: openai, base_url: {API_CREATED_URL}, api_key: k}}"),
        "base_url https://api-created.example.com/v1 is already registered by model provider {api_id} "
        "(created through the API)",
    ),
}


def counts(added=0, updated=0, removed=0, unchanged=0):
    return {"added": added, "updated": updated, "removed": removed, "unchanged": unchanged, "error": None}


def write_manifest(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.fixture
def manifest_path(tmp_path):
    return write_manifest(tmp_path / "providers.yaml", manifest(OPENAI, OLLAMA))


@pytest.fixture
def registry_app(make_app):
    """The app with the given manifest locations configured and OPENAI_API_KEY set."""

    def build(*locations, openai_key=OPENAI_KEY):
        return make_app(REGISTRY_MANIFESTS=",".join(str(location) for location in locations), OPENAI_API_KEY=openai_key)

    return build


def sync(app):
    answer = client_as(app, "admin").post(SYNC)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()["items"]


def listing(app):
    return client_as(app, "reader").get(PROVIDERS, query_string={"limit": 1000}).get_json()["items"]


def by_base_url(app):
    return {provider["base_url"]: provider for provider in listing(app)}


def snapshot(app):
    """What a client sees of every provider, and every stored sealed key."""
    with app.app_context():
        sealed_keys = dict(db.session.execute(sa.select(PROVIDER_TABLE.c.id, PROVIDER_TABLE.c.sealed_api_key)).all())
    return listing(app), sealed_keys


def stored_api_key(app, provider_id):
    with app.app_context():
        return provider_of(db.session.execute(PROVIDER_ROWS.where(PROVIDER_TABLE.c.id == provider_id))).open_api_key()


def registry_status(app):
    answer = client_as(app, "reader").get(REGISTRY)
    assert answer.status_code == 200
    return answer.get_json()["items"]


class ManifestServer:
    """A manifest served over local HTTP, counting fetches and how many of them overlapped;
    with `credentials` ("user:password"), only to a client sending them as Basic auth."""

    def __init__(self, body, delay=0.0, credentials=None):
        self.body, self.delay = body, delay
        self.authorization = None if credentials is None else basic_auth(*credentials.split(":", 1))
        self.fetches = self.in_flight = self.most_in_flight = 0
        self.paths = []  # each fetch's path and query
        self.lock = threading.Lock()
        self.fetching, self.released = threading.Event(), threading.Event()  # hold(): fetches wait for release()
        self.released.set()
        answer = self.answer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                answer(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/providers.yaml"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, handler):
        with self.lock:
            self.fetches += 1
            self.paths.append(handler.path)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.fetching.set()
        self.released.wait(timeout=30)
        time.sleep(self.delay)
        with self.lock:  # before answering: the next fetch may only start once this one was answered
            self.in_flight -= 1
        if self.authorization is not None and handler.headers.get("Authorization") != self.authorization:
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", 'Basic realm="manifests"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if self.body is None:
            handler.send_error(404)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/yaml")
        handler.send_header("Content-Length", str(len(self.body.encode())))
        handler.end_headers()
        handler.wfile.write(self.body.encode())

    def hold(self):
        self.fetching.clear()
        self.released.clear()

    def release(self):
        self.released.set()

    def stop(self):
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve_manifest():
    servers = []

    def serve(body, delay=0.0, credentials=None):
        servers.append(ManifestServer(body, delay, credentials))
        return servers[-1]

    yield serve
    for server in servers:
        server.stop()


def test_first_sync_creates_the_declared_providers(registry_app, manifest_path, instance_path, databases):
    app = registry_app(manifest_path)
    assert sync(app) == [{"location": manifest_path.as_uri(), **counts(added=2)}]

    providers = by_base_url(app)
    assert set(providers) == {"https://api.openai.com/v1", "http://localhost:11434/v1"}
    openai = providers["https://api.openai.com/v1"]
    assert openai["registry"] == manifest_path.as_uri() == f"file://{manifest_path}"
    assert (openai["type"], openai["name"], openai["capabilities"], openai["state"]) == (
        "openai",
        "OpenAI",
        ["llm", "embedding"],
        "online",
    )
    assert stored_api_key(app, openai["id"]) == OPENAI_KEY
    assert stored_api_key(app, providers["http://localhost:11434/v1"]["id"]) == ""
    assert OPENAI_KEY.encode() not in databases.stored_bytes(instance_path)
    filtered = client_as(app, "reader").get(PROVIDERS, query_string={"registry": manifest_path.as_uri()})
    assert filtered.get_json()["total_count"] == 2


def test_a_second_sync_of_the_same_manifest_changes_nothing(registry_app, manifest_path):
    app = registry_app(manifest_path)
    sync(app)
    before = snapshot(app)
    assert sync(app) == [{"location": manifest_path.as_uri(), **counts(unchanged=2)}]
    assert snapshot(app) == before


def test_added_changed_and_removed_entries_are_applied(registry_app, manifest_path):
    app = registry_app(manifest_path)
    sync(app)
    openai_before = by_base_url(app)["https://api.openai.com/v1"]

    write_manifest(manifest_path, manifest(RENAMED_OPENAI, ANTHROPIC))
    assert sync(app) == [{"location": manifest_path.as_uri(), **counts(added=1, updated=1, removed=1)}]

    providers = by_base_url(app)
    assert set(providers) == {"https://api.openai.com/v1", "https://api.anthropic.com/v1"}
    openai = providers["https://api.openai.com/v1"]
    assert (openai["id"], openai["created_at"]) == (openai_before["id"], openai_before["created_at"])
    assert (openai["name"], openai["description"]) == ("OpenAI (renamed)", "Declared in a file")
    assert stored_api_key(app, providers["https://api.anthropic.com/v1"]["id"]) == LITERAL_KEY


def test_a_sync_that_changes_a_provider_changes_its_etag_and_one_that_does_not_keeps_it(registry_app, manifest_path):
    app = registry_app(manifest_path)
    sync(app)
    path = f"{PROVIDERS}/{by_base_url(app)['https://api.openai.com/v1']['id']}"
    reader = client_as(app, "reader")
    first = reader.get(path).headers["ETag"]
    sync(app)
    assert reader.get(path).headers["ETag"] == first
    write_manifest(manifest_path, manifest(RENAMED_OPENAI, OLLAMA))
    sync(app)
    renamed = reader.get(path)
    assert renamed.get_json()["name"] == "OpenAI (renamed)" and renamed.headers["ETag"] != first


def test_key_rotation_through_the_manifest_reseals_only_that_key(registry_app, manifest_path):
    app = registry_app(manifest_path)
    sync(app)
    before, sealed_before = snapshot(app)

    rotated_app = registry_app(manifest_path, openai_key=ROTATED_KEY)
    assert sync(rotated_app) == [{"location": manifest_path.as_uri(), **counts(updated=1, unchanged=1)}]

    after, sealed_after = snapshot(rotated_app)
    assert [provider["id"] for provider in after] == [provider["id"] for provider in before]
    openai_id = by_base_url(rotated_app)["https://api.openai.com/v1"]["id"]
    assert stored_api_key(rotated_app, openai_id) == ROTATED_KEY
    assert sealed_after[openai_id] != sealed_before[openai_id]
    assert {key: sealed for key, sealed in sealed_after.items() if key != openai_id} == {
        key: sealed for key, sealed in sealed_before.items() if key != openai_id
    }


def test_a_key_sealed_under_a_retired_encryption_key_is_resealed_from_the_manifest(make_app, manifest_path):
    settings = {"REGISTRY_MANIFESTS": str(manifest_path), "OPENAI_API_KEY": OPENAI_KEY}
    sync(make_app(**settings))
    new_key_app = make_app(REGISTRY_ENCRYPTION_KEYS=Fernet.generate_key().decode(), **settings)
    assert sync(new_key_app) == [{"location": manifest_path.as_uri(), **counts(updated=2)}]
    openai_id = by_base_url(new_key_app)["https://api.openai.com/v1"]["id"]
    assert stored_api_key(new_key_app, openai_id) == OPENAI_KEY


def test_a_changed_type_replaces_the_provider(registry_app, manifest_path):
    app = registry_app(manifest_path)
    sync(app)
    old_id = by_base_url(app)["http://localhost:11434/v1"]["id"]
    write_manifest(
        manifest_path, manifest(OPENAI, "\n  - {type: other, base_url: 'http://localhost:11434/v1/', api_key: ''}")
    )
    assert sync(app) == [{"location": manifest_path.as_uri(), **counts(added=1, removed=1, unchanged=1)}]
    replaced = by_base_url(app)["http://localhost:11434/v1"]
    assert replaced["type"] == "other" and replaced["id"] != old_id


@pytest.mark.parametrize("kind", list(BROKEN_MANIFESTS))
def test_a_broken_manifest_changes_nothing_and_says_why(kind, registry_app, manifest_path, caplog):
    app = registry_app(manifest_path)
    api_created = client_as(app, "admin").post(PROVIDERS, json=provider_body(base_url=API_CREATED_URL)).get_json()
    sync(app)
    before = snapshot(app)

    content, expected_error = BROKEN_MANIFESTS[kind]
    if content is None:
        manifest_path.unlink()
    else:
        write_manifest(manifest_path, content)
    (result,) = sync(app)

    assert snapshot(app) == before
    assert expected_error.format(api_id=api_created["id"]) in result["error"]
    assert result == {"location": manifest_path.as_uri(), **counts(), "error": result["error"]}
    (status,) = registry_status(app)
    assert (status["outcome"], status["error"], status["provider_count"]) == ("error", result["error"], 2)
    for secret in (LITERAL_KEY, OPENAI_KEY):
        assert secret not in result["error"] and secret not in caplog.text


def empty_entries(count):
    return "model_providers:\n" + "- {}\n" * count


def missing(index, *fields):
    return "; ".join(f"model_providers.{index}.{field}: Missing data for required field." for field in fields)


@pytest.mark.parametrize(
    ("content", "expected_error"),
    [
        (
            empty_entries(MAX_MANIFEST_ENTRIES + 1),
            f"The manifest declares {MAX_MANIFEST_ENTRIES + 1} providers; at most {MAX_MANIFEST_ENTRIES} are allowed.",
        ),
        (
            empty_entries(MAX_MANIFEST_ENTRIES),
            f"{missing(0, 'base_url', 'api_key', 'type')}; {missing(1, 'base_url', 'api_key')}; "
            f"and {3 * MAX_MANIFEST_ENTRIES - 5} more problems.",
        ),
        (
            json.dumps({"model_providers": [{"x" * 100_000: 1}]}),
            f"{missing(0, 'base_url', 'api_key', 'type')}; model_providers.0.{'x' * 181}…",  # 200 characters
        ),
    ],
    ids=["too many entries", "many invalid entries", "a long unknown field"],
)
def test_the_error_of_a_large_invalid_manifest_stays_short(
    content, expected_error, registry_app, manifest_path, caplog
):
    app = registry_app(manifest_path)
    sync(app)
    before = snapshot(app)
    write_manifest(manifest_path, content)
    (result,) = sync(app)
    assert result["error"] == expected_error
    assert snapshot(app) == before
    (status,) = registry_status(app)
    assert status["error"] == expected_error
    assert max(map(len, caplog.text.splitlines())) < 2000


def test_a_manifest_of_the_largest_allowed_size_and_entry_count_syncs(registry_app, manifest_path):
    entries = "".join(
        f"  - {{type: openai, base_url: 'https://p{index}.example.com/v1', api_key: k, description: '{index:-<800}'}}\n"
        for index in range(MAX_MANIFEST_ENTRIES)
    )
    content = f"model_providers:\n{entries}"
    padding = MAX_MANIFEST_BYTES - len(content.encode())
    assert padding >= 0
    write_manifest(manifest_path, content + "#" * padding)
    app = registry_app(manifest_path)
    assert sync(app) == [{"location": manifest_path.as_uri(), **counts(added=MAX_MANIFEST_ENTRIES)}]


SECRET_SETTINGS = {
    "REGISTRY_ADMIN_PASSWORD": "admin-password-in-the-environment-4444",
    "REGISTRY_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
}


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("REGISTRY_ADMIN_PASSWORD", "name"),
        ("REGISTRY_ENCRYPTION_KEYS", "api_key"),
        ("DATABASE_URL", "description"),
        ("HOST", "base_url"),  # set or not, a registry setting is refused
        ("LOG_FORMAT", "name"),
        ("PROMETHEUS_MULTIPROC_DIR", "description"),
        ("PGPASSWORD", "name"),
    ],
)
def test_a_manifest_naming_a_registry_setting_is_an_error_naming_it(
    variable, field, make_app, instance_path, manifest_path, caplog
):
    app = make_app(REGISTRY_MANIFESTS=str(manifest_path), OPENAI_API_KEY=OPENAI_KEY, **SECRET_SETTINGS)
    sync(app)
    before = snapshot(app)
    entry = {"type": "openai", "base_url": "https://leak.example.com/v1", "api_key": "k", field: f"${{{variable}}}"}
    if field == "base_url":
        entry[field] = f"https://${{{variable}}}/v1"
    write_manifest(manifest_path, json.dumps({"model_providers": [entry]}))

    (result,) = sync(app)

    assert snapshot(app) == before
    expected = f"model_providers.0.{field}: {variable} is a setting of the registry; a manifest may not read it."
    assert result["error"] == expected
    shown = json.dumps(registry_status(app)) + json.dumps(listing(app)) + caplog.text
    for secret in (*SECRET_SETTINGS.values(), registry_environ(instance_path)["DATABASE_URL"]):
        assert secret not in shown


def test_app_config_holds_the_registry_settings_not_the_environment(make_app):
    app = make_app(UNRELATED_SECRET="unrelated-secret-5555", OPENAI_API_KEY=OPENAI_KEY)
    assert "unrelated-secret-5555" not in repr(dict(app.config))
    assert OPENAI_KEY not in repr(dict(app.config))


def test_a_clash_with_another_manifest_changes_nothing_and_names_it(registry_app, manifest_path, tmp_path):
    second_path = write_manifest(tmp_path / "second.yaml", manifest(ANTHROPIC, OPENAI))
    app = registry_app(manifest_path, second_path)
    first, second = sync(app)
    assert first == {"location": manifest_path.as_uri(), **counts(added=2)}
    openai_id = by_base_url(app)["https://api.openai.com/v1"]["id"]
    assert second["error"] == (
        f"base_url https://api.openai.com/v1 is already registered by model provider {openai_id} "
        f"(of the manifest {manifest_path.as_uri()})."
    )
    assert "https://api.anthropic.com/v1" not in by_base_url(app)


def test_a_manifest_over_http_that_becomes_unreachable_keeps_its_providers(registry_app, serve_manifest):
    server = serve_manifest(manifest(OPENAI, OLLAMA))
    app = registry_app(server.url)
    assert sync(app) == [{"location": server.url, **counts(added=2)}]
    assert {provider["registry"] for provider in listing(app)} == {server.url}
    before = snapshot(app)

    server.stop()
    (result,) = sync(app)
    assert result["error"].startswith("Cannot fetch the manifest:")
    assert snapshot(app) == before
    (status,) = registry_status(app)
    assert (status["outcome"], status["provider_count"]) == ("error", 2)


def test_a_manifest_url_answering_an_error_status_changes_nothing(registry_app, serve_manifest):
    server = serve_manifest(manifest(OPENAI))
    app = registry_app(server.url)
    sync(app)
    before = snapshot(app)
    server.body = None
    assert sync(app) == [{"location": server.url, **counts(), "error": "Fetching the manifest answered HTTP 404."}]
    assert snapshot(app) == before


def test_a_manifest_url_answering_more_than_the_size_limit_changes_nothing(registry_app, serve_manifest):
    server = serve_manifest(manifest(OPENAI))
    app = registry_app(server.url)
    sync(app)
    before = snapshot(app)
    server.body = manifest(OPENAI) + "#" * MAX_MANIFEST_BYTES
    (result,) = sync(app)
    assert result["error"] == f"The manifest is larger than {MAX_MANIFEST_BYTES} bytes."
    assert snapshot(app) == before


MANIFEST_PASSWORD = "hunter2/?#@:pw"  # each of its special characters percent-encoded in the URL


def test_a_manifest_url_with_credentials_is_fetched_with_them_and_never_shows_them(
    registry_app, serve_manifest, instance_path, databases, caplog
):
    caplog.set_level(logging.DEBUG)
    server = serve_manifest(manifest(OPENAI), credentials=f"deploy:{MANIFEST_PASSWORD}")
    app = registry_app(server.url.replace("http://", f"http://deploy:{quote(MANIFEST_PASSWORD, safe='')}@"))
    (result,) = sync(app)
    assert result == {"location": server.url, **counts(added=1)}
    assert {provider["registry"] for provider in listing(app)} == {server.url}
    assert [status["location"] for status in registry_status(app)] == [server.url]
    shown = json.dumps([result, listing(app), registry_status(app)]) + caplog.text
    stored = databases.stored_bytes(instance_path)
    for secret in (MANIFEST_PASSWORD, quote(MANIFEST_PASSWORD, safe=""), "deploy:"):
        assert secret not in shown and secret.encode() not in stored


def test_a_manifest_url_with_wrong_credentials_is_an_error_that_does_not_show_them(
    registry_app, serve_manifest, caplog
):
    server = serve_manifest(manifest(OPENAI), credentials=f"deploy:{MANIFEST_PASSWORD}")
    app = registry_app(server.url.replace("http://", "http://deploy:wrong-password-6666@"))
    (result,) = sync(app)
    assert result == {"location": server.url, **counts(), "error": "Fetching the manifest answered HTTP 401."}
    assert listing(app) == []
    assert "wrong-password-6666" not in json.dumps(registry_status(app)) + caplog.text


@pytest.mark.parametrize("credential", ["password", "token"])
def test_no_database_connection_is_held_while_a_manifest_is_fetched(credential, registry_app, serve_manifest):
    server = serve_manifest(manifest(OPENAI))
    app = registry_app(server.url)
    admin = client_as(app, "admin")
    if credential == "token":
        token = admin.post("/api/v1/tokens", json={"name": "sync"}).get_json()["token"]
        admin = app.test_client()
        admin.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    server.hold()
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(admin.post, SYNC)
        assert server.fetching.wait(timeout=10), "the manifest was never fetched"
        with app.app_context():
            checked_out = db.engine.pool.checkedout()
        server.release()
        assert answer.result(timeout=30).get_json()["items"] == [{"location": server.url, **counts(added=1)}]
    assert checked_out == 0


def test_the_changes_of_a_sync_an_admin_asks_for_are_audited_as_the_systems(registry_app, manifest_path):
    app = registry_app(manifest_path)
    admin = client_as(app, "admin")
    token = admin.post("/api/v1/tokens", json={"name": "sync"}).get_json()["token"]
    asked = admin.post(SYNC, headers={"Authorization": f"Bearer {token}", "X-Request-ID": "sync-1"})
    assert asked.status_code == 200
    events = admin.get("/api/v1/audit", query_string={"action": "manifest.sync"}).get_json()["items"]
    assert len(events) == 2
    for event in events:
        assert (event["user"], event["token_id"], event["client_address"]) == ("system", None, None)
        assert event["request_id"] == "sync-1"


SIGNATURE = "presigned-signature-7777"


def test_a_manifest_url_is_shown_and_stored_without_its_query_string(
    registry_app, serve_manifest, instance_path, databases, caplog
):
    caplog.set_level(logging.INFO, logger="manifests")
    server = serve_manifest(manifest(OPENAI))
    app = registry_app(f"{server.url}?sig={SIGNATURE}&expires=1")
    assert sync(app) == [{"location": server.url, **counts(added=1)}]
    assert server.paths == [f"/providers.yaml?sig={SIGNATURE}&expires=1"]
    (provider,) = listing(app)
    assert provider["registry"] == server.url
    assert [status["location"] for status in registry_status(app)] == [server.url]
    assert SIGNATURE not in json.dumps([listing(app), registry_status(app)]) + caplog.text
    assert SIGNATURE.encode() not in databases.stored_bytes(instance_path)

    resigned_app = registry_app(f"{server.url}?sig=another-signature&expires=2")
    assert sync(resigned_app) == [{"location": server.url, **counts(unchanged=1)}]  # the same location
    assert listing(resigned_app) == [provider]


def test_urls_that_differ_only_in_what_is_not_shown_are_one_location_that_fails(registry_app, serve_manifest):
    server = serve_manifest(manifest(OPENAI))
    app = registry_app(f"{server.url}?team=a", f"{server.url}?team=b", server.url.replace("//", "//user:pw@"))
    error = (
        "This location is configured more than once with different credentials or query strings, which are not "
        "shown; give each manifest a path of its own."
    )
    assert sync(app) == [{"location": server.url, **counts(), "error": error}]
    assert server.fetches == 0 and listing(app) == []
    assert [(status["location"], status["error"]) for status in registry_status(app)] == [(server.url, error)]


def test_a_manifest_urls_credentials_and_query_string_are_not_in_the_server_log(start_gunicorn, serve_manifest):
    manifest_server = serve_manifest(manifest(OPENAI), credentials=f"deploy:{MANIFEST_PASSWORD}")
    secret_url = manifest_server.url.replace("http://", f"http://deploy:{quote(MANIFEST_PASSWORD, safe='')}@")
    server = start_gunicorn(workers=1, REGISTRY_MANIFESTS=f"{secret_url}?sig={SIGNATURE}", OPENAI_API_KEY=OPENAI_KEY)
    (provider,) = wait_for_providers(server, 1)
    assert provider["registry"] == manifest_server.url
    assert post_sync(server) == 200
    server.kill()
    log = server.log()
    assert manifest_server.url in log  # the sync's own line, with the location as shown
    for secret in (SIGNATURE, MANIFEST_PASSWORD, quote(MANIFEST_PASSWORD, safe=""), "deploy:"):
        assert secret not in log


def test_providers_of_a_dropped_location_are_removed(registry_app, manifest_path, tmp_path):
    dropped_path = write_manifest(tmp_path / "dropped.yaml", manifest(ANTHROPIC))
    app = registry_app(manifest_path, dropped_path)
    client_as(app, "admin").post(PROVIDERS, json=provider_body(base_url=API_CREATED_URL))
    sync(app)

    narrowed_app = registry_app(manifest_path)
    assert sync(narrowed_app) == [
        {"location": dropped_path.as_uri(), **counts(removed=1)},
        {"location": manifest_path.as_uri(), **counts(unchanged=2)},
    ]
    assert set(by_base_url(narrowed_app)) == {"https://api.openai.com/v1", "http://localhost:11434/v1", API_CREATED_URL}
    assert [status["location"] for status in registry_status(narrowed_app)] == [manifest_path.as_uri()]


def test_an_empty_manifest_removes_its_providers_but_not_api_created_ones(registry_app, manifest_path):
    app = registry_app(manifest_path)
    client_as(app, "admin").post(PROVIDERS, json=provider_body(base_url=API_CREATED_URL))
    sync(app)
    write_manifest(manifest_path, "model_providers: []\n")
    assert sync(app) == [{"location": manifest_path.as_uri(), **counts(removed=2)}]
    assert list(by_base_url(app)) == [API_CREATED_URL]


def test_json_manifests_file_urls_and_relative_paths(registry_app, tmp_path, monkeypatch):
    json_path = tmp_path / "providers.json"
    json_path.write_text(
        json.dumps({"model_providers": [{"type": "groq", "base_url": "https://g.example", "api_key": "k"}]})
    )
    write_manifest(tmp_path / "relative.yaml", manifest(OLLAMA))
    monkeypatch.chdir(tmp_path)
    app = registry_app(json_path.as_uri(), "relative.yaml", json_path)
    assert sync(app) == [
        {"location": json_path.as_uri(), **counts(added=1)},
        {"location": (tmp_path / "relative.yaml").as_uri(), **counts(added=1)},
    ]


def test_an_unusable_location_is_reported_not_a_500(registry_app, manifest_path):
    unusable = {
        "ftp://example.com/providers.yaml": "Unsupported location",
        "file://[oops/providers.yaml": "The location is not a valid URL.",
        "http://[::1/providers.yaml": "The location is not a valid URL.",
        "http://127.0.0.1:port/providers.yaml": "Cannot fetch the manifest: Invalid port",
        "http://bad..host/providers.yaml": "Cannot fetch the manifest",
    }
    app = registry_app(*unusable, manifest_path)
    results = sync(app)
    assert [result["location"] for result in results] == [*unusable, manifest_path.as_uri()]
    for result, expected_error in zip(results[:-1], unusable.values(), strict=True):
        assert result["error"].startswith(expected_error)
    assert results[-1] == {"location": manifest_path.as_uri(), **counts(added=2)}
    assert [status["outcome"] for status in registry_status(app)] == ["error"] * 5 + ["ok"]


def test_patch_and_delete_of_a_managed_provider_are_409_naming_the_manifest(registry_app, manifest_path):
    app = registry_app(manifest_path)
    sync(app)
    admin = client_as(app, "admin")
    provider = by_base_url(app)["https://api.openai.com/v1"]
    for answer in (
        admin.patch(f"{PROVIDERS}/{provider['id']}", json={"name": "Changed"}),
        admin.delete(f"{PROVIDERS}/{provider['id']}"),
    ):
        assert answer.status_code == 409
        assert answer.content_type == "application/problem+json"
        assert manifest_path.as_uri() in answer.get_json()["detail"]
    assert admin.get(f"{PROVIDERS}/{provider['id']}").get_json() == provider


def test_registry_lists_each_configured_location_and_its_last_sync(registry_app, manifest_path, tmp_path):
    missing_path = tmp_path / "missing.yaml"
    app = registry_app(manifest_path, missing_path)
    never_synced = {"last_synced_at": None, "outcome": None, "error": None, "provider_count": 0}
    assert registry_status(app) == [
        {"location": manifest_path.as_uri(), **never_synced},
        {"location": missing_path.as_uri(), **never_synced},
    ]
    sync(app)
    synced, failed = registry_status(app)
    assert (synced["outcome"], synced["error"], synced["provider_count"]) == ("ok", None, 2)
    assert synced["last_synced_at"].endswith("Z")
    assert (failed["outcome"], failed["provider_count"]) == ("error", 0)
    assert failed["error"] == "Cannot read the file: No such file or directory."


def test_registry_routes_need_their_roles(registry_app, manifest_path):
    app = registry_app(manifest_path)
    assert app.test_client().get(REGISTRY).status_code == 401
    assert client_as(app, "reader").post(SYNC).status_code == 403
    assert client_as(app, "service").post(SYNC).status_code == 403
    assert listing(app) == []


def test_openapi_documents_the_registry_routes(registry_app, manifest_path):
    paths = registry_app(manifest_path).test_client().get("/openapi.json").get_json()["paths"]
    assert paths[REGISTRY]["get"]["security"] == [{"basic_auth": ["reader"]}, {"token_auth": ["reader"]}]
    assert paths[SYNC]["post"]["security"] == [{"basic_auth": ["admin"]}, {"token_auth": ["admin"]}]
    assert "409" in paths[SYNC]["post"]["responses"]


def run_cli(instance_path, *locations):
    environ = registry_environ(
        instance_path, REGISTRY_MANIFESTS=",".join(map(str, locations)), OPENAI_API_KEY=OPENAI_KEY
    )
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "registry", "sync"],
        cwd=ROOT,
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow  # a CLI process of its own: seconds
def test_cli_sync_prints_the_summary_and_exits_0(instance_path, manifest_path):
    done = run_cli(instance_path, manifest_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{manifest_path.as_uri()}: 2 added, 0 updated, 0 removed, 0 unchanged\n"


@pytest.mark.slow  # a CLI process of its own: seconds
def test_cli_sync_exits_non_zero_when_a_manifest_fails(instance_path, manifest_path, tmp_path):
    broken_path = write_manifest(tmp_path / "broken.yaml", BROKEN_MANIFESTS["invalid entry"][0])
    done = run_cli(instance_path, manifest_path, broken_path)
    assert done.returncode == 1
    good_line, broken_line = done.stdout.splitlines()
    assert good_line.endswith(": 2 added, 0 updated, 0 removed, 0 unchanged")
    assert broken_line.startswith(f"{broken_path.as_uri()}: error: model_providers.3.type: Must be one of")
    assert LITERAL_KEY not in done.stdout + done.stderr


@pytest.mark.slow  # a CLI process of its own: seconds
def test_cli_sync_with_nothing_configured_says_so(instance_path):
    done = run_cli(instance_path)
    assert (done.returncode, done.stdout) == (0, "No manifests are configured.\n")


def wait_for_providers(server, count, timeout=20):
    deadline = time.monotonic() + timeout
    with server.client("reader") as reader:
        while time.monotonic() < deadline:
            providers = reader.get(PROVIDERS).json()["items"]
            if len(providers) == count:
                return providers
            time.sleep(0.1)
    raise AssertionError(f"no {count} providers within {timeout} s")


def test_a_fresh_start_syncs_without_waiting_an_interval(start_gunicorn, manifest_path):
    settings = {"REGISTRY_MANIFESTS": str(manifest_path), "OPENAI_API_KEY": OPENAI_KEY, "REGISTRY_SYNC_INTERVAL": "300"}
    first = start_gunicorn(workers=2, **settings)
    wait_for_providers(first, 2)
    first.kill()
    # The last sync started moments ago, so only the sync on taking the lease can pick this up.
    write_manifest(manifest_path, manifest(OPENAI, OLLAMA, ANTHROPIC))
    restarted = start_gunicorn(workers=2, **settings)
    wait_for_providers(restarted, 3)
    restarted.kill()
    assert OPENAI_KEY not in first.log() + restarted.log() and LITERAL_KEY not in restarted.log()


def post_sync(server):
    with server.client("admin") as admin:
        return admin.post(SYNC).status_code


def test_two_workers_never_sync_a_manifest_twice_at_once(start_gunicorn, serve_manifest):
    manifest_server = serve_manifest(manifest(OPENAI, OLLAMA), delay=0.2)
    server = start_gunicorn(
        workers=2, REGISTRY_MANIFESTS=manifest_server.url, OPENAI_API_KEY=OPENAI_KEY, REGISTRY_SYNC_INTERVAL="0.5"
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(post_sync, [server] * 8))
    assert statuses == [200] * 8
    assert manifest_server.fetches >= 8
    assert manifest_server.most_in_flight == 1
    assert len(wait_for_providers(server, 2)) == 2


def test_scheduled_syncs_run_once_per_interval_across_workers(start_gunicorn, serve_manifest):
    manifest_server = serve_manifest(manifest(OPENAI))
    server = start_gunicorn(
        workers=2, REGISTRY_MANIFESTS=manifest_server.url, OPENAI_API_KEY=OPENAI_KEY, REGISTRY_SYNC_INTERVAL="1"
    )
    wait_for_providers(server, 1)
    fetches_before = manifest_server.fetches
    time.sleep(3)
    assert 1 <= manifest_server.fetches - fetches_before <= 4


def test_with_interval_0_a_restart_still_syncs_and_drops_a_removed_location(start_gunicorn, manifest_path, tmp_path):
    other_path = write_manifest(tmp_path / "other.yaml", manifest(ANTHROPIC))
    both = f"{manifest_path},{other_path}"
    first = start_gunicorn(workers=2, REGISTRY_MANIFESTS=both, OPENAI_API_KEY=OPENAI_KEY, REGISTRY_SYNC_INTERVAL="0")
    wait_for_providers(first, 3)
    first.kill()
    restarted = start_gunicorn(
        workers=2, REGISTRY_MANIFESTS=str(manifest_path), OPENAI_API_KEY=OPENAI_KEY, REGISTRY_SYNC_INTERVAL="0"
    )
    remaining = wait_for_providers(restarted, 2)
    assert {provider["registry"] for provider in remaining} == {manifest_path.as_uri()}


def test_with_interval_0_the_start_sync_runs_once_for_all_workers(start_gunicorn, serve_manifest):
    manifest_server = serve_manifest(manifest(OPENAI))
    server = start_gunicorn(
        workers=3, REGISTRY_MANIFESTS=manifest_server.url, OPENAI_API_KEY=OPENAI_KEY, REGISTRY_SYNC_INTERVAL="0"
    )
    wait_for_providers(server, 1)
    time.sleep(3)  # time for every worker to take the lease once, and for a periodic sync that must not run
    assert manifest_server.fetches == 1
