"""API tokens: created once with their secret, Bearer on every route, a
role at most the owner's, revocation, expiry and the owner's changes effective on the next request."""

import hashlib
import logging
import re
import sqlite3
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa

from models import ApiToken, db, utcnow
from tests.conftest import PASSWORDS, basic_auth, provider_body

TOKENS = "/api/v1/tokens"
PROVIDERS = "/api/v1/model_providers"
HOME = "10.0.0.1"


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def call(app, method, path, token, address=HOME, **kwargs):
    client = app.test_client()
    return client.open(path, method=method, headers=bearer(token), environ_base={"REMOTE_ADDR": address}, **kwargs)


def new_token(client, **fields):
    created = client.post(TOKENS, json={"name": "ci", **fields})
    assert created.status_code == 201, created.get_json()
    return created.get_json()


def stored_token(app, token_id):
    with app.app_context():
        token = db.session.get(ApiToken, token_id)
        db.session.expunge_all()
        return token


def change_token(app, token_id, **values):
    with app.app_context():
        db.session.execute(sa.update(ApiToken).where(ApiToken.id == token_id).values(**values))
        db.session.commit()


def test_a_new_token_is_shown_once_and_works_as_bearer(app, reader):
    created = new_token(reader, expires_in_days=30)
    assert set(created) == {"id", "name", "user", "role", "created_at", "expires_at", "last_used_at", "limits", "token"}
    assert created["user"] == "reader" and created["role"] == "reader" and created["last_used_at"] is None
    assert created["token"].startswith("mpr_") and len(created["token"]) >= 4 + 43  # 256 bits in base64url
    assert created["expires_at"].endswith("Z") and created["created_at"] < created["expires_at"]
    assert call(app, "GET", PROVIDERS, created["token"]).status_code == 200
    listed = reader.get(TOKENS).get_json()
    assert [item["id"] for item in listed["items"]] == [created["id"]]
    assert "token" not in listed["items"][0] and created["token"] not in str(listed)


def test_only_a_digest_is_stored(app, reader, databases, instance_path):
    created = new_token(reader)
    assert stored_token(app, created["id"]).digest == hashlib.sha256(created["token"].encode()).hexdigest()
    stored = databases.stored_bytes(instance_path)
    assert created["id"].encode() in stored
    assert created["token"].encode() not in stored and created["token"][4:].encode() not in stored


def test_tokens_are_distinct(reader):
    assert len({new_token(reader)["token"] for _ in range(20)}) == 20


def test_a_token_acts_with_its_role(app, admin):
    reading = new_token(admin, role="reader")
    assert call(app, "GET", PROVIDERS, reading["token"]).status_code == 200
    refused = call(app, "POST", PROVIDERS, reading["token"], json=provider_body())
    assert refused.status_code == 403
    assert admin.get(PROVIDERS).get_json()["total_count"] == 0
    writing = new_token(admin)
    assert writing["role"] == "admin"
    assert call(app, "POST", PROVIDERS, writing["token"], json=provider_body()).status_code == 201


def test_a_caller_token_may_not_resolve(app, service):
    caller = new_token(service, role="caller")
    resolved = call(app, "POST", f"{PROVIDERS}/resolve", caller["token"], json={"model": "openai:gpt-4o"})
    assert resolved.status_code == 403


def test_a_role_above_the_owners_is_403(reader, service):
    for client, role in ((reader, "caller"), (reader, "admin"), (service, "admin")):
        refused = client.post(TOKENS, json={"name": "x", "role": role})
        assert refused.status_code == 403 and "at most" in refused.get_json()["detail"]
    assert reader.get(TOKENS).get_json()["total_count"] == 0


def test_only_an_admin_names_another_owner(admin, reader):
    assert reader.post(TOKENS, json={"name": "x", "user": "admin"}).status_code == 403
    assert new_token(reader, user="reader")["user"] == "reader"
    for_service = new_token(admin, user="service")
    assert for_service["user"] == "service" and for_service["role"] == "service"
    assert admin.post(TOKENS, json={"name": "x", "user": "service", "role": "admin"}).status_code == 403
    unknown = admin.post(TOKENS, json={"name": "x", "user": "nobody"})
    assert unknown.status_code == 422 and "user" in unknown.get_json()["errors"]


def test_a_token_creates_tokens_within_its_own_role_and_expiry(app, admin):
    """Every /api/v1 route takes a token; a token cannot outrank or outlast its maker."""
    maker = new_token(admin, role="service", expires_in_days=7)
    made = call(app, "POST", TOKENS, maker["token"], json={"name": "made"})
    assert made.status_code == 201
    assert (made.get_json()["role"], made.get_json()["expires_at"]) == ("service", maker["expires_at"])
    assert call(app, "GET", PROVIDERS, made.get_json()["token"]).status_code == 200
    shorter = call(app, "POST", TOKENS, maker["token"], json={"name": "short", "role": "reader", "expires_in_days": 1})
    assert shorter.status_code == 201 and shorter.get_json()["expires_at"] < maker["expires_at"]
    for refused_body in (
        {"name": "higher", "role": "admin"},
        {"name": "longer", "expires_in_days": 8},
        {"name": "for another", "user": "reader"},  # a service token is no admin's
    ):
        refused = call(app, "POST", TOKENS, maker["token"], json=refused_body)
        assert refused.status_code == 403, refused_body
    assert admin.get(TOKENS).get_json()["total_count"] == 3
    events = admin.get("/api/v1/audit", query_string={"action": "token.create"}).get_json()["items"]
    assert {event["token_id"] for event in events} == {None, maker["id"]}


def test_an_admin_token_may_create_a_token_for_another_user(app, admin):
    maker = new_token(admin)
    for_service = call(app, "POST", TOKENS, maker["token"], json={"name": "svc", "user": "service"})
    assert for_service.status_code == 201
    assert (for_service.get_json()["user"], for_service.get_json()["role"]) == ("service", "service")
    assert for_service.get_json()["expires_at"] is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "x" * 256},
        {"name": "ci\n5c1b\treader-token\x1b]0;pwned\x07"},
        {"name": "x", "role": "owner"},
        {"name": "x", "expires_in_days": 0},
    ],
    ids=["no name", "empty name", "long name", "control characters", "unknown role", "zero days"],
)
def test_invalid_create_bodies_are_422(reader, body):
    assert reader.post(TOKENS, json=body).status_code == 422
    assert reader.get(TOKENS).get_json()["total_count"] == 0


def test_each_sees_own_tokens_and_an_admin_sees_all(admin, reader, service):
    mine = new_token(reader)["id"]
    theirs = new_token(service)["id"]
    assert [item["id"] for item in reader.get(TOKENS).get_json()["items"]] == [mine]
    assert reader.get(TOKENS, query_string={"user": "service"}).status_code == 403
    assert [item["id"] for item in admin.get(TOKENS).get_json()["items"]] == [theirs, mine]
    assert [item["id"] for item in admin.get(TOKENS, query_string={"user": "reader"}).get_json()["items"]] == [mine]
    assert admin.get(TOKENS, query_string={"user": "nobody"}).get_json()["total_count"] == 0


def test_the_token_list_pages_like_every_list(admin):
    created = [new_token(admin, name=f"t{number}")["id"] for number in range(5)]
    seen, page_token = [], None
    while True:
        query = {"limit": 2, **({"page_token": page_token} if page_token else {})}
        page = admin.get(TOKENS, query_string=query).get_json()
        assert set(page) == {"items", "total_count", "has_more", "next_page_token"} and page["total_count"] == 5
        seen += [item["id"] for item in page["items"]]
        if not page["has_more"]:
            break
        page_token = page["next_page_token"]
    assert seen == created[::-1]


def test_revoked_token_is_refused_at_once_and_unlisted(app, reader):
    created = new_token(reader)
    assert call(app, "GET", PROVIDERS, created["token"]).status_code == 200
    assert reader.delete(f"{TOKENS}/{created['id']}").status_code == 204
    refused = call(app, "GET", PROVIDERS, created["token"])
    assert refused.status_code == 401
    assert refused.content_type == "application/problem+json"
    assert [challenge.split()[0] for challenge in refused.headers.getlist("WWW-Authenticate")] == ["Basic", "Bearer"]
    assert reader.get(TOKENS).get_json()["total_count"] == 0
    assert reader.delete(f"{TOKENS}/{created['id']}").status_code == 404


def test_a_token_may_revoke_itself(app, reader):
    created = new_token(reader)
    assert call(app, "DELETE", f"{TOKENS}/{created['id']}", created["token"]).status_code == 204
    assert call(app, "GET", PROVIDERS, created["token"]).status_code == 401


def test_only_the_owner_or_an_admin_revokes(app, admin, reader, service):
    of_service = new_token(service)
    assert reader.delete(f"{TOKENS}/{of_service['id']}").status_code == 404
    assert call(app, "GET", PROVIDERS, of_service["token"]).status_code == 200
    assert admin.delete(f"{TOKENS}/{of_service['id']}").status_code == 204
    assert call(app, "GET", PROVIDERS, of_service["token"]).status_code == 401
    for malformed in ("not-a-uuid", "1", "x" * 300):
        assert admin.delete(f"{TOKENS}/{malformed}").status_code == 404


def test_expired_token_is_refused_but_stays_listed(app, reader):
    created = new_token(reader, expires_in_days=1)
    assert call(app, "GET", PROVIDERS, created["token"]).status_code == 200
    change_token(app, created["id"], expires_at=utcnow() - timedelta(seconds=1))
    assert call(app, "GET", PROVIDERS, created["token"]).status_code == 401
    assert [item["id"] for item in reader.get(TOKENS).get_json()["items"]] == [created["id"]]
    assert reader.delete(f"{TOKENS}/{created['id']}").status_code == 204


def users_cli(app, *args):
    result = app.test_cli_runner().invoke(args=["users", *args], input="ops-password\n")
    assert result.exit_code == 0, result.output


def test_demoting_the_owner_limits_the_token_on_the_next_request(app, admin):
    token = new_token(admin)["token"]
    assert call(app, "POST", PROVIDERS, token, json=provider_body()).status_code == 201
    users_cli(app, "set-role", "admin", "reader")
    refused = call(app, "POST", PROVIDERS, token, json=provider_body(base_url="https://other.example.com"))
    assert refused.status_code == 403
    assert call(app, "GET", PROVIDERS, token).status_code == 200
    users_cli(app, "set-role", "admin", "admin")
    assert (
        call(app, "POST", PROVIDERS, token, json=provider_body(base_url="https://other.example.com")).status_code == 201
    )


def test_deleting_the_owner_ends_the_token_on_the_next_request(app, reader):
    created = new_token(reader)
    assert call(app, "GET", PROVIDERS, created["token"]).status_code == 200
    users_cli(app, "delete", "reader")
    assert call(app, "GET", PROVIDERS, created["token"]).status_code == 401
    assert stored_token(app, created["id"]) is None  # deleted with its owner


def test_last_used_at_is_kept_to_the_minute_without_a_write_per_request(app, reader):
    created = new_token(reader)
    call(app, "GET", PROVIDERS, created["token"])
    first_use = stored_token(app, created["id"]).last_used_at
    assert first_use is not None and utcnow() - first_use < timedelta(seconds=10)
    for _ in range(3):
        call(app, "GET", PROVIDERS, created["token"])
    assert stored_token(app, created["id"]).last_used_at == first_use  # no write within the minute
    change_token(app, created["id"], last_used_at=utcnow() - timedelta(seconds=61))
    call(app, "GET", PROVIDERS, created["token"])
    assert utcnow() - stored_token(app, created["id"]).last_used_at < timedelta(seconds=10)
    listed = reader.get(TOKENS).get_json()["items"][0]
    assert listed["last_used_at"] is not None


def test_the_token_shows_in_no_log_line_and_no_later_response(app, admin, reader, caplog):
    caplog.set_level(logging.DEBUG)
    created = new_token(reader)
    token = created["token"]
    answers = [
        call(app, "GET", PROVIDERS, token),
        call(app, "GET", TOKENS, token),
        call(app, "POST", PROVIDERS, token, json=provider_body()),
        call(app, "GET", PROVIDERS, token + "x"),
        admin.get(TOKENS),
        reader.delete(f"{TOKENS}/{created['id']}"),
        call(app, "GET", PROVIDERS, token),
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 403, 401, 200, 204, 401]
    assert all(token[4:].encode() not in answer.data for answer in answers)
    assert token[4:] not in caplog.text


def fail_tokens(app, count, address=HOME):
    return [call(app, "GET", PROVIDERS, f"mpr_wrong{number}", address).status_code for number in range(count)]


def test_failed_token_attempts_are_limited_per_address_apart_from_logins(app, reader):
    """Four times REGISTRY_LOGIN_FAILURES (5) per address, as for Basic logins across names."""
    working = new_token(reader)["token"]
    assert call(app, "GET", PROVIDERS, working).status_code == 200  # verified by this process before the flood
    assert fail_tokens(app, 21) == [401] * 20 + [429]
    refused = call(app, "GET", PROVIDERS, new_token(reader)["token"])  # never used here: refused unseen
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert call(app, "GET", PROVIDERS, working).status_code == 200
    password = app.test_client().get(
        PROVIDERS,
        headers={"Authorization": basic_auth("admin", PASSWORDS["admin"])},
        environ_base={"REMOTE_ADDR": HOME},
    )
    assert password.status_code == 200
    assert fail_tokens(app, 1, address="10.0.0.2") == [401]


class Statements:
    """The SQL statements the app sends to the database, with their literal values as "?".

    Seen by the driver (SQLite's trace, or psycopg's cursors), on connections opened for the
    purpose, so statements sent through SQLAlchemy and straight to the DBAPI cursor
    (storage.connections.DirectStatement) are seen alike.
    """

    def __init__(self, app):
        self.seen = []
        self.tracing = False
        with app.app_context():
            self.engine = db.engine
        self.engine.dispose()
        sa.event.listen(self.engine, "connect", self.trace)

    def trace(self, dbapi_connection, connection_record):
        if isinstance(dbapi_connection, sqlite3.Connection):
            dbapi_connection.set_trace_callback(self.record)
            return
        record = self.record

        class RecordingCursor(type(dbapi_connection.cursor())):
            def execute(self, query, *args, **kwargs):
                record(str(query))
                return super().execute(query, *args, **kwargs)

        dbapi_connection.cursor_factory = RecordingCursor

    def record(self, statement):
        if self.tracing and statement.strip("; "):  # not the pool's ping of a PostgreSQL connection
            self.seen.append(re.sub(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b", "?", statement))

    def during(self, action):
        self.seen, self.tracing = [], True
        try:
            result = action()
        finally:
            self.tracing = False
        return self.seen, result


def test_an_unknown_and_a_revoked_token_take_the_same_path(make_app):
    """The same one query, finding no row, and the same answer: nothing to time apart."""
    app = make_app(REGISTRY_LOGIN_FAILURES="1000")
    reader = app.test_client()
    reader.environ_base["HTTP_AUTHORIZATION"] = basic_auth("reader", PASSWORDS["reader"])
    revoked = new_token(reader)
    call(app, "GET", PROVIDERS, revoked["token"])
    reader.delete(f"{TOKENS}/{revoked['id']}")
    unknown = "mpr_" + "A" * 43
    statements = Statements(app)
    for_revoked, revoked_answer = statements.during(lambda: call(app, "GET", PROVIDERS, revoked["token"]))
    for_unknown, unknown_answer = statements.during(lambda: call(app, "GET", PROVIDERS, unknown))
    assert for_revoked == for_unknown and len(for_revoked) == 1
    assert (revoked_answer.status_code, revoked_answer.data) == (unknown_answer.status_code, unknown_answer.data)


def test_every_request_with_a_password_reads_its_user_once(app):
    """A remembered password spares the slow hash, not the read: roles and deletions are current."""
    statements = Statements(app)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = basic_auth("reader", PASSWORDS["reader"])
    for _ in range(2):
        during, answer = statements.during(lambda: client.get(TOKENS))
        assert answer.status_code == 200
        assert sum("FROM users" in statement and "password_hash" in statement for statement in during) == 1


def tokens_cli(app, *args):
    return app.test_cli_runner().invoke(args=["tokens", *args])


def test_cli_creates_lists_and_revokes_tokens(app):
    created = tokens_cli(app, "create", "deploy", "--user", "service", "--role", "caller", "--expires-in-days", "7")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("mpr_") and "\n" not in token
    assert call(app, "GET", PROVIDERS, token).status_code == 200
    listed = tokens_cli(app, "list", "--user", "service")
    token_id, name, user, role, *_ = listed.stdout.splitlines()[0].split("\t")
    assert (name, user, role) == ("deploy", "service", "caller")
    assert token[4:] not in listed.output
    assert tokens_cli(app, "list", "--user", "reader").stdout == ""
    assert tokens_cli(app, "revoke", token_id).exit_code == 0
    assert call(app, "GET", PROVIDERS, token).status_code == 401
    assert tokens_cli(app, "revoke", token_id).exit_code == 1


def test_cli_refuses_a_role_above_the_owner_and_unknown_users(app):
    assert "at most" in tokens_cli(app, "create", "x", "--user", "reader", "--role", "admin").output
    assert tokens_cli(app, "create", "x", "--user", "nobody").exit_code == 1
    assert tokens_cli(app, "create", "", "--user", "reader").exit_code == 1
    assert tokens_cli(app, "create", "ci\x1b]0;pwned\x07", "--user", "reader").exit_code == 1
    assert tokens_cli(app, "list").stdout == ""
    assert "No user named 'nobody'" in tokens_cli(app, "list", "--user", "nobody").output


def statuses_on_fresh_connections(server, method, path, token, count=20, **kwargs):
    """Each request on a new connection, so that every worker answers some of them."""
    statuses = set()
    for _ in range(count):
        with httpx.Client(base_url=server.base_url, headers=bearer(token), timeout=30) as client:
            statuses.add(client.request(method, path, **kwargs).status_code)
    return statuses


def test_over_gunicorn_tokens_read_are_limited_by_role_and_revoked_everywhere_at_once(
    start_gunicorn, databases, instance_path
):
    server = start_gunicorn(workers=2)
    with server.client("reader") as reader:
        created = reader.post(TOKENS, json={"name": "reading"}).json()
    token = created["token"]
    assert statuses_on_fresh_connections(server, "GET", PROVIDERS, token) == {200}
    assert statuses_on_fresh_connections(server, "POST", PROVIDERS, token, count=4, json=provider_body()) == {403}
    with server.client("reader") as reader:
        assert reader.delete(f"{TOKENS}/{created['id']}").status_code == 204
    assert statuses_on_fresh_connections(server, "GET", PROVIDERS, token) == {401}
    assert token[4:] not in server.log()
    assert token[4:].encode() not in databases.stored_bytes(instance_path)


def test_over_gunicorn_expiry_and_the_owners_demotion_and_deletion_act_on_the_next_request(start_gunicorn, app):
    server = start_gunicorn(workers=2, REGISTRY_LOGIN_FAILURES="100")  # the refusals here are not guesses
    users_cli(app, "create", "ops", "--role", "admin", "--password-stdin")
    with server.client("admin") as admin:
        token = admin.post(TOKENS, json={"name": "deploy", "user": "ops"}).json()["token"]
        expiring = admin.post(TOKENS, json={"name": "short", "expires_in_days": 1}).json()
    body = provider_body(base_url="https://one.example.com")
    assert statuses_on_fresh_connections(server, "POST", PROVIDERS, token, count=1, json=body) == {201}
    assert statuses_on_fresh_connections(server, "GET", PROVIDERS, expiring["token"]) == {200}

    change_token(app, expiring["id"], expires_at=utcnow() - timedelta(seconds=1))
    assert statuses_on_fresh_connections(server, "GET", PROVIDERS, expiring["token"]) == {401}

    users_cli(app, "set-role", "ops", "reader")
    body = provider_body(base_url="https://two.example.com")
    assert statuses_on_fresh_connections(server, "POST", PROVIDERS, token, json=body) == {403}
    assert statuses_on_fresh_connections(server, "GET", PROVIDERS, token) == {200}
    users_cli(app, "delete", "ops")
    assert statuses_on_fresh_connections(server, "GET", PROVIDERS, token) == {401}
    assert "Traceback" not in server.log()
