"""The health prober keeps `state` true; under gunicorn it runs once per database."""

import gc
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from jobs.prober import probe_all
from models import db
from tests.conftest import SQLITE_ONLY, client_as, provider_body, wait_for

PROVIDERS = "/api/v1/model_providers"


def register(client, upstream):
    body = provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
    return client.post(PROVIDERS, json=body).get_json()


def probe_round(app):
    with app.app_context():
        probe_all(app)


@pytest.fixture
def prober_app(make_app):
    return make_app(REGISTRY_PROBE_FAILURES="2", REGISTRY_UPSTREAM_TIMEOUT="1")


def test_failures_in_a_row_turn_a_provider_offline_and_one_success_back_online(prober_app, fake_upstream):
    admin = client_as(prober_app, "admin")
    upstream = fake_upstream()
    provider = register(admin, upstream)
    path = f"{PROVIDERS}/{provider['id']}"

    probe_round(prober_app)
    probed = admin.get(path).get_json()
    assert probed["state"] == "online" and probed["last_error"] is None and probed["last_checked_at"]

    upstream.down()
    probe_round(prober_app)
    once = admin.get(path).get_json()
    assert once["state"] == "online"
    assert "could not connect" in once["last_error"]
    probe_round(prober_app)
    twice = admin.get(path).get_json()
    assert twice["state"] == "offline"
    assert twice["updated_at"] == provider["updated_at"]  # a probe is not an edit
    assert admin.get(f"{PROVIDERS}?state=offline").get_json()["total_count"] == 1

    upstream.up()
    probe_round(prober_app)
    back = admin.get(path).get_json()
    assert back["state"] == "online" and back["last_error"] is None


def test_check_probes_at_once(prober_app, fake_upstream):
    admin = client_as(prober_app, "admin")
    upstream = fake_upstream()
    provider = register(admin, upstream)
    upstream.down()
    for expected_state in ("online", "offline"):
        response = admin.post(f"{PROVIDERS}/{provider['id']}/check")
        assert response.status_code == 200
        assert response.get_json()["state"] == expected_state
    upstream.up()
    assert admin.post(f"{PROVIDERS}/{provider['id']}/check").get_json()["state"] == "online"


def test_a_round_stores_each_listing_as_the_upstream_sent_it(prober_app, fake_upstream):
    # A batch reaches the database as JSON: ids that look like numbers or JSON stay text.
    upstream_ids = ["0123", 'say "hi"', "back\\slash", "éè-模型", "null", "gpt-4o"]
    admin = client_as(prober_app, "admin")
    openai = register(admin, fake_upstream(models=upstream_ids))
    claude = fake_upstream(flavor="anthropic", models=["claude-sonnet-4"])
    anthropic = admin.post(
        PROVIDERS, json=provider_body(type="anthropic", base_url=claude.base_url, api_key=claude.api_key)
    ).get_json()

    probe_round(prober_app)
    listed = admin.get(f"{PROVIDERS}/{openai['id']}/models").get_json()["items"]
    assert [model["id"] for model in listed] == [f"openai:{upstream_id}" for upstream_id in upstream_ids]
    assert {(model["created"], model["owned_by"], model["display_name"]) for model in listed} == {
        (1700000000, "fake", None)
    }
    [sonnet] = admin.get(f"{PROVIDERS}/{anthropic['id']}/models").get_json()["items"]
    assert (sonnet["display_name"], sonnet["created"]) == ("Claude-Sonnet-4", 1739923200)  # 2025-02-19


def test_a_round_leaves_garbage_collection_as_it_found_it(prober_app, fake_upstream):
    # The prober pauses the process's garbage collection while it holds the write lock.
    register(client_as(prober_app, "admin"), fake_upstream())
    probe_round(prober_app)
    assert gc.isenabled()
    gc.disable()  # as an embedding application may have
    try:
        probe_round(prober_app)
        assert not gc.isenabled()
    finally:
        gc.enable()


@SQLITE_ONLY
def test_a_round_waiting_for_the_write_lock_leaves_garbage_collection_on(prober_app, fake_upstream, instance_path):
    provider = register(client_as(prober_app, "admin"), fake_upstream())
    gc_on_at_each_try = record_gc_at_each_write_lock_try(prober_app)
    other_writer = sqlite3.connect(instance_path / "registry.db", isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            waiting = pool.submit(probe_round, prober_app)
            assert wait_for(lambda: len(gc_on_at_each_try) >= 3), "the round never waited for the write lock"
            assert not waiting.done()
            assert all(gc_on_at_each_try)
        finally:
            other_writer.rollback()
        waiting.result()
    other_writer.close()
    assert client_as(prober_app, "reader").get(f"{PROVIDERS}/{provider['id']}").get_json()["last_checked_at"]


def record_gc_at_each_write_lock_try(app):
    """gc.isenabled() as each BEGIN IMMEDIATE of the app's connections starts, in the thread
    that runs it: a second one or more means the write lock was busy and the writer waits."""
    gc_on_at_each_try = []

    def note_begin_immediate(statement):
        if statement == "BEGIN IMMEDIATE":
            gc_on_at_each_try.append(gc.isenabled())

    def trace(dbapi_connection, connection_record, connection_proxy):
        dbapi_connection.set_trace_callback(note_begin_immediate)

    with app.app_context():
        sa.event.listen(db.engine, "checkout", trace)
    return gc_on_at_each_try


def test_a_failed_write_turns_garbage_collection_back_on(prober_app, fake_upstream):
    register(client_as(prober_app, "admin"), fake_upstream())
    with prober_app.app_context():
        db.session.execute(sa.text("DROP TABLE provider_models"))
        db.session.commit()
    with pytest.raises(sa.exc.DatabaseError):
        probe_round(prober_app)
    assert gc.isenabled()


def test_check_is_for_admins(prober_app, fake_upstream):
    provider = register(client_as(prober_app, "admin"), fake_upstream())
    assert client_as(prober_app, "reader").post(f"{PROVIDERS}/{provider['id']}/check").status_code == 403
    assert client_as(prober_app, "admin").post(f"{PROVIDERS}/not-an-id/check").status_code == 404


def test_several_workers_probe_about_once_per_interval(start_gunicorn, fake_upstream):
    server = start_gunicorn(workers=3, REGISTRY_PROBE_INTERVAL="1")
    upstreams = [fake_upstream(), fake_upstream()]
    with server.client("admin") as admin:
        for upstream in upstreams:
            assert (
                admin.post(
                    PROVIDERS, json=provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
                ).status_code
                == 201
            )
    assert wait_for(lambda: all(upstream.hits >= 1 for upstream in upstreams))
    start_hits = [upstream.hits for upstream in upstreams]
    time.sleep(5)
    for upstream, before in zip(upstreams, start_hits, strict=True):
        probes = upstream.hits - before
        assert 3 <= probes <= 7, f"{probes} probes in 5 intervals"  # three workers each probing would give ~15


def test_down_upstream_goes_offline_by_the_prober_alone_and_check_brings_it_back(start_gunicorn, fake_upstream):
    server = start_gunicorn(
        workers=2, REGISTRY_PROBE_INTERVAL="0.5", REGISTRY_UPSTREAM_TIMEOUT="1", REGISTRY_VERIFY_ON_CREATE="true"
    )
    upstream = fake_upstream(models=["gpt-4o"])
    with server.client("admin") as admin:
        provider = admin.post(
            PROVIDERS, json=provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
        ).json()
        path = f"{PROVIDERS}/{provider['id']}"
        match_body = {"capability": "llm", "suggested_models": ["gpt-4o"]}
        assert [m["id"] for m in admin.get("/api/v1/openai/models").json()["data"]] == ["openai:gpt-4o"]
        assert admin.post(f"{PROVIDERS}/match", json=match_body).json()["total_count"] == 1

        upstream.down()
        assert wait_for(lambda: admin.get(path).json()["state"] == "offline")
        assert admin.get("/api/v1/openai/models").json()["data"] == []
        assert admin.post(f"{PROVIDERS}/match", json=match_body).json()["items"] == []

        upstream.up()
        assert admin.post(f"{path}/check").json()["state"] == "online"
        assert admin.post(f"{PROVIDERS}/match", json=match_body).json()["total_count"] == 1
    server.kill()
    assert "is now offline" in server.log()


@pytest.mark.slow
def test_an_application_embedding_create_app_starts_the_prober_itself(make_app, fake_upstream):
    app = make_app(REGISTRY_PROBE_INTERVAL="0.5", REGISTRY_UPSTREAM_TIMEOUT="1")
    admin = client_as(app, "admin")
    provider = register(admin, fake_upstream())
    assert admin.get(f"{PROVIDERS}/{provider['id']}").get_json()["last_checked_at"] is None
    app.extensions["scheduler"].start()
    try:
        deadline = time.monotonic() + 20
        while admin.get(f"{PROVIDERS}/{provider['id']}").get_json()["last_checked_at"] is None:
            assert time.monotonic() < deadline, "the prober never ran"
            time.sleep(0.1)
    finally:
        app.extensions["scheduler"].stop()
