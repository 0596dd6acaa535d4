import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from flask_migrate import upgrade

from app import create_app
from models import User, db
from tests.fake_upstreams import FakeUpstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORDS = {"admin": "admin-pass-1", "service": "service-pass-1", "reader": "reader-pass-1"}


def basic_auth(username, password):
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def registry_environ(instance_path, **overrides):
    environ = {
        "REGISTRY_INSTANCE_PATH": str(instance_path),
        "REGISTRY_VERIFY_ON_CREATE": "false",
        "REGISTRY_PROBE_INTERVAL": "0",
        "REGISTRY_SYNC_INTERVAL": "0",
    }
    environ.update(overrides)
    return environ


@pytest.fixture(scope="session")
def template_database(tmp_path_factory):
    """A migrated SQLite file with one user per role, copied for each test."""
    instance = tmp_path_factory.mktemp("template")
    app = create_app(registry_environ(instance))
    with app.app_context():
        upgrade()
        for role, password in PASSWORDS.items():
            user = User(username=role, role=role)
            user.set_password(password)
            db.session.add(user)
        db.session.commit()
        db.engine.dispose()
    return instance / "registry.db"


@pytest.fixture
def instance_path(tmp_path, template_database):
    instance = tmp_path / "instance"
    instance.mkdir()
    shutil.copy(template_database, instance / "registry.db")
    return instance


@pytest.fixture
def make_app(instance_path):
    """Build the real app on this test's database, with environment overrides."""
    apps = []

    def build(**overrides):
        app = create_app(registry_environ(instance_path, **overrides))
        apps.append(app)
        return app

    yield build
    for app in apps:
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def app(make_app):
    return make_app()


def client_as(app, role):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = basic_auth(role, PASSWORDS[role])
    return client


@pytest.fixture
def admin(app):
    return client_as(app, "admin")


@pytest.fixture
def service(app):
    return client_as(app, "service")


@pytest.fixture
def reader(app):
    return client_as(app, "reader")


@pytest.fixture
def anonymous(app):
    return app.test_client()


def provider_body(**fields):
    """A create body as Agent Stack clients send it: every optional field, often null."""
    body = {
        "type": "openai",
        "base_url": "https://api.openai.com/v1",
        "api_key": "sk-test-key",
        "name": None,
        "description": None,
        "watsonx_project_id": None,
        "watsonx_space_id": None,
    }
    body.update(fields)
    return body


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(base_url, process, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gunicorn did not become ready")


class Gunicorn:
    """The registry served by gunicorn with the project's configuration, on a free port."""

    def __init__(self, instance_path, workers=2, **overrides):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = instance_path / f"gunicorn-{self.port}.log"
        environ = {**os.environ, **registry_environ(instance_path, **overrides)}
        environ.update(HOST="127.0.0.1", PORT=str(self.port), WEB_CONCURRENCY=str(workers))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until_serving(self.base_url, self.process)

    def client(self, role):
        return httpx.Client(base_url=self.base_url, auth=(role, PASSWORDS[role]), timeout=30)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def kill(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)


@pytest.fixture
def start_gunicorn(instance_path):
    servers = []

    def start(workers=2, **overrides):
        server = Gunicorn(instance_path, workers=workers, **overrides)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def fake_upstream():
    """Start fake upstreams: fake_upstream(flavor="openai", api_key=..., models=[...], delay=0)."""
    upstreams = []

    def start(**options):
        upstream = FakeUpstream(**options)
        upstreams.append(upstream)
        return upstream

    yield start
    for upstream in upstreams:
        upstream.down()
