"""Several registry instances, each on its own "machine" (instance folder), on one
PostgreSQL database, as behind a load balancer."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa

from app import schema_head
from tests.conftest import PASSWORDS, SHARED_ENCRYPTION_KEY, TEST_DATABASE_URL, database_url, provider_body

pytestmark = pytest.mark.skipif(
    not TEST_DATABASE_URL,
    reason="needs TEST_DATABASE_URL: instances share a PostgreSQL database (SQLite serves one machine)",
)

PROVIDERS = "/api/v1/model_providers"


def test_provider_created_on_one_instance_is_read_patched_and_deleted_on_the_other(instance_path, start_instances):
    first, second = start_instances(2, database_url(instance_path))
    with first.client("admin") as on_first, second.client("admin") as on_second:
        created = on_first.post(PROVIDERS, json=provider_body()).json()
        path = f"{PROVIDERS}/{created['id']}"
        assert on_second.get(path).json() == created

        patched = on_second.patch(path, json={"name": "Patched on the second"})
        assert patched.status_code == 200
        assert on_first.get(path).json() == patched.json()
        assert on_first.get(PROVIDERS).json()["items"] == [patched.json()]

        assert on_second.delete(path).status_code == 204
        assert on_first.get(path).status_code == 404


def test_simultaneous_creates_of_one_base_url_across_instances_give_one_201(instance_path, start_instances):
    servers = start_instances(2, database_url(instance_path))
    spellings = ["https://api.example.com/v1", "HTTPS://API.Example.com:443/v1/", "https://api.example.com/v1//"]
    attempts = 16
    start_together = threading.Barrier(attempts)

    def create(attempt):
        with servers[attempt % 2].client("admin") as admin:
            body = provider_body(base_url=spellings[attempt % len(spellings)])
            start_together.wait()
            return admin.post(PROVIDERS, json=body).status_code

    with ThreadPoolExecutor(max_workers=attempts) as pool:
        statuses = list(pool.map(create, range(attempts)))
    assert sorted(statuses) == [201] + [409] * (attempts - 1)
    for server in servers:
        with server.client("reader") as reader:
            assert reader.get(PROVIDERS).json()["total_count"] == 1


def test_instances_started_at_once_on_an_empty_database_migrate_it_once_and_all_serve(make_instance, start_instances):
    empty_database = database_url(make_instance("empty", migrated=False))
    servers = start_instances(
        3,
        empty_database,
        migrate_first=True,
        REGISTRY_ADMIN_USERNAME="admin",
        REGISTRY_ADMIN_PASSWORD=PASSWORDS["admin"],
    )
    migrating_servers = [server for server in servers if "Running upgrade" in server.log()]
    assert len(migrating_servers) == 1
    for server in servers:
        with server.client("admin") as admin:
            assert admin.get(PROVIDERS).status_code == 200
    engine = sa.create_engine(empty_database, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT version_num FROM alembic_version")) == schema_head()
        assert connection.scalar(sa.text("SELECT count(*) FROM users")) == 1


def test_keys_written_through_either_instance_are_in_no_log_nor_pg_dump(databases, instance_path, start_instances):
    secret = "sk-SCALE-OUT-SECRET-5151"
    first, second = start_instances(2, database_url(instance_path))
    with first.client("admin") as on_first, second.client("admin") as on_second:
        created = on_first.post(PROVIDERS, json=provider_body(api_key=secret))
        rotated = on_second.patch(f"{PROVIDERS}/{created.json()['id']}", json={"api_key": secret + "-ROTATED"})
    assert created.status_code == 201 and rotated.status_code == 200
    dump = databases.stored_bytes(instance_path)
    assert b"https://api.openai.com/v1" in dump
    assert secret.encode() not in dump
    for server in (first, second):
        server.kill()
        assert secret not in server.log()


def test_an_instance_on_a_shared_database_warns_when_keys_come_from_its_own_key_file(make_app, caplog):
    make_app(REGISTRY_ENCRYPTION_KEYS=SHARED_ENCRYPTION_KEY)
    assert "REGISTRY_ENCRYPTION_KEYS" not in caplog.text
    make_app()
    assert "REGISTRY_ENCRYPTION_KEYS is unset" in caplog.text


def test_a_password_changed_through_one_instance_is_refused_at_once_by_the_other(
    make_app, instance_path, start_instances
):
    servers = start_instances(2, database_url(instance_path), workers=1)
    for server in servers:  # each instance's one worker now remembers the verified password
        with server.client("reader") as reader:
            assert reader.get(PROVIDERS).status_code == 200
    cli = make_app().test_cli_runner()
    assert cli.invoke(args=["users", "set-password", "reader", "--password-stdin"], input="changed-pw\n").exit_code == 0
    for server in servers:
        with server.client("reader") as reader:
            assert reader.get(PROVIDERS).status_code == 401
        with httpx.Client(base_url=server.base_url, auth=("reader", "changed-pw")) as reader:
            assert reader.get(PROVIDERS).status_code == 200


def test_a_token_revoked_through_one_instance_is_refused_at_once_by_the_other(instance_path, start_instances):
    first, second = start_instances(2, database_url(instance_path), workers=1)
    with first.client("reader") as reader:
        created = reader.post("/api/v1/tokens", json={"name": "ci"}).json()
    bearer = {"Authorization": f"Bearer {created['token']}"}
    with httpx.Client(base_url=second.base_url, headers=bearer) as on_second:
        assert on_second.get(PROVIDERS).status_code == 200
        with first.client("reader") as reader:
            assert reader.delete(f"/api/v1/tokens/{created['id']}").status_code == 204
        assert on_second.get(PROVIDERS).status_code == 401


def test_instances_on_one_database_share_one_prober(instance_path, start_instances, fake_upstream):
    upstream = fake_upstream()
    first, second = start_instances(2, database_url(instance_path), REGISTRY_PROBE_INTERVAL="1")
    with first.client("admin") as admin:
        body = provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
        assert admin.post(PROVIDERS, json=body).status_code == 201
    deadline = time.monotonic() + 15
    while upstream.hits == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    before = upstream.hits
    time.sleep(5)
    probes = upstream.hits - before
    assert 3 <= probes <= 7, f"{probes} probes in 5 intervals"  # four workers each probing would give ~20


def test_the_model_index_changed_through_one_instance_is_what_the_other_answers(
    instance_path, start_instances, fake_upstream
):
    old, new = fake_upstream(models=["old-model"]), fake_upstream(models=["new-model"])
    first, second = start_instances(2, database_url(instance_path), REGISTRY_VERIFY_ON_CREATE="true")
    with first.client("admin") as on_first, second.client("admin") as on_second:
        created = on_first.post(PROVIDERS, json=provider_body(base_url=old.base_url, api_key=old.api_key)).json()
        models_path = f"{PROVIDERS}/{created['id']}/models"
        assert [model["id"] for model in on_first.get(models_path).json()["items"]] == ["openai:old-model"]
        on_second.patch(f"{PROVIDERS}/{created['id']}", json={"base_url": new.base_url, "api_key": new.api_key})
        assert [model["id"] for model in on_first.get(models_path).json()["items"]] == ["openai:new-model"]
        assert [model["id"] for model in on_first.get("/api/v1/openai/models").json()["data"]] == ["openai:new-model"]
        new.models = ["newer-model"]
        refreshed = on_second.get(f"{models_path}?refresh=true").json()
        assert [model["id"] for model in refreshed["items"]] == ["openai:newer-model"]
        assert on_first.get(models_path).json() == refreshed
