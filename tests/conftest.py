"""The suite's fixtures, and its lanes.

A test marked `server` starts gunicorn: through start_gunicorn or start_instances (marked
here), or through Gunicorn itself (marked in its module). Every server test is also `slow`,
as is a test marked so for running for seconds in-process; a test marked `timed` times
answers under load.

- Fast lane, under a minute on two cores: `make test-fast` (`pytest -m "not slow" -n 3`).
- `make test`: lint, `pytest -m "not timed" -n 3`, then `pytest -m timed` alone.
"""

import base64
import glob
import io
import itertools
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from flask_migrate import upgrade
from werkzeug.security import generate_password_hash
from werkzeug.serving import WSGIRequestHandler, make_server

from app import create_app
from models import User, db
from tests.fakes import BlackHole, FakeUpstream
from tests.protocols import PROTOCOLS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORDS = {"admin": "admin-pass-1", "service": "service-pass-1", "reader": "reader-pass-1"}
# A PostgreSQL database (postgresql+psycopg://...) whose role may create databases: the
# whole suite then runs on PostgreSQL, with a fresh database per test. Unset: SQLite.
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
SQLITE_ONLY = pytest.mark.skipif(bool(TEST_DATABASE_URL), reason="SQLite's own behaviour; PostgreSQL has none of it")
POSTGRES_ONLY = pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL's own behaviour; SQLite has none of it")
# Instance folder -> its own PostgreSQL database; a folder not listed uses its SQLite file.
DATABASE_URLS = {}

# Instances on one database share their encryption key, as docs/storage.md says they must.
SHARED_ENCRYPTION_KEY = Fernet.generate_key().decode()

# Tests that use these start gunicorn: they are marked `server` (and so `slow`) here.
SERVER_FIXTURES = {"start_gunicorn", "start_instances"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
        if item.get_closest_marker("server"):
            item.add_marker(pytest.mark.slow)


def basic_auth(username, password):
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def database_url(instance_path):
    return DATABASE_URLS.get(str(instance_path), f"sqlite:///{instance_path}/registry.db")


def registry_environ(instance_path, **overrides):
    environ = {
        "REGISTRY_INSTANCE_PATH": str(instance_path),
        "DATABASE_URL": database_url(instance_path),
        "REGISTRY_VERIFY_ON_CREATE": "false",
        "REGISTRY_PROBE_INTERVAL": "0",
        "REGISTRY_SYNC_INTERVAL": "0",
        "REGISTRY_AUDIT_PRUNE_INTERVAL": "0",
        "REGISTRY_USAGE_PRUNE_INTERVAL": "0",
    }
    environ.update(overrides)
    return environ


# The users of the template database have a one-round hash: werkzeug reads the method from the
# stored hash, so they log in as scrypt users do, without scrypt's 0.1 s per first login,
# paid by nearly every test. Tests about the slow hash make their users with the CLI.
CHEAP_HASH_METHOD = "pbkdf2:sha256:1"


def migrate_and_add_users(instance_path):
    """Apply the migrations to the folder's database and add one user per role."""
    app = create_app(registry_environ(instance_path), environ={})
    with app.app_context():
        upgrade()
        for role, password in PASSWORDS.items():
            password_hash = generate_password_hash(password, method=CHEAP_HASH_METHOD)
            db.session.add(User(username=role, role=role, password_hash=password_hash))
        db.session.commit()
        db.engine.dispose()


class SqliteDatabases:
    """Each instance folder holds its own SQLite file, a copy of a migrated template."""

    def __init__(self, template_folder):
        self.template = template_folder / "registry.db"
        migrate_and_add_users(template_folder)

    def create(self, instance_path, migrated):
        if migrated:
            shutil.copy(self.template, instance_path / "registry.db")

    def drop(self, instance_path):
        pass  # removed with the test's temporary folder

    def stored_bytes(self, instance_path):
        return b"".join(path.read_bytes() for path in instance_path.glob("registry.db*"))

    def destroy(self, instance_path):
        (instance_path / "registry.db").unlink()
        (instance_path / "registry.db").mkdir()  # unopenable as a database

    def close(self):
        pass


class PostgresDatabases:
    """Each instance folder gets its own database on the TEST_DATABASE_URL server, made
    from a migrated template database by CREATE DATABASE ... TEMPLATE (a file copy)."""

    def __init__(self, url, template_folder):
        self.url = sa.make_url(url)
        if self.url.get_backend_name() != "postgresql":
            raise pytest.UsageError("TEST_DATABASE_URL must name a PostgreSQL database (postgresql+psycopg://...).")
        self.server = sa.create_engine(self.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        self.prefix = f"{self.url.database}_{os.getpid()}"
        self.numbers = itertools.count()
        self.template = f"{self.prefix}_template"
        self.execute(f'CREATE DATABASE "{self.template}"')
        DATABASE_URLS[str(template_folder)] = self.url_of(self.template)
        migrate_and_add_users(template_folder)

    def execute(self, statement):
        with self.server.connect() as connection:
            connection.exec_driver_sql(statement)

    def url_of(self, name, driver="postgresql+psycopg"):
        return self.url.set(drivername=driver, database=name).render_as_string(hide_password=False)

    def name_of(self, instance_path):
        return sa.make_url(DATABASE_URLS[str(instance_path)]).database

    def create(self, instance_path, migrated):
        name = f"{self.prefix}_{next(self.numbers)}"
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template if migrated else "template0"}"')
        DATABASE_URLS[str(instance_path)] = self.url_of(name)

    def drop(self, instance_path):
        self.execute(f'DROP DATABASE IF EXISTS "{self.name_of(instance_path)}" WITH (FORCE)')
        del DATABASE_URLS[str(instance_path)]

    def stored_bytes(self, instance_path):
        """Everything the database holds, as `pg_dump` writes it."""
        libpq_url = self.url_of(self.name_of(instance_path), driver="postgresql")
        return subprocess.run(["pg_dump", "--dbname", libpq_url], capture_output=True, check=True).stdout

    def destroy(self, instance_path):
        self.execute(f'DROP DATABASE "{self.name_of(instance_path)}" WITH (FORCE)')

    def close(self):
        self.execute(f'DROP DATABASE IF EXISTS "{self.template}"')
        self.server.dispose()


@pytest.fixture(scope="session")
def databases(tmp_path_factory):
    """Where each test's database lives: SQLite files, or PostgreSQL with TEST_DATABASE_URL."""
    template_folder = tmp_path_factory.mktemp("template")
    if TEST_DATABASE_URL:
        backend = PostgresDatabases(TEST_DATABASE_URL, template_folder)
    else:
        backend = SqliteDatabases(template_folder)
    yield backend
    backend.close()


@pytest.fixture
def make_instance(tmp_path, databases):
    """An instance folder with its own database: migrated with one user per role, or empty."""
    folders = []

    def make(name="instance", migrated=True):
        folder = tmp_path / name
        folder.mkdir()
        databases.create(folder, migrated)
        folders.append(folder)
        return folder

    yield make
    for folder in folders:
        databases.drop(folder)


@pytest.fixture
def instance_path(make_instance):
    return make_instance()


@pytest.fixture
def make_app(instance_path):
    """Build the real app on this test's database, with environment overrides."""
    apps = []

    def build(**overrides):
        app = create_app(registry_environ(instance_path, **overrides), environ={})
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["usage"].stop()  # its usage events written while its database is there
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


def wait_for(condition, timeout=15, step=0.05):
    """True as soon as `condition()` is; False when it was not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


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


def is_jobs_process(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().split(b"\0")[1:3] == [b"-m", b"jobs"]
    except FileNotFoundError:  # it ended meanwhile
        return False


SERVER_NUMBERS = itertools.count()
GUNICORN_COMMAND = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
FLASK_COMMAND = f"{shlex.quote(sys.executable)} -m flask --app app"
# What `make run` does: apply the migrations, create the first admin, then serve.
MIGRATE_THEN_GUNICORN_COMMAND = [
    "sh",
    "-c",
    f"{FLASK_COMMAND} db upgrade && {FLASK_COMMAND} users bootstrap && exec {shlex.join(GUNICORN_COMMAND)}",
]


class Gunicorn:
    """The registry served by gunicorn with the project's configuration, on a free port.

    `migrate_first` starts it as `make run` does; `wait=False` returns before it is ready
    (call `wait_until_ready`), so that several can start at the same moment; `port` picks
    the port instead of a free one."""

    def __init__(self, instance_path, workers=2, migrate_first=False, wait=True, port=None, **overrides):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # Numbered: a second server on the same port (refused) must not truncate the first's log.
        self.log_path = instance_path / f"gunicorn-{self.port}-{next(SERVER_NUMBERS)}.log"
        environ = {**os.environ, **registry_environ(instance_path, **overrides)}
        environ.update(HOST="127.0.0.1", PORT=str(self.port), WEB_CONCURRENCY=str(workers))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                MIGRATE_THEN_GUNICORN_COMMAND if migrate_first else GUNICORN_COMMAND,
                cwd=ROOT,
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_until_ready()

    def wait_until_ready(self):
        wait_until_serving(self.base_url, self.process)

    def client(self, role):
        return httpx.Client(base_url=self.base_url, auth=(role, PASSWORDS[role]), timeout=30)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def child_pids(self):
        """The master's children, whichever of its threads started them."""
        pids = []
        for children_path in glob.glob(f"/proc/{self.process.pid}/task/*/children"):
            with open(children_path) as children:
                pids.extend(int(pid) for pid in children.read().split())
        return pids

    def worker_pids(self):
        return [pid for pid in self.child_pids() if not is_jobs_process(pid)]

    def jobs_pids(self):
        """The master's jobs processes (`python -m jobs`): one while it runs."""
        return [pid for pid in self.child_pids() if is_jobs_process(pid)]

    def kill(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)


class QuietRequestHandler(WSGIRequestHandler):
    def log_request(self, *args):
        pass  # the app logs its own requests


class InProcessServer:
    """The real app served over real HTTP by a threaded server in this process: real sockets
    for real clients, without gunicorn's start-up cost, for tests about what the app answers
    rather than about gunicorn. `log()` is what the app logged meanwhile."""

    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietRequestHandler)
        self.base_url = f"http://127.0.0.1:{self.server.port}"
        self.logged = io.StringIO()
        self.log_handler = logging.StreamHandler(self.logged)
        self.log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        logging.getLogger().addHandler(self.log_handler)
        serving = {"target": self.server.serve_forever, "kwargs": {"poll_interval": 0.02}}  # a prompt shutdown
        self.thread = threading.Thread(**serving, name="in-process-server", daemon=True)
        self.thread.start()

    def client(self, role):
        return httpx.Client(base_url=self.base_url, auth=(role, PASSWORDS[role]), timeout=30)

    def log(self):
        return self.logged.getvalue()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        logging.getLogger().removeHandler(self.log_handler)


@pytest.fixture
def serve():
    """Serve an app over HTTP in this process: serve(app) -> its InProcessServer."""
    servers = []

    def start(app):
        servers.append(InProcessServer(app))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def start_instances(tmp_path):
    """Start `count` instances at the same moment on one database, each in its own
    folder, sharing REGISTRY_ENCRYPTION_KEYS as docs/storage.md says they must."""
    servers = []

    def start(count, on_database, **options):
        started = []
        for _ in range(count):
            folder = tmp_path / f"machine-{len(servers)}"
            folder.mkdir()
            server = Gunicorn(
                folder, wait=False, DATABASE_URL=on_database, REGISTRY_ENCRYPTION_KEYS=SHARED_ENCRYPTION_KEY, **options
            )
            servers.append(server)
            started.append(server)
        for server in started:
            server.wait_until_ready()
        return started

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def start_gunicorn(instance_path):
    servers = []

    def start(workers=2, **options):
        server = Gunicorn(instance_path, workers=workers, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def fake_upstream():
    """Start fake upstreams, every one stopped after the test:
    fake_upstream(flavor="openai", api_key=..., models=[...], delay=0) (tests/fakes/)."""
    upstreams = []

    def start(*args, **options):
        upstream = FakeUpstream(*args, **options)
        upstreams.append(upstream)
        return upstream

    yield start
    for upstream in upstreams:
        upstream.down()


@pytest.fixture
def black_hole():
    """A loopback port that accepts connections and never answers."""
    hole = BlackHole()
    yield hole
    hole.close()


# The gateway ------------------------------------------------------------------------------


@pytest.fixture
def registry(make_app):
    """The app on this test's database, to register providers (verified, which fills the
    model index the gateway routes by) and set their state."""
    return make_app(REGISTRY_VERIFY_ON_CREATE="true")


@pytest.fixture
def upstream(registry, fake_upstream):
    """An OpenAI-compatible fake model server, registered (verified) with `registry`."""
    server = fake_upstream(api_key="sk-model-key-SECRET-4242")
    response = client_as(registry, "admin").post(
        "/api/v1/model_providers", json=provider_body(base_url=server.base_url, api_key=server.api_key)
    )
    assert response.status_code == 201, response.get_json()
    return server


@pytest.fixture
def gateway(serve, make_app, registry):
    """The registry served over HTTP (in this process), with `caller_token`, an API token of
    role caller, as agents hold; `gateway(iam=server)` points watsonx at a fake IAM; other
    keyword arguments are settings."""

    def start(iam=None, **overrides):
        if iam is not None:
            overrides["REGISTRY_WATSONX_IAM_URL"] = iam.iam_url
        server = serve(make_app(**overrides))
        server.caller_token = token_of(registry, "caller")
        return server

    return start


def token_of(registry, role):
    """A new API token of that role (its owner: the user of that role, or service for caller)."""
    owner = "service" if role == "caller" else role
    response = client_as(registry, owner).post("/api/v1/tokens", json={"name": f"agent-{role}", "role": role})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["token"]


@pytest.fixture(params=PROTOCOLS, ids=lambda protocol: protocol.name)
def protocol(request):
    """Each inbound protocol of the gateway in turn (tests/protocols.py)."""
    return request.param
