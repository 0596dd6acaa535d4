"""ETags, If-Match, and patches that race: a provider is changed only as it was read."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import client_as, provider_body
from tests.fakes import Rendezvous

PROVIDERS = "/api/v1/model_providers"
OLD_KEY, NEW_KEY = "sk-old-key-5150", "sk-new-key-6160"


@pytest.fixture
def provider(admin):
    response = admin.post(PROVIDERS, json=provider_body(name="first"))
    assert response.status_code == 201
    return response.get_json()


def path_of(provider):
    return f"{PROVIDERS}/{provider['id']}"


def test_every_answer_showing_one_provider_carries_its_etag(admin, reader, fake_upstream):
    upstream = fake_upstream()
    created = admin.post(PROVIDERS, json=provider_body(base_url=upstream.base_url, api_key=upstream.api_key))
    path = path_of(created.get_json())
    answers = [
        created,
        reader.get(path),
        admin.patch(path, json={"name": "renamed"}),
        admin.post(f"{path}/check"),
    ]
    assert [answer.status_code for answer in answers] == [201, 200, 200, 200]
    for answer in answers:
        assert answer.headers["ETag"].startswith('"') and answer.headers["ETag"].endswith('"')
    assert "ETag" not in reader.get(PROVIDERS).headers  # a list shows many


def test_the_etag_changes_exactly_when_what_is_shown_changes(admin, reader, provider, fake_upstream):
    path = path_of(provider)
    upstream = fake_upstream()
    steps = [
        lambda: reader.get(path),
        lambda: admin.patch(path, json={}),
        lambda: admin.patch(path, json={"name": "second"}),
        lambda: reader.get(path),
        lambda: admin.patch(path, json={"base_url": upstream.base_url, "api_key": upstream.api_key}),
        lambda: admin.post(f"{path}/check"),  # a probe: last_checked_at
        lambda: reader.get(path),
        lambda: admin.post(f"{path}/check"),
        lambda: admin.patch(path, json={"name": "first"}),  # a name seen before, but a new edit
    ]
    shown = []
    for step in steps:
        answer = step()
        assert answer.status_code == 200, answer.get_json()
        shown.append((answer.get_json(), answer.headers["ETag"]))
    for body, etag in shown:
        for other_body, other_etag in shown:
            assert (body == other_body) == (etag == other_etag), (body, other_body)
    assert len({etag for _, etag in shown}) == 6


def test_patch_and_delete_with_the_current_etag_or_a_star_apply(admin, provider):
    path = path_of(provider)
    etag = admin.get(path).headers["ETag"]
    patched = admin.patch(path, json={"name": "second"}, headers={"If-Match": etag})
    assert patched.status_code == 200
    listed = admin.patch(path, json={"name": "third"}, headers={"If-Match": f'"stale", {patched.headers["ETag"]}'})
    assert listed.status_code == 200
    assert admin.patch(path, json={"name": "fourth"}, headers={"If-Match": "*"}).status_code == 200
    assert admin.delete(path, headers={"If-Match": admin.get(path).headers["ETag"]}).status_code == 204
    assert admin.delete(path, headers={"If-Match": "*"}).status_code == 404


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_a_stale_or_weak_etag_is_412_and_changes_nothing(admin, provider, method):
    path = path_of(provider)
    stale = admin.get(path).headers["ETag"]
    admin.patch(path, json={"name": "changed meanwhile"})
    before = admin.get(path)
    for if_match in (stale, f"W/{before.headers['ETag']}", '"not-an-etag"', ""):
        answer = admin.open(path, method=method, json={"name": "lost update"}, headers={"If-Match": if_match})
        assert answer.status_code == 412, if_match
        assert answer.content_type == "application/problem+json"
        assert answer.get_json()["status"] == 412 and provider["id"] in answer.get_json()["detail"]
    after = admin.get(path)
    assert (after.get_json(), after.headers["ETag"]) == (before.get_json(), before.headers["ETag"])


def wait_for(condition, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_probe_of_a_provider_edited_meanwhile_stores_nothing(app, admin, fake_upstream):
    """The probe listed the old base_url and key: its outcome says nothing of the stored pair."""
    upstream = fake_upstream()
    created = admin.post(PROVIDERS, json=provider_body(base_url=upstream.base_url, api_key=upstream.api_key))
    path = path_of(created.get_json())
    upstream.rendezvous = Rendezvous(2, timeout=20)  # holds the probe until this test meets it
    with ThreadPoolExecutor(max_workers=1) as pool:
        checking = pool.submit(client_as(app, "admin").post, f"{path}/check")
        wait_for(lambda: upstream.hits == 1)
        assert admin.patch(path, json={"name": "edited meanwhile"}).status_code == 200
        assert upstream.rendezvous.meet()
        checked = checking.result()
    assert checked.status_code == 200
    assert (checked.get_json()["name"], checked.get_json()["last_checked_at"]) == ("edited meanwhile", None)
    assert checked.headers["ETag"] == admin.get(path).headers["ETag"]


def racing_patches(send, path, upstreams):
    """A key change and a base_url change of one provider at once; each one's verification waits
    at its upstream until the other's is in flight too, so both read the provider first."""
    rendezvous = Rendezvous(2, timeout=20)
    for upstream in upstreams:
        upstream.rendezvous = rendezvous
    with ThreadPoolExecutor(max_workers=2) as pool:
        key_change = pool.submit(send, path, {"api_key": NEW_KEY})
        url_change = pool.submit(send, path, {"base_url": upstreams[1].base_url})
        answers = [key_change.result(), url_change.result()]
    for upstream in upstreams:
        upstream.rendezvous = None
    return answers


@pytest.fixture
def two_upstreams(fake_upstream):
    """The provider's upstream takes only the new key; the other upstream only the old one."""
    return fake_upstream(api_key=NEW_KEY), fake_upstream(api_key=OLD_KEY)


def create_unverified(client, upstream):
    body = provider_body(base_url=upstream.base_url, api_key=OLD_KEY)
    response = client.post(PROVIDERS, json=body, params={"verify": "false"})
    assert response.status_code == 201
    return response.json()


def assert_one_wins_and_a_verified_pair_is_stored(statuses, details, checked):
    """Stored together, the new key and the new base_url would be a pair nobody verified (the
    other upstream refuses the new key): one patch is stored, the other is a 409."""
    assert sorted(statuses) == [200, 409]
    assert any("changed by another request meanwhile" in detail for detail in details)
    assert checked["last_error"] is None, checked["last_error"]  # the stored pair works


def test_two_racing_patches_store_one_verified_pair(make_app, two_upstreams):
    app = make_app(REGISTRY_VERIFY_ON_CREATE="true")
    admin = client_as(app, "admin")
    created = admin.post(
        PROVIDERS, json=provider_body(base_url=two_upstreams[0].base_url, api_key=OLD_KEY), query_string={"verify": 0}
    ).get_json()

    def send(path, changes):
        return client_as(app, "admin").patch(path, json=changes)

    answers = racing_patches(send, path_of(created), two_upstreams)
    checked = admin.post(f"{path_of(created)}/check").get_json()
    details = [answer.get_json().get("detail", "") for answer in answers]
    assert_one_wins_and_a_verified_pair_is_stored([answer.status_code for answer in answers], details, checked)


def test_two_racing_patches_over_gunicorn_store_one_verified_pair(start_gunicorn, two_upstreams):
    server = start_gunicorn(workers=2, REGISTRY_VERIFY_ON_CREATE="true")
    with server.client("admin") as admin:
        created = create_unverified(admin, two_upstreams[0])

    def send(path, changes):
        with server.client("admin") as client:
            return client.patch(path, json=changes)

    answers = racing_patches(send, path_of(created), two_upstreams)
    with server.client("admin") as admin:
        checked = admin.post(f"{path_of(created)}/check").json()
    details = [answer.json().get("detail", "") for answer in answers]
    assert_one_wins_and_a_verified_pair_is_stored([answer.status_code for answer in answers], details, checked)
    assert "Traceback" not in server.log()
