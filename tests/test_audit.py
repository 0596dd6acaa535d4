"""The audit log: each change once, with actor, target and request id, in the change's transaction."""

import getpass
import json
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet

from catalog.manifests import sync_on_schedule
from models import AuditEvent, db, utcnow
from observability.audit import prune_old_events
from tests.conftest import client_as, provider_body

PROVIDERS = "/api/v1/model_providers"
AUDIT = "/api/v1/audit"
SECRET = "sk-audited-never-stored-3131"
PASSWORD = "audited-password-never-stored-4242"
CLI_ACTOR = f"cli:{getpass.getuser()}"


def events(app, **filters):
    answer = client_as(app, "admin").get(AUDIT, query_string={"limit": 1000, **filters})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()["items"]


def only_event(app, **filters):
    [event] = events(app, **filters)
    return event


def test_provider_create_update_delete_are_each_recorded_once(app, admin):
    created = admin.post(PROVIDERS, json=provider_body(api_key=SECRET, name="A"), headers={"X-Request-ID": "c-1"})
    provider_id = created.get_json()["id"]
    changes = {"name": "B", "api_key": SECRET + "-2"}
    assert admin.patch(f"{PROVIDERS}/{provider_id}", json=changes, headers={"X-Request-ID": "u-1"}).status_code == 200
    assert admin.delete(f"{PROVIDERS}/{provider_id}", headers={"X-Request-ID": "d-1"}).status_code == 204

    recorded = events(app)
    assert [event["action"] for event in recorded] == ["provider.delete", "provider.update", "provider.create"]
    for event, request_id in zip(recorded, ("d-1", "u-1", "c-1"), strict=True):
        assert event["user"] == "admin" and event["target_id"] == provider_id
        assert event["request_id"] == request_id and event["client_address"] == "127.0.0.1"
        assert event["token_id"] is None and event["time"].endswith("Z")
    assert recorded[1]["changed_fields"] == ["api_key", "name"]
    assert "api_key" in recorded[2]["changed_fields"] and "base_url" in recorded[2]["changed_fields"]
    assert SECRET not in json.dumps(recorded)


def test_a_resolve_is_recorded_because_it_hands_out_a_key(app, admin, service, fake_upstream):
    upstream = fake_upstream()
    body = provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
    provider_id = admin.post(PROVIDERS, json=body).get_json()["id"]
    admin.post(f"{PROVIDERS}/{provider_id}/check")  # fills the model index resolve reads
    resolved = service.post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-4o"}, headers={"X-Request-ID": "r-1"})
    assert resolved.status_code == 200
    event = only_event(app, action="provider.resolve")
    assert event["user"] == "service" and event["target_id"] == provider_id and event["request_id"] == "r-1"
    assert "openai:gpt-4o" in event["detail"] and upstream.api_key not in json.dumps(event)
    assert service.post(f"{PROVIDERS}/resolve", json={"model": "openai:nope"}).status_code == 404
    assert len(events(app, action="provider.resolve")) == 1


def test_a_check_and_a_refresh_are_recorded(app, admin, fake_upstream):
    """Both change what is stored (the state, the model index) at an admin's request."""
    upstream = fake_upstream()
    body = provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
    provider_id = admin.post(PROVIDERS, json=body, query_string={"verify": "false"}).get_json()["id"]
    assert admin.post(f"{PROVIDERS}/{provider_id}/check", headers={"X-Request-ID": "k-1"}).status_code == 200
    refreshed = admin.get(f"{PROVIDERS}/{provider_id}/models", query_string={"refresh": "true"})
    assert refreshed.status_code == 200
    check, refresh = only_event(app, action="provider.check"), only_event(app, action="provider.refresh")
    assert (check["user"], check["target_id"], check["request_id"]) == ("admin", provider_id, "k-1")
    assert check["detail"] == "now online" and "state" in check["changed_fields"]
    assert (refresh["target_id"], refresh["changed_fields"]) == (provider_id, ["models"])
    assert upstream.api_key not in json.dumps(events(app))


def test_a_configuration_change_is_recorded(app, admin):
    answer = admin.put("/api/v1/configurations/system", json={"default_llm_model": "openai:gpt-4o"})
    event = only_event(app, action="configuration.update")
    assert event["target_id"] == answer.get_json()["id"] and event["user"] == "admin"
    assert event["changed_fields"] == ["default_llm_model"]  # the other stays null, as it was


def test_failed_changes_leave_no_event(make_app, fake_upstream):
    app = make_app(REGISTRY_VERIFY_ON_CREATE="true")
    admin = client_as(app, "admin")
    provider_id = admin.post(PROVIDERS, json=provider_body(), query_string={"verify": "false"}).get_json()["id"]
    assert admin.post(f"{PROVIDERS}?verify=false", json=provider_body()).status_code == 409  # fails at commit
    assert admin.post(PROVIDERS, json=provider_body(base_url="nope")).status_code == 422
    dead = fake_upstream()
    dead.down()
    refused = admin.patch(f"{PROVIDERS}/{provider_id}", json={"base_url": dead.base_url})
    assert refused.status_code == 400  # verification failed: nothing stored
    assert admin.delete(f"{PROVIDERS}/{'0' * 8}-0000-4000-8000-{'0' * 12}").status_code == 404
    stale = admin.patch(f"{PROVIDERS}/{provider_id}", json={"watsonx_project_id": "p"})
    assert stale.status_code == 422
    assert [event["action"] for event in events(app)] == ["provider.create"]


def test_cli_user_changes_record_the_operator(app):
    runner = app.test_cli_runner()
    for args, stdin in (
        (["users", "create", "carol", "--role", "service", "--password-stdin"], PASSWORD + "\n"),
        (["users", "set-password", "carol", "--password-stdin"], PASSWORD + "-new\n"),
        (["users", "delete", "carol"], None),
    ):
        result = runner.invoke(args=args, input=stdin)
        assert result.exit_code == 0, result.output
    assert runner.invoke(args=["users", "delete", "nobody"]).exit_code != 0
    recorded = events(app, target_id="carol")
    assert [event["action"] for event in recorded] == ["user.delete", "user.update", "user.create"]
    assert all(event["user"] == CLI_ACTOR and event["request_id"] is None for event in recorded)
    assert recorded[2]["changed_fields"] == ["password", "role"] and recorded[1]["changed_fields"] == ["password"]
    assert PASSWORD not in json.dumps(recorded)
    assert events(app, user=CLI_ACTOR) == recorded


def test_key_rotation_is_recorded(make_app):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    client_as(make_app(REGISTRY_ENCRYPTION_KEYS=old_key), "admin").post(PROVIDERS, json=provider_body(api_key=SECRET))
    app = make_app(REGISTRY_ENCRYPTION_KEYS=f"{new_key},{old_key}")
    result = app.test_cli_runner().invoke(args=["keys", "rotate"])
    assert result.exit_code == 0, result.output
    event = only_event(app, action="keys.rotate")
    assert event["user"] == CLI_ACTOR and event["detail"] == "re-encrypted 1 of 1 API keys"


MANIFEST = "model_providers:\n  - {type: openai, base_url: https://m.example.com/v1, name: M, api_key: %s}\n"


def manifest_events(app):
    return events(app, action="manifest.sync")


def test_manifest_syncs_record_each_provider_changed_and_who_synced(make_app, tmp_path):
    manifest = tmp_path / "providers.yaml"
    manifest.write_text(MANIFEST % SECRET)
    app = make_app(REGISTRY_MANIFESTS=str(manifest))
    admin = client_as(app, "admin")

    assert admin.post("/api/v1/registry/sync", headers={"X-Request-ID": "s-1"}).status_code == 200
    [created] = manifest_events(app)
    provider_id = admin.get(PROVIDERS).get_json()["items"][0]["id"]
    # The change is the sync's (its actor is `system`); the admin's request lends its id.
    assert created["target_id"] == provider_id and created["user"] == "system" and created["request_id"] == "s-1"
    assert created["detail"] == f"created from {manifest.as_uri()}"

    admin.post("/api/v1/registry/sync")
    assert len(manifest_events(app)) == 1  # nothing changed, nothing recorded

    manifest.write_text(MANIFEST % (SECRET + "-rotated"))
    assert app.test_cli_runner().invoke(args=["registry", "sync"]).exit_code == 0
    updated = manifest_events(app)[0]
    assert updated["user"] == CLI_ACTOR and updated["changed_fields"] == ["api_key"]

    manifest.write_text("model_providers:\n  - {type: openai, base_url: https://m.example.com/v1, api_key: [}\n")
    with app.app_context():
        sync_on_schedule(app)  # a broken manifest changes nothing, so records nothing
    assert len(manifest_events(app)) == 2

    manifest.write_text("model_providers: []\n")
    with app.app_context():
        sync_on_schedule(app)
    deleted = manifest_events(app)[0]
    assert deleted["user"] == "system" and deleted["target_id"] == provider_id and deleted["request_id"] is None
    assert deleted["detail"].startswith("deleted")
    assert SECRET not in json.dumps(manifest_events(app))


def test_providers_of_a_dropped_location_are_recorded_as_deleted(make_app, tmp_path):
    manifest = tmp_path / "providers.yaml"
    manifest.write_text(MANIFEST % SECRET)
    client_as(make_app(REGISTRY_MANIFESTS=str(manifest)), "admin").post("/api/v1/registry/sync")
    app = make_app()  # the location is no longer configured
    provider_id = only_event(app, action="manifest.sync")["target_id"]
    with app.app_context():
        sync_on_schedule(app)
    deleted = manifest_events(app)[0]
    assert deleted["target_id"] == provider_id and deleted["user"] == "system"
    assert deleted["detail"] == f"deleted: {manifest.as_uri()} is no longer configured"


def test_only_admins_read_the_audit_log(reader, service):
    assert reader.get(AUDIT).status_code == 403
    assert service.get(AUDIT).status_code == 403


def test_audit_pages_newest_first_and_filters(app, admin):
    ids = [
        admin.post(PROVIDERS, json=provider_body(base_url=f"https://{n}.example.com")).get_json()["id"]
        for n in range(5)
    ]
    admin.delete(f"{PROVIDERS}/{ids[0]}")
    first = admin.get(AUDIT, query_string={"limit": 4}).get_json()
    assert first["total_count"] == 6 and first["has_more"] is True and len(first["items"]) == 4
    rest = admin.get(AUDIT, query_string={"limit": 4, "page_token": first["next_page_token"]}).get_json()
    assert rest["has_more"] is False and rest["next_page_token"] is None
    targets = [event["target_id"] for event in first["items"] + rest["items"]]
    assert targets == [ids[0], *reversed(ids)]
    assert [event["target_id"] for event in events(app, target_id=ids[0])] == [ids[0], ids[0]]
    assert len(events(app, action="provider.create")) == 5
    assert events(app, user="someone else") == []
    assert len(events(app, since=(utcnow() - timedelta(minutes=5)).isoformat() + "Z")) == 6
    assert events(app, since="2999-01-01T00:00:00+02:00") == []
    assert admin.get(AUDIT, query_string={"since": "yesterday"}).status_code == 422
    for out_of_range in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        assert admin.get(AUDIT, query_string={"since": out_of_range}).status_code == 422
    assert admin.get(AUDIT, query_string={"page_token": "garbage"}).status_code == 422


@pytest.mark.parametrize("retention_days", ["90", "1"])
def test_the_scheduler_prunes_events_past_the_retention(make_app, retention_days):
    app = make_app(REGISTRY_AUDIT_RETENTION_DAYS=retention_days)
    with app.app_context():
        for age_days in (0, 2, 89, 91):
            event = AuditEvent(actor="system", action="test.age", detail=str(age_days))
            event.created_at = utcnow() - timedelta(days=age_days, minutes=1)
            db.session.add(event)
        db.session.commit()
        prune_old_events(app)
    kept = sorted(int(event["detail"]) for event in events(app, action="test.age"))
    assert kept == ([0, 2, 89] if retention_days == "90" else [0])


def test_tokens_created_used_and_revoked_are_recorded(app, admin):
    created = admin.post("/api/v1/tokens", json={"name": "ci"}, headers={"X-Request-ID": "t-1"}).get_json()
    event = only_event(app, action="token.create")
    assert event["target_id"] == created["id"] and event["user"] == "admin" and event["request_id"] == "t-1"
    assert created["token"] not in json.dumps(events(app))

    bearer = app.test_client()
    bearer.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {created['token']}"
    provider_id = bearer.post(PROVIDERS, json=provider_body()).get_json()["id"]
    made = only_event(app, action="provider.create")
    assert made["target_id"] == provider_id and made["user"] == "admin" and made["token_id"] == created["id"]

    assert admin.delete(f"/api/v1/tokens/{created['id']}").status_code == 204
    assert admin.delete(f"/api/v1/tokens/{created['id']}").status_code == 404  # nothing left to revoke
    revoked = only_event(app, action="token.revoke")
    assert revoked["target_id"] == created["id"] and revoked["token_id"] is None


def test_a_role_change_is_recorded(app):
    result = app.test_cli_runner().invoke(args=["users", "set-role", "reader", "service"])
    assert result.exit_code == 0, result.output
    event = only_event(app, action="user.update")
    assert event["target_id"] == "reader" and event["changed_fields"] == ["role"] and event["user"] == CLI_ACTOR
