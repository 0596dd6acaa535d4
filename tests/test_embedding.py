"""The registry embedded in another program: built from a settings mapping, mounted under a
path of a host WSGI application, and served by gunicorn under a reverse proxy's path."""

import re
import threading

import httpx
import openai
import pytest
from flask_migrate import upgrade
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.serving import make_server

from app import create_app
from tests.conftest import PASSWORDS, provider_body

MOUNT = "/registry"
MODEL_KEY = "sk-model-key-embedded"


def test_settings_override_the_environment_and_migrations_apply(tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/from-the-environment.db")
    monkeypatch.setenv("REGISTRY_PROBE_INTERVAL", "45")
    monkeypatch.setenv("REGISTRY_LOGIN_FAILURES", "7")  # given by the environment alone
    database_path = tmp_path / "embedded.db"
    registry = create_app(
        {
            "DATABASE_URL": f"sqlite:///{database_path}",
            "REGISTRY_INSTANCE_PATH": tmp_path / "instance",
            "REGISTRY_PROBE_INTERVAL": 0,
            "REGISTRY_VERIFY_ON_CREATE": False,
            "REGISTRY_SYNC_INTERVAL": 0,
            "REGISTRY_ADMIN_PASSWORD": "embedded-admin-password",
        }
    )
    assert registry.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{database_path}"
    assert registry.config["PROBE_INTERVAL"] == 0
    assert registry.config["VERIFY_ON_CREATE"] is False
    assert registry.config["LOGIN_FAILURE_LIMIT"] == 7
    assert registry.test_client().get("/readyz").status_code == 503

    with registry.app_context():
        upgrade()
    assert registry.test_client().get("/readyz").status_code == 200
    assert registry.test_cli_runner().invoke(args=["users", "bootstrap"]).exit_code == 0
    assert database_path.exists() and not (tmp_path / "from-the-environment.db").exists()
    listed = registry.test_client().get("/api/v1/model_providers", auth=("admin", "embedded-admin-password"))
    assert listed.status_code == 200 and listed.get_json()["total_count"] == 0


def host_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the host application"]


@pytest.fixture
def mounted(make_app):
    """A host WSGI app with the registry mounted under /registry, served over HTTP: its base URL."""
    registry = make_app(REGISTRY_VERIFY_ON_CREATE="true")
    server = make_server("127.0.0.1", 0, DispatcherMiddleware(host_app, {MOUNT: registry}), threaded=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()
    server.server_close()


def test_providers_under_a_mount_path_link_under_it(mounted, fake_upstream):
    fake = fake_upstream("openai", api_key=MODEL_KEY)
    with httpx.Client(base_url=mounted, auth=("admin", PASSWORDS["admin"]), timeout=30) as admin:
        assert admin.get("/").text == "the host application"
        created = admin.post(
            f"{MOUNT}/api/v1/model_providers", json=provider_body(base_url=fake.base_url, api_key=MODEL_KEY)
        )
        assert created.status_code == 201, created.text
        provider_id = created.json()["id"]
        assert created.headers["Location"] == f"{MOUNT}/api/v1/model_providers/{provider_id}"
        assert admin.get(created.headers["Location"]).json()["id"] == provider_id
        listed = admin.get(f"{MOUNT}/api/v1/model_providers").json()
        assert [provider["id"] for provider in listed["items"]] == [provider_id]


def test_openapi_servers_and_docs_are_under_the_mount_path(mounted):
    with httpx.Client(base_url=mounted, timeout=30) as anonymous:
        spec = anonymous.get(f"{MOUNT}/openapi.json").json()
        assert spec["servers"] == [{"url": MOUNT}]
        page = anonymous.get(f"{MOUNT}/docs")
        assert page.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        document = re.search(r'url: "([^"]+)"', page.text).group(1)
        assert len(assets) == 3 and document == f"{MOUNT}/openapi.json"
        for url in [*assets, document]:
            assert url.startswith(f"{MOUNT}/")
            assert anonymous.get(url).status_code == 200


def test_gateway_under_a_mount_path_serves_the_openai_client(mounted, fake_upstream):
    fake = fake_upstream("openai", api_key=MODEL_KEY)
    with httpx.Client(base_url=f"{mounted}{MOUNT}/api/v1", timeout=30) as registry:
        admin, service = ("admin", PASSWORDS["admin"]), ("service", PASSWORDS["service"])
        body = provider_body(base_url=fake.base_url, api_key=MODEL_KEY)
        assert registry.post("/model_providers", json=body, auth=admin).status_code == 201
        token = registry.post("/tokens", json={"name": "agent", "role": "caller"}, auth=service).json()["token"]
    with openai.OpenAI(base_url=f"{mounted}{MOUNT}/api/v1/openai", api_key=token, max_retries=0) as client:
        messages = [{"role": "user", "content": "Hi"}]
        answer = client.chat.completions.create(model="openai:gpt-4o", messages=messages)
        assert answer.choices[0].message.content == "Hello!"
        chunks = client.chat.completions.create(model="openai:gpt-4o", messages=messages, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "Hello!"
        with pytest.raises(openai.NotFoundError):  # errors in OpenAI's shape under the mount path too
            client.chat.completions.create(model="openai:no-such-model", messages=messages)


def test_gunicorn_serves_under_the_proxy_path_of_script_name(start_gunicorn):
    server = start_gunicorn(workers=1, wait=False, SCRIPT_NAME=MOUNT)
    server.base_url += MOUNT
    server.wait_until_ready()
    with server.client("admin") as admin:
        created = admin.post("/api/v1/model_providers", json=provider_body())
        assert created.headers["Location"] == f"{MOUNT}/api/v1/model_providers/{created.json()['id']}"
        assert admin.get("/openapi.json").json()["servers"] == [{"url": MOUNT}]
    outside = httpx.get(f"{server.base_url.removesuffix(MOUNT)}/healthz", timeout=10)
    assert outside.status_code == 404
    assert outside.headers["Content-Type"] == "application/problem+json"
    assert "SCRIPT_NAME" in outside.json()["detail"]
