"""Faults: the database connection lost mid-request, the database gone or its disk full, a
provider that hangs or flaps, a worker killed under streams. Each is answered clearly
(never a 500), and the service recovers without a restart.

The database faults run on SQLite and, with TEST_DATABASE_URL, on PostgreSQL: a connection
is lost the way each loses one (PostgreSQL's backend terminated, SQLite's connection closed
under the registry), and a disk fills the way a test can make it without root (SQLite's
own page limit; on PostgreSQL, a trigger answering the disk_full error a full disk gives).
"""

import collections
import contextlib
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from models import db
from observability.logs import RequestFields
from tests.conftest import POSTGRES_ONLY, TEST_DATABASE_URL, client_as, database_url, provider_body, wait_for
from tests.fakes.model import long_stream_prompt
from tests.fakes.openai import chat_answer
from tests.test_metrics import parse

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


@POSTGRES_ONLY
def test_backends_terminated_under_load_give_no_500_and_every_access_line_its_request_id(instance_path, start_gunicorn):
    server = start_gunicorn(workers=2)
    database = sa.make_url(database_url(instance_path)).database
    postgres = sa.create_engine(TEST_DATABASE_URL, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    # The registry's own backends: an autovacuum worker on the database is a superuser's, which
    # this role may not end.
    terminate_all = sa.text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name AND usename = current_user"
    )
    loading, terminated, statuses = threading.Event(), [], collections.Counter()

    def terminate_every_50_ms():
        with postgres.connect() as connection:
            while loading.is_set():
                terminated.append(connection.execute(terminate_all, {"name": database}).scalar())
                time.sleep(0.05)

    def mixed_load(number):
        with server.client("admin") as admin:
            for round_number in range(30):
                body = provider_body(base_url=f"https://load-{number}-{round_number}.example/v1")
                for answer in (
                    admin.post(PROVIDERS, params={"verify": "false"}, json=body),
                    admin.get(PROVIDERS, params={"limit": 5}),
                    admin.get("/api/v1/configurations/system"),
                ):
                    statuses[answer.status_code] += 1

    loading.set()
    terminator = threading.Thread(target=terminate_every_50_ms)
    terminator.start()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(mixed_load, range(8)))
    loading.clear()
    terminator.join()
    postgres.dispose()
    assert sum(terminated) > 100 and statuses[503] > 0, (sum(terminated), statuses)
    assert set(statuses) <= {200, 201, 503}, statuses
    assert "request_id=-" not in server.log()


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


def test_the_openapi_document_names_the_databases_503_on_every_route_and_507_on_changes(anonymous):
    paths = anonymous.get("/openapi.json").get_json()["paths"]
    listing, create = paths[PROVIDERS]["get"]["responses"], paths[PROVIDERS]["post"]["responses"]
    for responses in (listing, create):
        assert "the database is not available" in responses["503"]["description"]
        assert "Retry-After" in responses["503"]["headers"]
    assert "507" in create and "507" not in listing
    assert "507" not in paths[CHAT_PATH]["post"]["responses"]


# A provider that hangs ---------------------------------------------------------------------

MODEL_KEY = "sk-model-key-faults"
CHAT_PATH = "/api/v1/openai/chat/completions"
CHAT = {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def registry(make_app):
    """The app that registers providers, verified, which fills the model index."""
    return make_app(REGISTRY_VERIFY_ON_CREATE="true")


def register(registry, upstream):
    body = provider_body(type="openai", base_url=upstream.base_url, api_key=upstream.api_key)
    created = client_as(registry, "admin").post(PROVIDERS, json=body)
    assert created.status_code == 201, created.get_data(as_text=True)
    return created.get_json()["id"]


def two_providers(registry, fake_upstream):
    """(first, second, {provider: id}): two providers of the same model, the first older."""
    first, second = fake_upstream(api_key=MODEL_KEY), fake_upstream(api_key=MODEL_KEY)
    return first, second, {first: register(registry, first), second: register(registry, second)}


def call_model(app, **fields):
    return client_as(app, "service").post(CHAT_PATH, json={**CHAT, **fields})


def served_by(answer):
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.headers["X-Registry-Provider-Id"]


def hang(seconds):
    """A script that takes the call and answers nothing for `seconds`."""
    return lambda handler, body: time.sleep(seconds)


def stream_after(seconds):
    """A script that sends a stream's status and headers at once and its events `seconds` later."""

    def script(handler, body):
        handler.start_stream()
        time.sleep(seconds)
        identity = {"id": "chatcmpl-late", "created": 1, "model": body["model"]}
        handler.send_events(handler.chat_events(chat_answer(handler.upstream, body), body, identity), 0)

    return script


# An attempt's second is enough for a loaded machine to connect and send the call.
HANGING_APP = {"REGISTRY_GATEWAY_TIMEOUT": "5", "REGISTRY_GATEWAY_ATTEMPT_TIMEOUT": "1"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_provider_that_does_not_start_its_answer_in_time_hands_the_call_to_the_next(
    registry, make_app, fake_upstream, stream
):
    first, second, ids = two_providers(registry, fake_upstream)
    first.script = hang(4) if not stream else stream_after(4)
    app = make_app(**HANGING_APP)
    answer = call_model(app, stream=stream)
    assert served_by(answer) == ids[second]
    assert len(first.calls) == 1 and len(second.calls) == 1


def test_an_answer_whose_headers_came_in_time_may_take_the_rest_of_the_deadline(registry, make_app, fake_upstream):
    first, second, ids = two_providers(registry, fake_upstream)
    completion = {"id": "c", "object": "chat.completion", "created": 1, "choices": [{"index": 0, "message": {}}]}
    first.script = lambda handler, body: handler.trickle(json.dumps(completion).encode(), 20, 0.1)  # about 0.5 s
    app = make_app(**HANGING_APP)
    assert served_by(call_model(app)) == ids[first]
    assert second.calls == []


def test_no_provider_starting_its_answer_in_time_is_a_504_naming_the_attempt_timeout(registry, make_app, fake_upstream):
    first, second, ids = two_providers(registry, fake_upstream)
    first.script = second.script = hang(4)
    answer = call_model(make_app(**HANGING_APP))
    assert answer.status_code == 504
    message = answer.get_json()["error"]["message"]
    assert message.startswith("No provider of the model started its answer in time")
    assert f"provider {ids[second]} did not start its answer within 1 s" in message


# A provider that flaps ----------------------------------------------------------------------


def test_a_provider_that_failed_a_call_is_tried_after_the_others_during_its_cooldown(registry, make_app, fake_upstream):
    first, second, ids = two_providers(registry, fake_upstream)
    app = make_app(REGISTRY_GATEWAY_COOLDOWN="30")
    first.fail_with(503)
    assert served_by(call_model(app)) == ids[second]
    first.failure = None  # up again, but within its cooldown
    assert [served_by(call_model(app)) for _ in range(3)] == [ids[second]] * 3
    assert len(first.calls) == 1

    second.fail_with(500)  # a provider in its cooldown is still tried, after the others
    assert served_by(call_model(app)) == ids[first]
    second.failure = None
    assert served_by(call_model(app)) == ids[first]  # now the second cools
    assert len(second.calls) == 5


def test_a_cooldown_ends_after_its_seconds(registry, make_app, fake_upstream):
    first, second, ids = two_providers(registry, fake_upstream)
    app = make_app(REGISTRY_GATEWAY_COOLDOWN="0.2")
    first.fail_with(500)
    assert served_by(call_model(app)) == ids[second]
    first.failure = None
    time.sleep(0.3)
    assert served_by(call_model(app)) == ids[first]


def test_a_retry_after_longer_than_the_cooldown_wins(registry, make_app, fake_upstream):
    first, second, ids = two_providers(registry, fake_upstream)
    app = make_app(REGISTRY_GATEWAY_COOLDOWN="0.1")
    first.fail_with(429, "slow down", headers={"Retry-After": "30"})
    assert served_by(call_model(app)) == ids[second]
    first.failure = None
    time.sleep(0.2)
    assert served_by(call_model(app)) == ids[second]
    assert len(first.calls) == 1


# Calls cut off by a worker's death ------------------------------------------------------------

STARTED = "registry_gateway_requests_started_total"
FINISHED = "registry_gateway_requests_total"
GPT_4O = {"type": "openai", "model": "openai:gpt-4o"}


def counted(samples, name, **labels):
    """The sum of the samples of `name` with these labels (and any others)."""
    wanted = set(labels.items())
    return sum(
        value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= sample_labels
    )


def started_and_finished(metrics_text):
    samples = parse(metrics_text)
    return counted(samples, STARTED, **GPT_4O), counted(samples, FINISHED, **GPT_4O)


def test_a_call_is_counted_as_it_starts_and_again_as_it_finishes(registry, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    metrics = registry.test_client()
    started, finished = started_and_finished(metrics.get("/metrics").text)
    stream = client_as(registry, "service").post(CHAT_PATH, json={**CHAT, "stream": True}, buffered=False)
    assert next(iter(stream.response)).startswith(b"data: ")
    assert started_and_finished(metrics.get("/metrics").text) == (started + 1, finished)
    stream.close()
    assert started_and_finished(metrics.get("/metrics").text) == (started + 1, finished + 1)


LONG_STREAM = [{"role": "user", "content": long_stream_prompt(100, 0.5)}]


def test_streams_cut_off_by_a_killed_worker_show_as_started_and_never_finished(registry, fake_upstream, start_gunicorn):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    server = start_gunicorn(workers=1)
    [worker] = server.worker_pids()
    with server.client("service") as caller, contextlib.ExitStack() as streams:
        for _ in range(3):
            stream = streams.enter_context(
                caller.stream("POST", CHAT_PATH, json={**CHAT, "stream": True, "messages": LONG_STREAM})
            )
            assert next(stream.iter_lines()).startswith("data: ")
        os.kill(worker, signal.SIGKILL)
        assert wait_for(lambda: server.worker_pids() not in ([], [worker]))
    server.wait_until_ready()
    started, finished = started_and_finished(httpx.get(f"{server.base_url}/metrics").text)
    assert (started, finished) == (3, 0)
