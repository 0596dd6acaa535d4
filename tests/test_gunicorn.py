"""The registry under gunicorn with its own configuration, over a real socket."""

import json

import httpx
import pytest

from tests.conftest import Gunicorn, provider_body, wait_for

SECRET = "sk-over-the-socket-7777"


def test_create_list_get_patch_delete_over_a_socket(start_gunicorn):
    server = start_gunicorn(workers=2)
    with server.client("admin") as admin:
        created = admin.post("/api/v1/model_providers", json=provider_body(api_key=SECRET))
        assert created.status_code == 201, created.text
        provider = created.json()
        assert created.headers["Location"].endswith(provider["id"])

        listed = admin.get("/api/v1/model_providers").json()
        assert [item["id"] for item in listed["items"]] == [provider["id"]]
        assert admin.get(f"/api/v1/model_providers/{provider['id']}").json() == provider

        patched = admin.patch(f"/api/v1/model_providers/{provider['id']}", json={"name": "Renamed"})
        assert patched.status_code == 200 and patched.json()["name"] == "Renamed"

        assert admin.delete(f"/api/v1/model_providers/{provider['id']}").status_code == 204
        assert admin.get(f"/api/v1/model_providers/{provider['id']}").status_code == 404
    with server.client("reader") as reader:
        assert reader.post("/api/v1/model_providers", json=provider_body()).status_code == 403
    server.kill()
    log = server.log()
    assert '"POST /api/v1/model_providers" 201' in log
    assert SECRET not in log
    assert "Basic " not in log


def healthz_access_lines(server):
    """The server's access lines of GET /healthz (LOG_FORMAT=json), each naming its worker's pid."""
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "gunicorn.access" and line.get("path") == "/healthz"]


def test_a_second_server_on_a_taken_address_exits_naming_it(start_gunicorn):
    first = start_gunicorn(workers=2, LOG_FORMAT="json")
    second = start_gunicorn(workers=2, port=first.port, wait=False)
    assert second.process.wait(timeout=30) != 0
    assert f"cannot listen on 127.0.0.1:{first.port}" in second.log()
    assert f"the registry listens at http://127.0.0.1:{first.port}" in first.log()
    # Every connection still reaches the first server (its log shows each request), spread
    # over both its workers (each worker's SO_REUSEPORT socket gets some).
    with httpx.Client(base_url=first.base_url, limits=httpx.Limits(max_keepalive_connections=0)) as new_connections:
        for _ in range(40):
            assert new_connections.get("/healthz").status_code == 200
    assert wait_for(lambda: len(healthz_access_lines(first)) == 40)
    serving_pids = {line["process"] for line in healthz_access_lines(first)}
    assert serving_pids == set(first.worker_pids())


@pytest.mark.server  # starts gunicorn itself, on a folder of its own
def test_make_run_on_an_empty_database_creates_one_admin_with_a_generated_password(make_instance):
    instance = make_instance("fresh", migrated=False)
    server = Gunicorn(instance, workers=2, migrate_first=True)
    try:
        password_file = instance / "admin-password"
        password = password_file.read_text().strip()
        with httpx.Client(base_url=server.base_url, auth=("admin", password)) as admin:
            assert admin.get("/api/v1/model_providers").status_code == 200
    finally:
        server.kill()
    log = server.log()
    assert log.count(f"its generated password is in {password_file}") == 1
    assert password not in log
