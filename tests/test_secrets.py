"""API keys never show in plain text: not in responses, logs, errors nor the database."""

import logging
import os
import sqlite3
import stat

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from flask_migrate import upgrade

from app import create_app
from models import PROVIDER_ROWS, User, db, provider_of
from models import PROVIDERS as PROVIDER_TABLE
from tests.conftest import basic_auth, client_as, provider_body, registry_environ

PROVIDERS = "/api/v1/model_providers"
SECRET = "sk-PLAIN-TEXT-SECRET-4242"


def test_key_is_in_no_response_log_or_database_file(admin, databases, instance_path, caplog):
    caplog.set_level(logging.DEBUG)
    created = admin.post(PROVIDERS, json=provider_body(api_key=SECRET))
    provider_id = created.get_json()["id"]
    rotated = admin.patch(f"{PROVIDERS}/{provider_id}", json={"api_key": SECRET + "-ROTATED"})
    refused = admin.post(PROVIDERS, json=provider_body(api_key=SECRET + "-DUP"))
    invalid = admin.post(PROVIDERS, json=provider_body(api_key=SECRET + "-BAD", base_url="nope"))
    listed = admin.get(PROVIDERS)
    for response in (created, rotated, refused, invalid, listed):
        assert SECRET.encode() not in response.data
    assert refused.status_code == 409 and invalid.status_code == 422
    assert SECRET not in caplog.text
    stored = databases.stored_bytes(instance_path)  # the SQLite file, or pg_dump's output
    assert b"https://api.openai.com/v1" in stored
    assert SECRET.encode() not in stored


def test_stored_key_opens_to_what_was_sent(app, admin):
    provider_id = admin.post(PROVIDERS, json=provider_body(api_key=SECRET)).get_json()["id"]
    with app.app_context():
        provider = provider_of(db.session.execute(PROVIDER_ROWS.where(PROVIDER_TABLE.c.id == provider_id)))
        assert provider.sealed_api_key != SECRET
        assert provider.open_api_key() == SECRET


def test_generated_key_file_is_private(app, instance_path):
    key_file = instance_path / "encryption.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    Fernet(key_file.read_bytes().strip())


@pytest.fixture
def open_umask():
    previous = os.umask(0)
    yield
    os.umask(previous)


def sqlite_files_of(folder):
    """An app on a SQLite file in `folder`, migrated, with a connection open: the -wal and -shm exist."""
    app = create_app(registry_environ(folder, DATABASE_URL=f"sqlite:///{folder}/registry.db"))
    with app.app_context():
        upgrade()
        with db.engine.connect() as connection:
            connection.execute(sa.text("SELECT count(*) FROM model_providers"))
            modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.glob("registry.db*")}
        db.engine.dispose()
    return modes


def test_database_files_are_created_private_whatever_the_umask_and_folder(tmp_path, open_umask):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    assert sqlite_files_of(folder) == {"registry.db": 0o600, "registry.db-wal": 0o600, "registry.db-shm": 0o600}


def test_database_files_made_readable_earlier_are_made_private(tmp_path, open_umask):
    folder = tmp_path / "earlier"
    folder.mkdir(mode=0o755)
    sqlite3.connect(folder / "registry.db").close()
    assert stat.S_IMODE((folder / "registry.db").stat().st_mode) == 0o644
    assert sqlite_files_of(folder) == {"registry.db": 0o600, "registry.db-wal": 0o600, "registry.db-shm": 0o600}


def test_configured_keys_are_used_and_no_key_file_is_made(make_app, instance_path):
    key = Fernet.generate_key().decode()
    app = make_app(REGISTRY_ENCRYPTION_KEYS=key)
    provider_id = client_as(app, "admin").post(PROVIDERS, json=provider_body(api_key=SECRET)).get_json()["id"]
    assert not (instance_path / "encryption.key").exists()
    with app.app_context():
        sealed = db.session.scalar(sa.select(PROVIDER_TABLE.c.sealed_api_key).where(PROVIDER_TABLE.c.id == provider_id))
    assert Fernet(key).decrypt(sealed.encode()).decode() == SECRET


@pytest.fixture
def userless_instance(make_instance):
    """A migrated database with no user yet, as on the first start."""
    instance = make_instance("fresh")
    with create_app(registry_environ(instance)).app_context():
        db.session.execute(sa.delete(User))
        db.session.commit()
        db.engine.dispose()
    return instance


def bootstrap(instance, **overrides):
    """`flask --app app users bootstrap`, as `make run` runs it after `db upgrade`; the app."""
    app = create_app(registry_environ(instance, **overrides))
    result = app.test_cli_runner().invoke(args=["users", "bootstrap"])
    assert result.exit_code == 0, result.output
    return app


def user_count(app):
    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(User))


def test_building_the_app_creates_no_user(userless_instance):
    app = create_app(registry_environ(userless_instance, REGISTRY_ADMIN_PASSWORD="ops-secret"))
    assert user_count(app) == 0
    assert not (userless_instance / "admin-password").exists()


def test_generated_admin_password_file_is_private_and_works(userless_instance, caplog):
    caplog.set_level(logging.WARNING)
    app = bootstrap(userless_instance, REGISTRY_ADMIN_USERNAME="root")
    password_file = userless_instance / "admin-password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert str(password_file) in caplog.text
    password = password_file.read_text().strip()
    assert password not in caplog.text
    response = app.test_client().get(PROVIDERS, headers={"Authorization": basic_auth("root", password)})
    assert response.status_code == 200


def test_bootstrap_creates_the_first_admin_once(userless_instance):
    app = bootstrap(userless_instance)
    password = (userless_instance / "admin-password").read_text()
    bootstrap(userless_instance)
    assert user_count(app) == 1
    assert (userless_instance / "admin-password").read_text() == password


def test_bootstrap_before_the_migrations_says_to_run_them(make_instance):
    app = create_app(registry_environ(make_instance("empty", migrated=False)))
    result = app.test_cli_runner().invoke(args=["users", "bootstrap"])
    assert result.exit_code != 0
    assert "db upgrade" in result.output


def test_admin_from_environment_gets_no_password_file(userless_instance):
    app = bootstrap(userless_instance, REGISTRY_ADMIN_USERNAME="ops", REGISTRY_ADMIN_PASSWORD="ops-secret")
    assert not (userless_instance / "admin-password").exists()
    response = app.test_client().get(PROVIDERS, headers={"Authorization": basic_auth("ops", "ops-secret")})
    assert response.status_code == 200
    with app.app_context():
        stored = db.session.scalar(sa.select(User.password_hash).where(User.username == "ops"))
    assert "ops-secret" not in stored


def test_admin_name_from_environment_is_stored_in_nfc(userless_instance):
    app = bootstrap(userless_instance, REGISTRY_ADMIN_USERNAME="jose\u0301", REGISTRY_ADMIN_PASSWORD="pw")
    response = app.test_client().get(PROVIDERS, headers={"Authorization": basic_auth("jos\u00e9", "pw")})
    assert response.status_code == 200


def test_admin_name_with_a_control_character_stops_the_start(userless_instance):
    with pytest.raises(RuntimeError, match="REGISTRY_ADMIN_USERNAME must be 1 to 255 characters"):
        create_app(registry_environ(userless_instance, REGISTRY_ADMIN_USERNAME="ad\x1bmin"))


def test_workers_starting_at_once_share_one_whole_key_file(instance_path):
    from concurrent.futures import ThreadPoolExecutor

    from access.crypto import read_or_create_key_file

    with ThreadPoolExecutor(max_workers=16) as pool:
        keys = set(pool.map(lambda _: read_or_create_key_file(instance_path), range(64)))
    assert len(keys) == 1
    Fernet(keys.pop())
    assert [path.name for path in instance_path.iterdir() if path.name.startswith(".key-")] == []
