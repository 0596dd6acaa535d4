"""Concurrent writers against gunicorn with several workers: SQLite must serialize them cleanly."""

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import provider_body

PROVIDERS = "/api/v1/model_providers"
WORKERS = 4


def run_together(server, requests):
    """Send every (method, path, json) at once, each on its own connection; the responses in order."""
    start = threading.Barrier(len(requests))

    def send(request):
        method, path, body = request
        with server.client("admin") as admin:
            start.wait()
            return admin.request(method, path, json=body)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, requests))


def assert_no_server_trouble(server, responses):
    assert all(response.status_code < 500 for response in responses), Counter(r.status_code for r in responses)
    assert not any("locked" in response.text for response in responses)
    log = server.log()
    assert "database is locked" not in log
    assert "Traceback" not in log


@pytest.fixture
def server(start_gunicorn):
    return start_gunicorn(workers=WORKERS)


def test_simultaneous_creates_of_one_base_url_give_one_201_and_409s(server):
    body = provider_body(base_url="https://race.example.com/v1")
    responses = run_together(server, [("POST", PROVIDERS, body)] * 40)
    assert_no_server_trouble(server, responses)
    assert Counter(response.status_code for response in responses) == {201: 1, 409: 39}
    winner = next(response.json()["id"] for response in responses if response.status_code == 201)
    assert all(winner in response.json()["detail"] for response in responses if response.status_code == 409)
    with server.client("reader") as reader:
        assert [item["id"] for item in reader.get(PROVIDERS).json()["items"]] == [winner]


def test_hundreds_of_simultaneous_distinct_creates_are_all_201_and_listed(server):
    bodies = [provider_body(base_url=f"https://p{number}.example.com/v1") for number in range(200)]
    responses = run_together(server, [("POST", PROVIDERS, body) for body in bodies])
    assert_no_server_trouble(server, responses)
    assert [response.status_code for response in responses] == [201] * len(bodies)
    with server.client("reader") as reader:
        listed = reader.get(PROVIDERS, params={"limit": 1000}).json()
    assert listed["total_count"] == len(bodies)
    assert {item["id"] for item in listed["items"]} == {response.json()["id"] for response in responses}


def test_concurrent_patches_and_deletes_of_one_provider_end_consistent(server):
    with server.client("admin") as admin:
        provider_id = admin.post(PROVIDERS, json=provider_body()).json()["id"]
    path = f"{PROVIDERS}/{provider_id}"
    patches = [("PATCH", path, {"name": f"name {number}", "api_key": f"sk-{number}"}) for number in range(30)]
    deletes = [("DELETE", path, None)] * 10
    responses = run_together(server, patches + deletes)
    assert_no_server_trouble(server, responses)
    patch_statuses = Counter(response.status_code for response in responses[: len(patches)])
    delete_statuses = Counter(response.status_code for response in responses[len(patches) :])
    assert set(patch_statuses) <= {200, 404, 409}  # 409: another patch was stored since this one read it
    assert delete_statuses == {204: 1, 404: len(deletes) - 1}
    with server.client("reader") as reader:
        assert reader.get(path).status_code == 404
        assert reader.get(PROVIDERS).json()["total_count"] == 0


def test_concurrent_patches_to_one_base_url_give_one_200(server):
    with server.client("admin") as admin:
        ids = [
            admin.post(PROVIDERS, json=provider_body(base_url=f"https://{n}.example.com")).json()["id"] for n in "ab"
        ]
    wanted = "https://wanted.example.com/v1"
    patches = [("PATCH", f"{PROVIDERS}/{provider_id}", {"base_url": wanted}) for provider_id in ids * 10]
    responses = run_together(server, patches)
    assert_no_server_trouble(server, responses)
    winners = {response.json()["id"] for response in responses if response.status_code == 200}
    assert len(winners) == 1
    assert {response.status_code for response in responses} <= {200, 409}
    with server.client("reader") as reader:
        owners = [item["id"] for item in reader.get(PROVIDERS).json()["items"] if item["base_url"] == wanted]
    assert owners == list(winners)
