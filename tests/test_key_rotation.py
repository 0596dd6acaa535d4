"""`flask --app app keys rotate`: re-encrypt under the first key, then the old key can go."""

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

from models import PROVIDER_ROWS, db, providers_of
from models import PROVIDERS as PROVIDER_TABLE
from tests.conftest import ROOT, client_as, provider_body, registry_environ

FLASK = os.path.join(os.path.dirname(sys.executable), "flask")
SECRETS = ["sk-rotate-one-1111", "sk-rotate-two-2222"]


def rotate(instance_path, keys):
    environ = {**os.environ, **registry_environ(instance_path, REGISTRY_ENCRYPTION_KEYS=",".join(keys))}
    return subprocess.run(
        [FLASK, "--app", "app", "keys", "rotate"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60
    )


def app_with_providers(make_app, key):
    """The registry with its keys sealed under `key` alone."""
    app = make_app(REGISTRY_ENCRYPTION_KEYS=key)
    admin = client_as(app, "admin")
    for number, secret in enumerate(SECRETS):
        body = provider_body(base_url=f"https://{number}.example.com", api_key=secret)
        assert admin.post("/api/v1/model_providers", json=body).status_code == 201
    return app


def stored_keys(app):
    with app.app_context():
        return db.session.execute(sa.select(PROVIDER_TABLE.c.sealed_api_key, PROVIDER_TABLE.c.updated_at)).all()


@pytest.fixture
def old_key_and_new_key():
    return Fernet.generate_key().decode(), Fernet.generate_key().decode()


@pytest.mark.slow  # a CLI process of its own: seconds
def test_rotation_lets_the_old_key_be_dropped(make_app, instance_path, old_key_and_new_key):
    old_key, new_key = old_key_and_new_key
    before = stored_keys(app_with_providers(make_app, old_key))

    rotation = rotate(instance_path, [new_key, old_key])
    assert rotation.returncode == 0, rotation.stderr
    assert "Re-encrypted 2 of 2" in rotation.stdout

    app = make_app(REGISTRY_ENCRYPTION_KEYS=new_key)
    with app.app_context():
        providers = providers_of(db.session.execute(PROVIDER_ROWS.order_by(PROVIDER_TABLE.c.base_url)))
        assert [provider.open_api_key() for provider in providers] == SECRETS
    after = stored_keys(app)
    for sealed_api_key, _ in after:
        with pytest.raises(InvalidToken):
            Fernet(old_key).decrypt(sealed_api_key.encode())
    assert sorted(updated_at for _, updated_at in after) == sorted(updated_at for _, updated_at in before)
    assert client_as(app, "admin").get("/api/v1/model_providers").get_json()["total_count"] == 2


@pytest.mark.slow  # a CLI process of its own: seconds
def test_rotation_without_the_old_key_changes_nothing(make_app, instance_path, old_key_and_new_key):
    old_key, new_key = old_key_and_new_key
    before = stored_keys(app_with_providers(make_app, old_key))
    rotation = rotate(instance_path, [new_key])
    assert rotation.returncode != 0
    assert "opens with none of the configured keys" in rotation.stderr
    assert not any(secret in rotation.stdout + rotation.stderr for secret in SECRETS)
    assert stored_keys(make_app(REGISTRY_ENCRYPTION_KEYS=old_key)) == before


def test_a_key_dropped_too_early_is_a_503_and_the_prober_marks_the_provider_offline(make_app, fake_upstream):
    from jobs.prober import probe_all

    upstream = fake_upstream(models=["gpt-4o"])
    sealing_app = make_app(REGISTRY_ENCRYPTION_KEYS=Fernet.generate_key().decode(), REGISTRY_VERIFY_ON_CREATE="true")
    body = provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
    provider = client_as(sealing_app, "admin").post("/api/v1/model_providers", json=body).get_json()

    app = make_app(REGISTRY_ENCRYPTION_KEYS=Fernet.generate_key().decode(), REGISTRY_PROBE_FAILURES="1")
    service = client_as(app, "service")
    response = service.post("/api/v1/model_providers/resolve", json={"model": "openai:gpt-4o"})
    assert response.status_code == 503
    assert "encryption keys" in response.get_json()["detail"]
    with app.app_context():
        probe_all(app)
    probed = service.get(f"/api/v1/model_providers/{provider['id']}").get_json()
    assert probed["state"] == "offline"
    assert "cannot be decrypted" in probed["last_error"]
