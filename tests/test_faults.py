"""Faults: the database connection lost mid-request, the database gone or its disk full, a
provider that hangs or flaps, a worker killed under streams. Each is answered clearly
(never a 500), and the service recovers without a restart.

The database faults run on SQLite and, with TEST_DATABASE_URL, on PostgreSQL: a connection
is lost the way each loses one (PostgreSQL's backend terminated, SQLite's connection closed
under the registry), and a disk fills the way a test can make it without root (SQLite's
own page limit; on PostgreSQL, a trigger answering the disk_full error a full disk gives).
"""

import logging

import pytest
import sqlalchemy as sa

from models import db
from observability.logs import RequestFields
from tests.conftest import TEST_DATABASE_URL, database_url, provider_body

PROVIDERS = "/api/v1/model_providers"
DATABASE_RETRY_AFTER = "5"


def assert_problem(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/problem+json"
    return response.get_json()


# The database connection lost -------------------------------------------------------------


@pytest.fixture
def lose_connection():
    """End a DBAPI connection as its database loses one: PostgreSQL's backend terminated
    (and gone before this returns), SQLite's connection closed under the registry."""
    if not TEST_DATABASE_URL:
        yield lambda dbapi_connection: dbapi_connection.close()
        return
    server = sa.create_engine(TEST_DATABASE_URL, poolclass=sa.pool.NullPool)

    def terminate_backend(dbapi_connection):
        with server.connect() as connection:
            terminate = sa.text("SELECT pg_terminate_backend(:pid, 5000)")
            assert connection.execute(terminate, {"pid": dbapi_connection.info.backend_pid}).scalar()

    yield terminate_backend
    server.dispose()


def lose_at_first(app, event, lose_connection, statement_start=""):
    """Lose the connection of the app's first `event` (an engine event: "rollback", or
    "before_cursor_execute" of a statement starting so); the connections lost are listed."""
    lost = []

    def listener(connection, *event_arguments):
        statement = event_arguments[1] if event_arguments else ""
        if not lost and statement.startswith(statement_start):
            lost.append(connection)
            lose_connection(connection.connection.dbapi_connection)

    with app.app_context():
        sa.event.listen(db.engine, event, listener)
    return lost


def test_a_connection_lost_as_a_request_ends_keeps_the_answer_and_logs_the_request_id(
    app, reader, lose_connection, caplog
):
    lost = lose_at_first(app, "rollback", lose_connection)
    caplog.handler.addFilter(RequestFields())
    with caplog.at_level(logging.WARNING):
        answer = reader.get("/api/v1/configurations/system", headers={"X-Request-ID": "lost-at-the-end"})
    assert lost, "the request ended its transaction"
    assert answer.status_code == 200, answer.get_data(as_text=True)
    [line] = [record for record in caplog.records if "connection was lost" in record.getMessage()]
    assert line.request_id == "lost-at-the-end"
    assert reader.get("/api/v1/configurations/system").status_code == 200


def test_a_connection_lost_before_a_write_is_a_503_with_retry_after_and_nothing_written(app, admin, lose_connection):
    lost = lose_at_first(app, "before_cursor_execute", lose_connection, "INSERT INTO model_providers")
    refused = admin.post(PROVIDERS, json=provider_body())
    assert lost
    assert assert_problem(refused, 503)["detail"] == "The database is not available; try again shortly."
    assert refused.headers["Retry-After"] == DATABASE_RETRY_AFTER
    assert admin.get(PROVIDERS).get_json()["total_count"] == 0
    assert admin.post(PROVIDERS, json=provider_body()).status_code == 201


def test_the_database_gone_is_a_503_with_retry_after_on_the_api_the_gateway_and_readyz(
    app, admin, databases, instance_path
):
    with app.app_context():
        db.engine.dispose()
    databases.destroy(instance_path)
    api = admin.get(PROVIDERS)
    assert_problem(api, 503)
    gateway = admin.post("/api/v1/openai/chat/completions", json={"model": "openai:gpt-4o", "messages": []})
    assert gateway.status_code == 503 and gateway.get_json()["error"]["type"] == "api_error"
    readiness = app.test_client().get("/readyz")
    assert_problem(readiness, 503)
    for answer in (api, gateway, readiness):
        assert answer.headers["Retry-After"] == DATABASE_RETRY_AFTER


# The database's disk full -------------------------------------------------------------------

UNLIMITED_PAGES = 1 << 30


class SqlitePageLimit:
    """A full disk for SQLite: every connection the registry takes from its pool may not
    grow the database past the pages it has when `fill` is called (PRAGMA max_page_count,
    a setting of each connection), until `free`."""

    def __init__(self, app):
        with app.app_context():
            self.engine = db.engine
        self.pages = UNLIMITED_PAGES
        sa.event.listen(self.engine, "checkout", self.limit)

    def limit(self, dbapi_connection, connection_record, connection_proxy):
        dbapi_connection.execute(f"PRAGMA max_page_count = {self.pages}")

    def fill(self):
        with self.engine.connect() as connection:
            self.pages = connection.exec_driver_sql("PRAGMA page_count").scalar()

    def free(self):
        self.pages = UNLIMITED_PAGES


DISK_FULL_TRIGGER = """
CREATE FUNCTION no_space_left() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
END $$;
CREATE TRIGGER no_space_left BEFORE INSERT OR UPDATE ON model_providers
  FOR EACH ROW EXECUTE FUNCTION no_space_left();
"""


class PostgresDiskFull:
    """A full disk for PostgreSQL: its providers' table answers what PostgreSQL answers a
    write that needs space it cannot get (SQLSTATE 53100, disk_full), until `free`."""

    def __init__(self, instance_path):
        self.database = sa.create_engine(database_url(instance_path), poolclass=sa.pool.NullPool)

    def fill(self):
        with self.database.begin() as connection:
            connection.exec_driver_sql(DISK_FULL_TRIGGER)

    def free(self):
        with self.database.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER no_space_left ON model_providers")

    def close(self):
        self.database.dispose()


@pytest.fixture
def full_disk(app, instance_path):
    if not TEST_DATABASE_URL:
        yield SqlitePageLimit(app)
        return
    disk = PostgresDiskFull(instance_path)
    yield disk
    disk.close()


def create_until_refused(admin, most=200):
    """(the ids created, the first refusal): creates until one is refused."""
    created = []
    for number in range(most):
        answer = admin.post(PROVIDERS, json=provider_body(base_url=f"https://full-{number}.example/v1"))
        if answer.status_code != 201:
            return created, answer
        created.append(answer.get_json()["id"])
    raise AssertionError(f"{most} creates, none refused")


def test_a_full_disk_is_a_507_while_reads_go_on_and_writes_resume_once_space_is_freed(app, admin, reader, full_disk):
    full_disk.fill()
    created, refused = create_until_refused(admin)
    assert assert_problem(refused, 507)["detail"] == "The database's disk is full; nothing was written."
    listed = reader.get(PROVIDERS).get_json()
    assert listed["total_count"] == len(created)
    assert [provider["id"] for provider in listed["items"]] == created[::-1]
    assert reader.get("/api/v1/openai/models").status_code == 200
    assert admin.get("/api/v1/audit", query_string={"action": "provider.create"}).get_json()["total_count"] == len(
        created
    )

    full_disk.free()
    again = admin.post(PROVIDERS, json=provider_body(base_url=f"https://full-{len(created)}.example/v1"))
    assert again.status_code == 201, again.get_data(as_text=True)
