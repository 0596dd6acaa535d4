"""Guessing credentials: no user enumeration by cost, and repeated failures are refused with 429."""

import secrets
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import PASSWORDS, basic_auth, wait_for

PROVIDERS = "/api/v1/model_providers"
HOME, ELSEWHERE = "10.0.0.1", "10.0.0.2"


def login(app, username, password, address=HOME):
    client = app.test_client()
    return client.get(
        PROVIDERS, headers={"Authorization": basic_auth(username, password)}, environ_base={"REMOTE_ADDR": address}
    )


def slow_hashes_during(action):
    """The password hashes computed while `action` runs in this thread, by their cost parameters.

    Watches werkzeug's hashing function through the profiler hook, without replacing anything.
    """
    methods = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_hash_internal":
            methods.append(frame.f_locals["method"])

    sys.setprofile(watch)
    try:
        action()
    finally:
        sys.setprofile(None)
    return methods


@pytest.fixture
def patient_app(make_app):
    """An app whose failed-login limit is out of the way of cost measurements."""
    return make_app(REGISTRY_LOGIN_FAILURES="1000")


def test_unknown_user_costs_the_same_hash_as_a_wrong_password(patient_app):
    # The suite's users have a cheap hash: this one has the hash the CLI makes.
    created = patient_app.test_cli_runner().invoke(
        args=["users", "create", "operator", "--role", "admin", "--password-stdin"], input="operator-pass-1\n"
    )
    assert created.exit_code == 0, created.output
    login(patient_app, "operator", "operator-pass-1")  # remembered from now on
    wrong_password = slow_hashes_during(lambda: login(patient_app, "operator", "wrong"))
    unknown_user = slow_hashes_during(lambda: login(patient_app, "nobody", "wrong"))
    remembered = slow_hashes_during(lambda: login(patient_app, "operator", "operator-pass-1"))
    assert len(wrong_password) == 1 and wrong_password[0].startswith("scrypt:")  # one slow hash, its cost
    assert unknown_user == wrong_password
    assert remembered == []


def fail_logins(app, username, count, address=HOME):
    return [login(app, username, "wrong", address).status_code for _ in range(count)]


def test_repeated_failures_are_refused_with_429_and_retry_after(app):
    assert fail_logins(app, "admin", 5) == [401] * 5
    refused = login(app, "admin", PASSWORDS["admin"])  # even the right password, from this address
    assert refused.status_code == 429
    assert refused.content_type == "application/problem+json"
    assert refused.get_json()["status"] == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_the_real_user_elsewhere_and_other_users_here_are_not_locked_out(app):
    fail_logins(app, "admin", 6)
    assert login(app, "admin", PASSWORDS["admin"], address=ELSEWHERE).status_code == 200
    assert login(app, "reader", PASSWORDS["reader"]).status_code == 200


def test_a_password_this_worker_verified_is_not_refused_for_the_guesses_of_others(app):
    assert login(app, "admin", PASSWORDS["admin"]).status_code == 200
    assert fail_logins(app, "admin", 6) == [401] * 5 + [429]  # someone guessing from the same address
    assert login(app, "admin", PASSWORDS["admin"]).status_code == 200


def test_a_demoted_or_deleted_user_is_refused_on_the_next_request(app):
    audit = "/api/v1/audit"
    headers = {"Authorization": basic_auth("admin", PASSWORDS["admin"])}
    assert app.test_client().get(audit, headers=headers).status_code == 200  # the password is now remembered
    cli = app.test_cli_runner()
    assert cli.invoke(args=["users", "set-role", "admin", "reader"]).exit_code == 0
    assert app.test_client().get(audit, headers=headers).status_code == 403
    assert cli.invoke(args=["users", "delete", "admin"]).exit_code == 0
    assert app.test_client().get(audit, headers=headers).status_code == 401


def test_unknown_names_are_limited_like_known_ones(app):
    assert fail_logins(app, "nobody", 6) == [401] * 5 + [429]


def test_a_success_clears_the_failures(app):
    fail_logins(app, "admin", 4)
    assert login(app, "admin", PASSWORDS["admin"]).status_code == 200
    assert fail_logins(app, "admin", 5) == [401] * 5


def test_refusal_ends_when_the_window_has_passed(make_app):
    app = make_app(REGISTRY_LOGIN_FAILURES="2", REGISTRY_LOGIN_WINDOW="1")
    assert fail_logins(app, "admin", 3) == [401, 401, 429]
    time.sleep(1.1)
    assert login(app, "admin", PASSWORDS["admin"]).status_code == 200


def random_names(count):
    return [f"guess-{secrets.token_hex(6)}" for _ in range(count)]


@pytest.fixture
def strict_app(make_app):
    """An app allowing 2 failed logins, so 8 across names per address: 8 slow hashes, not 20."""
    return make_app(REGISTRY_LOGIN_FAILURES="2")


def test_failures_across_names_are_limited_per_address(strict_app):
    """Four times REGISTRY_LOGIN_FAILURES: random names cannot buy unlimited slow hashes."""
    app = strict_app
    assert login(app, "reader", PASSWORDS["reader"]).status_code == 200  # verified before the flood
    statuses = [login(app, name, "wrong").status_code for name in random_names(9)]
    assert statuses == [401] * 8 + [429]
    refused = login(app, "guess-new", "wrong")
    assert refused.status_code == 429 and "your address" in refused.get_json()["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert slow_hashes_during(lambda: login(app, "guess-other", "wrong")) == []
    assert login(app, "reader", PASSWORDS["reader"]).status_code == 200  # remembered: never refused
    assert login(app, "admin", PASSWORDS["admin"]).status_code == 429  # a password never verified here
    assert login(app, "admin", PASSWORDS["admin"], address=ELSEWHERE).status_code == 200


def test_a_success_does_not_clear_the_failures_across_names(strict_app):
    app = strict_app
    for name in random_names(7):
        login(app, name, "wrong")
    assert login(app, "reader", PASSWORDS["reader"]).status_code == 200
    assert [login(app, name, "wrong").status_code for name in random_names(2)] == [401, 429]


def test_limit_over_a_socket_keys_on_the_client_address(start_gunicorn):
    server = start_gunicorn(workers=1)

    def client_from(address, password):
        transport = httpx.HTTPTransport(local_address=address)
        return httpx.Client(base_url=server.base_url, auth=("admin", password), transport=transport)

    with client_from("127.0.0.1", "wrong") as guesser:
        statuses = [guesser.get(PROVIDERS).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    with client_from("127.0.0.2", PASSWORDS["admin"]) as admin_elsewhere:
        assert admin_elsewhere.get(PROVIDERS).status_code == 200


@pytest.mark.timed
def test_a_flood_of_random_names_leaves_a_known_reader_answered_promptly(start_gunicorn):
    """16 clients sending random user names: after the per-address limit they cost no
    slow hash, and a reader whose password each worker has verified keeps its answers."""
    server = start_gunicorn(workers=2)
    for _ in range(20):  # fresh connections, so each worker verifies the reader's password
        with server.client("reader") as reader:
            assert reader.get(PROVIDERS).status_code == 200
    stop = threading.Event()
    flood_statuses = []

    def flood(_):
        with httpx.Client(base_url=server.base_url, timeout=30) as guesser:
            while not stop.is_set():
                flood_statuses.append(guesser.get(PROVIDERS, auth=(random_names(1)[0], "wrong")).status_code)

    latencies = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        flooders = [pool.submit(flood, number) for number in range(16)]
        # The limit is reached after as many slow hashes as it allows, however long the machine takes.
        assert wait_for(lambda: 429 in flood_statuses, timeout=60)
        with server.client("reader") as reader:
            for _ in range(40):
                started = time.monotonic()
                assert reader.get(PROVIDERS).status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)
        stop.set()
        for flooder in flooders:
            flooder.result()
    assert set(flood_statuses) == {401, 429}
    # 4 x REGISTRY_LOGIN_FAILURES per worker, plus the guesses already in its 4 threads when it was reached
    assert flood_statuses.count(401) <= 2 * (20 + 4)
    assert statistics.median(latencies) < 0.1  # 5 ms unloaded; 1.5 s with a slow hash per guess
