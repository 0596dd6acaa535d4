"""The model index: the catalog answers from the database, never waiting on an upstream."""

import threading
import time

import pytest
import sqlalchemy as sa

from jobs.prober import probe_all
from models import PROVIDER_MODELS, db
from tests.conftest import client_as, provider_body

PROVIDERS = "/api/v1/model_providers"
TIMEOUT = 1.0


@pytest.fixture
def app(make_app):
    """Creates are verified (filling the index); a provider turns offline after two failed probes."""
    return make_app(
        REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_UPSTREAM_TIMEOUT=str(TIMEOUT), REGISTRY_PROBE_FAILURES="2"
    )


def register(admin, upstream, query="", **fields):
    body = provider_body(type=upstream.flavor, base_url=upstream.base_url, api_key=upstream.api_key, **fields)
    response = admin.post(PROVIDERS + query, json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def probe_round(app):
    with app.app_context():
        probe_all(app)


def model_ids(page):
    return [model["id"] for model in page["items"]]


def provider_models(client, provider, query=""):
    response = client.get(f"{PROVIDERS}/{provider['id']}/models{query}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def openai_ids(client):
    response = client.get("/api/v1/openai/models")
    assert response.status_code == 200
    return sorted(model["id"] for model in response.get_json()["data"])


def matched_ids(client, suggested):
    response = client.post(f"{PROVIDERS}/match", json={"capability": "llm", "suggested_models": suggested})
    assert response.status_code == 200
    return [item["model_id"] for item in response.get_json()["items"]]


def resolve(client, model):
    return client.post(f"{PROVIDERS}/resolve", json={"model": model})


def test_catalog_answers_from_the_index_while_every_upstream_is_down_or_silent(admin, service, fake_upstream):
    down = fake_upstream(models=["gpt-4o"])
    silent = fake_upstream(flavor="anthropic", models=["claude-sonnet-4"])
    down_provider, silent_provider = register(admin, down), register(admin, silent)
    down.down()
    silent.delay = 30  # accepts, and answers only long after every call below
    hits = silent.hits

    assert openai_ids(service) == ["anthropic:claude-sonnet-4", "openai:gpt-4o"]
    assert matched_ids(service, ["gpt-4o"])[0] == "openai:gpt-4o"
    assert resolve(service, "anthropic:claude-sonnet-4").get_json()["provider_id"] == silent_provider["id"]
    assert model_ids(provider_models(service, down_provider)) == ["openai:gpt-4o"]
    assert model_ids(provider_models(service, silent_provider)) == ["anthropic:claude-sonnet-4"]
    assert silent.hits == hits  # the down one would have failed the answers above


def test_a_failed_probe_keeps_the_last_list_and_an_offline_provider_leaves_the_catalog(
    app, admin, service, fake_upstream
):
    upstream = fake_upstream(models=["gpt-4o", "gpt-4o-mini"])
    provider = register(admin, upstream)
    listed = provider_models(service, provider)
    upstream.down()

    probe_round(app)  # one failure: still online, same list
    assert provider_models(service, provider) == listed
    assert openai_ids(service) == ["openai:gpt-4o", "openai:gpt-4o-mini"]

    probe_round(app)  # two: offline, out of the catalog, its own list kept
    assert admin.get(f"{PROVIDERS}/{provider['id']}").get_json()["state"] == "offline"
    assert provider_models(service, provider) == listed
    assert openai_ids(service) == []
    assert matched_ids(service, ["gpt-4o"]) == []
    assert resolve(service, "openai:gpt-4o").status_code == 503


def test_a_probe_stores_what_the_upstream_lists_now(app, admin, reader, fake_upstream):
    upstream = fake_upstream(models=["gpt-4o"])
    provider = register(admin, upstream)
    first_listed_at = provider_models(reader, provider)["listed_at"]
    upstream.models = ["gpt-5", "gpt-4o"]
    probe_round(app)
    page = provider_models(reader, provider)
    assert model_ids(page) == ["openai:gpt-5", "openai:gpt-4o"]  # in the upstream's order
    assert page["listed_at"] > first_listed_at


def test_refresh_lists_the_upstream_now_and_updates_the_index(admin, reader, fake_upstream):
    upstream = fake_upstream(models=["gpt-4o"])
    provider = register(admin, upstream)
    upstream.models = ["gpt-5"]
    assert model_ids(provider_models(reader, provider)) == ["openai:gpt-4o"]
    assert model_ids(provider_models(admin, provider, "?refresh=true")) == ["openai:gpt-5"]
    assert model_ids(provider_models(reader, provider)) == ["openai:gpt-5"]
    assert openai_ids(reader) == ["openai:gpt-5"]


def test_refresh_is_for_admins(admin, reader, fake_upstream):
    upstream = fake_upstream()
    provider = register(admin, upstream)
    hits = upstream.hits
    response = reader.get(f"{PROVIDERS}/{provider['id']}/models?refresh=true")
    assert response.status_code == 403
    assert response.content_type == "application/problem+json"
    assert upstream.hits == hits
    assert admin.get(f"{PROVIDERS}/not-an-id/models?refresh=true").status_code == 404


def test_a_failed_refresh_is_a_502_saying_why_and_keeps_the_list(admin, reader, fake_upstream):
    upstream = fake_upstream(models=["gpt-4o"])
    provider = register(admin, upstream)
    listed = provider_models(reader, provider)
    upstream.fail_with(500)
    response = admin.get(f"{PROVIDERS}/{provider['id']}/models?refresh=true")
    assert response.status_code == 502
    assert "HTTP 500" in response.get_json()["detail"]
    assert provider_models(reader, provider) == listed


def test_an_unverified_provider_has_no_list_until_it_is_probed(app, admin, reader, fake_upstream):
    upstream = fake_upstream(models=["gpt-4o"])
    provider = register(admin, upstream, query="?verify=false")
    assert upstream.hits == 0
    assert provider_models(reader, provider) == {"items": [], "total_count": 0, "listed_at": None}
    assert openai_ids(reader) == []
    assert admin.post(f"{PROVIDERS}/{provider['id']}/check").status_code == 200
    page = provider_models(reader, provider)
    assert model_ids(page) == ["openai:gpt-4o"] and page["listed_at"] is not None


def test_a_changed_connection_replaces_the_list_or_empties_it_when_unverified(admin, reader, fake_upstream):
    old, new = fake_upstream(models=["old-model"]), fake_upstream(models=["new-model"])
    provider = register(admin, old)
    path = f"{PROVIDERS}/{provider['id']}"
    assert admin.patch(path, json={"name": "renamed"}).status_code == 200  # not the connection: list kept
    assert model_ids(provider_models(reader, provider)) == ["openai:old-model"]
    assert admin.patch(path, json={"base_url": new.base_url}).status_code == 200
    assert model_ids(provider_models(reader, provider)) == ["openai:new-model"]
    assert admin.patch(path + "?verify=false", json={"base_url": old.base_url}).status_code == 200
    assert provider_models(reader, provider)["items"] == []


def test_a_patch_resending_the_current_base_url_is_not_a_connection_change(app, admin, reader, fake_upstream):
    upstream = fake_upstream(models=["gpt-4o"])
    provider = register(admin, upstream)
    upstream.down()  # verifying again would fail
    path = f"{PROVIDERS}/{provider['id']}"
    for query in ("", "?verify=false"):
        changed = admin.patch(path + query, json={"base_url": provider["base_url"], "name": f"renamed{query}"})
        assert changed.status_code == 200, changed.get_json()
        assert model_ids(provider_models(reader, provider)) == ["openai:gpt-4o"]  # the list is kept
    events = admin.get("/api/v1/audit", query_string={"action": "provider.update"}).get_json()["items"]
    assert [event["changed_fields"] for event in events] == [["name"], ["name"]]


def test_each_model_id_appears_once_with_its_oldest_online_provider(app, admin, reader, fake_upstream):
    first = register(admin, fake_upstream(models=["gpt-4o", "gpt-4o-mini"]))
    second = register(admin, fake_upstream(models=["gpt-4o"]))
    listed = reader.get("/api/v1/openai/models").get_json()["data"]
    assert [(model["id"], model["provider"]["id"]) for model in listed] == [
        ("openai:gpt-4o", first["id"]),
        ("openai:gpt-4o-mini", first["id"]),
    ]
    assert matched_ids(reader, ["openai:gpt-4o"]).count("openai:gpt-4o") == 1
    with app.app_context():
        db.session.execute(sa.text("UPDATE model_providers SET state = 'offline' WHERE id = :id"), {"id": first["id"]})
        db.session.commit()
    assert [model["provider"]["id"] for model in reader.get("/api/v1/openai/models").get_json()["data"]] == [
        second["id"]
    ]


def test_a_deleted_provider_leaves_the_index(app, admin, reader, fake_upstream):
    provider = register(admin, fake_upstream(models=["gpt-4o"]))
    assert admin.delete(f"{PROVIDERS}/{provider['id']}").status_code == 204
    assert openai_ids(reader) == []
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(PROVIDER_MODELS)) == 0


def create_unverified(admin, base_urls, api_key="sk-test-key"):
    for base_url in base_urls:
        body = provider_body(base_url=base_url, api_key=api_key)
        assert admin.post(f"{PROVIDERS}?verify=false", json=body).status_code == 201


def test_no_connection_is_checked_out_while_probes_are_in_flight(make_app, black_hole):
    app = make_app(REGISTRY_UPSTREAM_TIMEOUT="3", REGISTRY_PROBE_FAILURES="1")
    admin = client_as(app, "admin")
    count = 5
    create_unverified(admin, [black_hole.base_url(f"/p{index}") for index in range(count)])
    prober = threading.Thread(target=probe_round, args=(app,))
    prober.start()
    deadline = time.monotonic() + 3
    while len(black_hole.accepted) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(black_hole.accepted) == count  # every probe is waiting on the silent upstream
    with app.app_context():
        assert db.engine.pool.checkedout() == 0
    black_hole.close()  # the probes fail now, not after the timeout
    prober.join()
    offline = admin.get(f"{PROVIDERS}?state=offline").get_json()
    assert offline["total_count"] == count
    assert all(provider["last_error"] for provider in offline["items"])


def test_check_holds_no_connection_while_it_waits_on_the_upstream(make_app, black_hole):
    app = make_app(REGISTRY_UPSTREAM_TIMEOUT="3")
    admin = client_as(app, "admin")
    create_unverified(admin, [black_hole.base_url()])
    provider_id = admin.get(PROVIDERS).get_json()["items"][0]["id"]
    checks = [
        threading.Thread(target=admin.post, args=(f"{PROVIDERS}/{provider_id}/check",)),
        threading.Thread(target=admin.get, args=(f"{PROVIDERS}/{provider_id}/models?refresh=true",)),
    ]
    for check in checks:
        check.start()
    deadline = time.monotonic() + 3
    while len(black_hole.accepted) < len(checks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(black_hole.accepted) == len(checks)
    with app.app_context():
        assert db.engine.pool.checkedout() == 0
    black_hole.close()  # the checks fail now, not after the timeout
    for check in checks:
        check.join()


@pytest.mark.slow
def test_a_probe_round_over_many_silent_or_refusing_providers_ends_within_twice_the_timeout(
    make_app, black_hole, fake_upstream
):
    timeout = 2.0
    app = make_app(REGISTRY_UPSTREAM_TIMEOUT=str(timeout), REGISTRY_PROBE_FAILURES="1")
    admin = client_as(app, "admin")
    answering = fake_upstream(models=["gpt-4o"])
    refusing = fake_upstream()
    refusing.down()
    create_unverified(admin, [black_hole.base_url(f"/p{index}") for index in range(200)])
    create_unverified(admin, [f"{refusing.base_url}/p{index}" for index in range(50)])
    create_unverified(admin, [answering.base_url], api_key=answering.api_key)
    started = time.monotonic()
    probe_round(app)
    elapsed = time.monotonic() - started
    assert elapsed < 2 * timeout, f"a round took {elapsed:.1f} s"
    assert len(black_hole.accepted) == 200
    assert admin.get(f"{PROVIDERS}?state=offline").get_json()["total_count"] == 250
    assert openai_ids(admin) == ["openai:gpt-4o"]


def test_model_ids_no_database_can_index_are_left_out_and_repeats_kept_once(admin, reader, fake_upstream):
    upstream = fake_upstream(models=["gpt-4o", "bad\x00id", "x" * 1025, "gpt-4o", "ünïcode-model"])
    provider = register(admin, upstream)
    assert model_ids(provider_models(reader, provider)) == ["openai:gpt-4o", "openai:ünïcode-model"]


def in_thread(function, *args):
    """Run `function` in a thread; the returned list receives its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function(*args)))
    thread.start()
    return thread, result


def wait_for_hits(upstream, hits):
    deadline = time.monotonic() + 5
    while upstream.hits < hits and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.hits >= hits


@pytest.fixture
def slow_old_upstream_and_new(admin, fake_upstream):
    """A provider on an upstream that now lists another model, slowly, and a new upstream."""
    old, new = fake_upstream(models=["old-model"]), fake_upstream(models=["new-model"])
    provider = register(admin, old)
    old.models, old.delay = ["stale-model"], 0.5
    return provider, old, new


def test_a_refresh_of_a_provider_changed_meanwhile_is_a_409_and_stores_nothing(
    admin, reader, slow_old_upstream_and_new
):
    provider, old, new = slow_old_upstream_and_new
    path = f"{PROVIDERS}/{provider['id']}"
    refresh, refreshed = in_thread(admin.get, f"{path}/models?refresh=true")
    wait_for_hits(old, 2)  # verification, then the refresh, now waiting on the upstream
    assert admin.patch(path, json={"base_url": new.base_url}).status_code == 200
    refresh.join()
    assert refreshed[0].status_code == 409
    assert model_ids(provider_models(reader, provider)) == ["openai:new-model"]


def test_a_probe_of_a_provider_changed_meanwhile_stores_nothing(app, admin, reader, slow_old_upstream_and_new):
    provider, old, new = slow_old_upstream_and_new
    path = f"{PROVIDERS}/{provider['id']}"
    prober, _ = in_thread(probe_round, app)
    wait_for_hits(old, 2)
    assert admin.patch(path, json={"base_url": new.base_url}).status_code == 200
    prober.join()
    assert model_ids(provider_models(reader, provider)) == ["openai:new-model"]
    assert admin.get(path).get_json()["last_checked_at"] is None
