"""Verification against the upstream, and model listings per provider type."""

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from models import db
from tests.conftest import client_as, free_port, provider_body

PROVIDERS = "/api/v1/model_providers"
GOOD_KEY = "sk-good-0123456789"
BAD_KEY = "sk-BAD-KEY-SHOULD-NOT-LEAK"


@pytest.fixture
def verifying_admin(make_app):
    return client_as(make_app(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_UPSTREAM_TIMEOUT="1"), "admin")


def create(client, upstream=None, query="", **fields):
    if upstream is not None:
        fields = {"type": upstream.flavor, "base_url": upstream.base_url, **fields}
    return client.post(PROVIDERS + query, json=provider_body(**fields))


def stored_count(client):
    return client.get(PROVIDERS).get_json()["total_count"]


def test_good_key_is_verified_and_stored(verifying_admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY)
    response = create(verifying_admin, upstream, api_key=GOOD_KEY)
    assert response.status_code == 201
    assert upstream.hits == 1


def test_bad_key_is_400_saying_the_key_was_rejected_and_stores_nothing(verifying_admin, fake_upstream, caplog):
    caplog.set_level(logging.DEBUG)
    upstream = fake_upstream(api_key=GOOD_KEY)
    response = create(verifying_admin, upstream, api_key=BAD_KEY)
    assert response.status_code == 400
    assert response.content_type == "application/problem+json"
    detail = response.get_json()["detail"]
    assert "rejected the API key" in detail and "401" in detail
    assert BAD_KEY not in response.get_data(as_text=True)
    assert BAD_KEY not in caplog.text
    assert stored_count(verifying_admin) == 0


def test_unreachable_url_is_400_saying_so_and_stores_nothing(verifying_admin):
    response = create(verifying_admin, base_url=f"http://127.0.0.1:{free_port()}/v1", api_key=GOOD_KEY)
    assert response.status_code == 400
    assert "could not connect" in response.get_json()["detail"]
    assert stored_count(verifying_admin) == 0


def test_slow_upstream_is_400_timeout(verifying_admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY, delay=2)
    response = create(verifying_admin, upstream, api_key=GOOD_KEY)
    assert response.status_code == 400
    assert "timeout" in response.get_json()["detail"]
    assert stored_count(verifying_admin) == 0


@pytest.mark.parametrize(
    "status, body, wording",
    [
        (500, {"error": "forced"}, "HTTP 500"),
        (200, b"<html>hello</html>", "not JSON"),
        (200, {"models": []}, "no model list"),
        # JSON whitespace, refused by its Content-Length before it is read
        (200, b" " * (4 * 1024 * 1024 + 1), "the upstream's answer is over 4 MiB (refused)"),
    ],
)
def test_unexpected_answer_is_400_saying_what_came(verifying_admin, fake_upstream, status, body, wording):
    upstream = fake_upstream(api_key=GOOD_KEY)
    upstream.answer_with(status, body)
    response = create(verifying_admin, upstream, api_key=GOOD_KEY)
    assert response.status_code == 400
    assert wording in response.get_json()["detail"]


def test_verify_false_skips_the_upstream(verifying_admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY)
    assert create(verifying_admin, upstream, query="?verify=false", api_key=BAD_KEY).status_code == 201
    assert upstream.hits == 0


def test_verification_disabled_by_configuration(admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY)
    assert create(admin, upstream, api_key=BAD_KEY).status_code == 201
    assert upstream.hits == 0


def test_patch_of_key_or_url_is_verified_and_refused_unchanged(verifying_admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY)
    provider = create(verifying_admin, upstream, api_key=GOOD_KEY).get_json()
    path = f"{PROVIDERS}/{provider['id']}"
    assert verifying_admin.patch(path, json={"api_key": BAD_KEY}).status_code == 400
    elsewhere = f"http://127.0.0.1:{free_port()}/v1"
    assert verifying_admin.patch(path, json={"base_url": elsewhere}).status_code == 400
    assert verifying_admin.get(path).get_json() == provider
    hits = upstream.hits
    assert verifying_admin.patch(path, json={"name": "renamed"}).status_code == 200
    assert upstream.hits == hits  # a name change needs no upstream call
    assert verifying_admin.patch(path + "?verify=false", json={"api_key": BAD_KEY}).status_code == 200


def pooled_connections_while_verifying(app, upstream, request):
    """How many pooled connections are checked out while `request` waits on the upstream; its answer."""
    upstream.hold()
    with ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(request)
        assert upstream.held.wait(timeout=10), "the upstream was never called"
        with app.app_context():
            checked_out = db.engine.pool.checkedout()
        upstream.release()
        return checked_out, answer.result(timeout=30)


@pytest.mark.parametrize("change", ["create", "patch"])
def test_no_database_connection_is_held_while_verification_waits(change, make_app, fake_upstream):
    app = make_app(REGISTRY_VERIFY_ON_CREATE="true")
    admin = client_as(app, "admin")
    upstream = fake_upstream(api_key=GOOD_KEY)
    if change == "create":
        request = partial(create, admin, upstream, api_key=GOOD_KEY)
    else:
        provider = create(admin, upstream, query="?verify=false", api_key=BAD_KEY).get_json()
        request = partial(admin.patch, f"{PROVIDERS}/{provider['id']}", json={"api_key": GOOD_KEY, "name": "n"})
    checked_out, answer = pooled_connections_while_verifying(app, upstream, request)
    assert checked_out == 0
    assert answer.status_code in (200, 201) and answer.get_json()["name"] == ("n" if change == "patch" else None)
    assert upstream.hits == 1


LISTINGS = [
    ("openai", ["gpt-4o", "text-embedding-3-small"], ["openai:gpt-4o", "openai:text-embedding-3-small"]),
    ("anthropic", ["claude-sonnet-4", "claude-haiku-3-5", "claude-opus-4"], None),
    ("watsonx", ["ibm/granite-3-8b-instruct", "meta-llama/llama-3-70b"], None),
    ("github", ["openai/gpt-4.1", "meta/llama-4"], ["github:openai/gpt-4.1", "github:meta/llama-4"]),
    ("rits", ["ibm-granite/granite-3.3-8b"], ["rits:ibm-granite/granite-3.3-8b"]),
]


@pytest.mark.parametrize("flavor, upstream_models, expected_ids", LISTINGS)
def test_models_listing_per_type(verifying_admin, fake_upstream, flavor, upstream_models, expected_ids):
    upstream = fake_upstream(flavor=flavor, api_key=GOOD_KEY, models=upstream_models)
    extra = {"watsonx_project_id": "p"} if flavor == "watsonx" else {}
    provider = create(verifying_admin, upstream, api_key=GOOD_KEY, **extra).get_json()
    response = verifying_admin.get(f"{PROVIDERS}/{provider['id']}/models")
    assert response.status_code == 200
    page = response.get_json()
    ids = [model["id"] for model in page["items"]]
    assert ids == (expected_ids or [f"{flavor}:{model}" for model in upstream_models])
    assert page["total_count"] == len(ids)
    model = page["items"][0]
    assert model["object"] == "model" and isinstance(model["created"], int)
    assert model["provider"] == {"id": provider["id"], "type": flavor, "capabilities": provider["capabilities"]}


def test_watsonx_leaves_out_withdrawn_models(verifying_admin, fake_upstream):
    upstream = fake_upstream(flavor="watsonx", models=["ibm/granite-3-8b-instruct"])
    provider = create(verifying_admin, upstream, watsonx_space_id="s").get_json()
    ids = [model["id"] for model in verifying_admin.get(f"{PROVIDERS}/{provider['id']}/models").get_json()["items"]]
    assert ids == ["watsonx:ibm/granite-3-8b-instruct"]


def test_anthropic_models_carry_display_name_and_creation_time(verifying_admin, fake_upstream):
    upstream = fake_upstream(flavor="anthropic", api_key=GOOD_KEY, models=["claude-sonnet-4"])
    provider = create(verifying_admin, upstream, api_key=GOOD_KEY).get_json()
    [model] = verifying_admin.get(f"{PROVIDERS}/{provider['id']}/models").get_json()["items"]
    assert model["display_name"] == "Claude-Sonnet-4"
    assert model["created"] == 1739923200


def test_voyage_lists_its_fixed_models(verifying_admin, fake_upstream):
    upstream = fake_upstream(flavor="voyage")
    provider = create(verifying_admin, upstream).get_json()
    ids = [model["id"] for model in verifying_admin.get(f"{PROVIDERS}/{provider['id']}/models").get_json()["items"]]
    assert "voyage:voyage-3.5" in ids
    assert provider["capabilities"] == ["embedding"]


def test_keyless_server_gets_no_authorization_header(verifying_admin, fake_upstream):
    upstream = fake_upstream(api_key="", models=["llama3"])
    response = create(verifying_admin, upstream, type="ollama", api_key="")
    assert response.status_code == 201  # the upstream refuses any Authorization header for an empty key
    models = verifying_admin.get(f"{PROVIDERS}/{response.get_json()['id']}/models").get_json()["items"]
    assert [model["id"] for model in models] == ["ollama:llama3"]


def test_listings_are_read_from_the_index_not_the_upstream(verifying_admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY)
    provider = create(verifying_admin, upstream, api_key=GOOD_KEY).get_json()
    for _ in range(3):
        assert verifying_admin.get(f"{PROVIDERS}/{provider['id']}/models").status_code == 200
    assert upstream.hits == 1  # verification's listing only


def test_failing_upstream_makes_a_refresh_a_502_without_the_key(admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY)
    provider = create(admin, upstream, api_key=BAD_KEY).get_json()
    response = admin.get(f"{PROVIDERS}/{provider['id']}/models?refresh=true")
    assert response.status_code == 502
    assert "rejected the API key" in response.get_json()["detail"]
    assert BAD_KEY not in response.get_data(as_text=True)


@pytest.mark.slow
def test_a_trickling_upstream_fails_at_the_deadline_without_gevent_too(verifying_admin, fake_upstream):
    upstream = fake_upstream(api_key=GOOD_KEY)
    upstream.trickle_interval = 0.2  # each read is quick; the whole answer would take half a minute
    started = time.monotonic()
    response = create(verifying_admin, upstream, api_key=GOOD_KEY)
    assert response.status_code == 400
    assert "did not answer within 1 s (timeout)" in response.get_json()["detail"]
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "created, kept",
    [(1700000000, True), ("2025-02-19T00:00:00Z", True), (None, True), (-1, False), ("tomorrow", False), (True, False)],
)
def test_a_model_entry_with_an_unusable_created_is_left_out(verifying_admin, fake_upstream, created, kept):
    upstream = fake_upstream(api_key=GOOD_KEY)
    upstream.answer_with(
        200, json.dumps({"data": [{"id": "kept-or-not", "created": created}, {"id": "gpt-4o"}]}).encode()
    )
    response = create(verifying_admin, upstream, api_key=GOOD_KEY)
    assert response.status_code == 201
    listed = verifying_admin.get(f"{PROVIDERS}/{response.get_json()['id']}/models").get_json()
    assert ("openai:kept-or-not" in [model["id"] for model in listed["items"]]) is kept
