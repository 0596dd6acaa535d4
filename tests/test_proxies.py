"""Clients behind reverse proxies: with REGISTRY_PROXY_HOPS the client's address (login
limits, the audit, logs) is the one X-Forwarded-For names that many proxies back; without
it, a forged X-Forwarded-For changes nothing."""

from tests.conftest import PASSWORDS, basic_auth

PROVIDERS = "/api/v1/model_providers"
PROXY = "10.0.0.9"
ALICE, BOB = "203.0.113.7", "203.0.113.8"


def request_from(app, forwarded_for, username="admin", password=None, method="GET", path=PROVIDERS, **kwargs):
    """A request arriving from the proxy's address, X-Forwarded-For as the proxy (or a forger) set it."""
    headers = {"Authorization": basic_auth(username, password or PASSWORDS[username])}
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    client = app.test_client()
    return client.open(path, method=method, headers=headers, environ_base={"REMOTE_ADDR": PROXY}, **kwargs)


def audited_address(app, forwarded_for):
    """The client address the audit records for a token made through the proxy."""
    created = request_from(app, forwarded_for, method="POST", path="/api/v1/tokens", json={"name": "ci"})
    assert created.status_code == 201
    [event] = request_from(app, None, path="/api/v1/audit", query_string={"target_id": created.get_json()["id"]}).json[
        "items"
    ]
    return event["client_address"]


def locked_out_by_failures(app, failing_from, then_from):
    """Whether the reader's right password (not verified yet) is refused from `then_from` after
    failed logins as the reader from each of `failing_from`."""
    for forwarded_for in failing_from:
        assert request_from(app, forwarded_for, "reader", "wrong").status_code in (401, 429)
    return request_from(app, then_from, "reader").status_code == 429


def test_behind_one_proxy_the_audit_records_the_forwarded_address(make_app):
    app = make_app(REGISTRY_PROXY_HOPS="1")
    assert audited_address(app, ALICE) == ALICE
    assert audited_address(app, f"198.51.100.1, {ALICE}") == ALICE  # only the hop the proxy added is trusted


def test_behind_two_proxies_the_address_two_hops_back_is_the_clients(make_app):
    app = make_app(REGISTRY_PROXY_HOPS="2")
    assert audited_address(app, f"6.6.6.6, 198.51.100.1, {ALICE}") == "198.51.100.1"


def test_behind_a_proxy_one_clients_failures_do_not_lock_out_the_others(make_app):
    app = make_app(REGISTRY_PROXY_HOPS="1", REGISTRY_LOGIN_FAILURES="2")
    assert locked_out_by_failures(app, [ALICE] * 3, ALICE)
    assert request_from(app, BOB, "reader").status_code == 200


def test_without_proxy_hops_a_forged_forwarded_for_changes_nothing(make_app):
    app = make_app(REGISTRY_LOGIN_FAILURES="2")
    assert audited_address(app, ALICE) == PROXY
    # Each failure claims another address: all count against the one they came from.
    assert locked_out_by_failures(app, [ALICE, BOB, "198.51.100.1"], "198.51.100.2")
