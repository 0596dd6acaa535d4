"""Slow clients and slow or hostile upstreams, over gunicorn: the service keeps answering.

Each test reproduces one slow or hostile party (a client, an upstream, a flood of hashes or
a held write lock) and checks, meanwhile, that `/healthz` (on a new connection) and a
reader's GET answer within 100 ms.
"""

import contextlib
import json
import socket
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import SQLITE_ONLY, provider_body, wait_for

pytestmark = pytest.mark.timed

PROVIDERS = "/api/v1/model_providers"
RESPONSIVE_SECONDS = 0.1


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def stored_provider(server, **fields):
    with server.client("admin") as admin:
        created = admin.post(PROVIDERS, params={"verify": "false"}, json=provider_body(**fields))
    assert created.status_code == 201, created.text
    return created.json()["id"]


def assert_responsive(server, reader, provider_id, rounds=7):
    """/healthz on a new connection and a reader's GET on its kept-alive one answer, typically
    within 100 ms (the median of the rounds; the slowest within 500 ms on a busy shared machine)."""
    new_connections = httpx.Client(base_url=server.base_url, limits=httpx.Limits(max_keepalive_connections=0))
    health_seconds, get_seconds = [], []
    for _ in range(rounds):
        health, seconds = timed(lambda: new_connections.get("/healthz", timeout=10))
        assert health.status_code == 200
        health_seconds.append(seconds)
        provider, seconds = timed(lambda: reader.get(f"{PROVIDERS}/{provider_id}"))
        assert provider.status_code == 200
        get_seconds.append(seconds)
        time.sleep(0.1)
    new_connections.close()
    for seconds in (health_seconds, get_seconds):
        assert statistics.median(seconds) < RESPONSIVE_SECONDS and max(seconds) < 0.5, seconds


def responsive_reader(server):
    """A reader whose password the workers have verified already (the slow hash is paid),
    the worker of its own kept-alive connection certainly: SO_REUSEPORT may hand every
    warming connection to the same worker."""
    reader = server.client("reader")
    for _ in range(4):
        with server.client("reader") as warming:
            assert warming.get("/api/v1/configurations/system").status_code == 200
    assert reader.get("/api/v1/configurations/system").status_code == 200
    return reader


def test_slow_header_connections_do_not_starve_the_others(start_gunicorn):
    server = start_gunicorn()
    provider_id = stored_provider(server)
    reader = responsive_reader(server)
    head = b"GET /healthz HTTP/1.1\r\nHost: registry\r\nX-Slow: " + b"s" * 100
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    stop = threading.Event()

    def send_slowly():
        for byte in head:
            for connection in slow:
                with contextlib.suppress(OSError):  # the server gave up on it
                    connection.send(bytes([byte]))
            if stop.wait(2):
                return

    sender = threading.Thread(target=send_slowly)
    sender.start()
    try:
        time.sleep(0.5)
        assert_responsive(server, reader, provider_id)
    finally:
        stop.set()
        sender.join()
    # A client has the keep-alive time (5 s) to send its request head, then is let go.
    for connection in slow:
        connection.settimeout(15)
        with contextlib.suppress(ConnectionResetError):
            assert connection.recv(1) == b""
        connection.close()
    reader.close()


def test_creates_waiting_on_a_silent_upstream_do_not_starve_the_others(start_gunicorn, fake_upstream):
    server = start_gunicorn(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_UPSTREAM_TIMEOUT="6")
    upstream = fake_upstream()
    upstream.silent = True  # accepts, reads the request, never answers
    provider_id = stored_provider(server, base_url="https://api.example.com/v1")
    reader = responsive_reader(server)
    admin = server.client("admin")

    def create(number):
        return admin.post(PROVIDERS, json=provider_body(base_url=f"{upstream.base_url}/{number}"))

    with ThreadPoolExecutor(max_workers=32) as pool:
        creates = [pool.submit(create, number) for number in range(32)]
        assert wait_for(lambda: upstream.hits == 32), f"only {upstream.hits} of 32 creates reached the upstream"
        assert_responsive(server, reader, provider_id)
        answers = [create.result() for create in creates]
    for answer in answers:
        assert answer.status_code == 400, answer.text
        assert "did not answer within 6 s (timeout)" in answer.json()["detail"]
    assert reader.get(PROVIDERS).json()["total_count"] == 1
    admin.close()
    reader.close()


def test_a_trickling_upstream_fails_at_the_deadline(start_gunicorn, fake_upstream):
    server = start_gunicorn(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_UPSTREAM_TIMEOUT="2")
    upstream = fake_upstream()
    upstream.trickle_interval = 0.5  # each read is quick; the whole answer would take over a minute
    with server.client("admin") as admin:
        created, seconds = timed(
            lambda: admin.post(PROVIDERS, json=provider_body(base_url=upstream.base_url, api_key=upstream.api_key))
        )
    assert created.status_code == 400, created.text
    assert "did not answer within 2 s (timeout)" in created.json()["detail"]
    assert 1.5 < seconds < 4, seconds
    assert upstream.sent_bytes < 10


def test_refreshes_of_a_trickling_upstream_do_not_freeze_the_service(start_gunicorn, fake_upstream):
    server = start_gunicorn(REGISTRY_UPSTREAM_TIMEOUT="2")
    upstream = fake_upstream()
    upstream.trickle_interval = 0.5
    trickling_id = stored_provider(server, base_url=upstream.base_url, api_key=upstream.api_key)
    reader = responsive_reader(server)

    def list_models():  # the one catalog route that asks the upstream (readers only read the index)
        with server.client("admin") as refreshing_admin:
            return timed(lambda: refreshing_admin.get(f"{PROVIDERS}/{trickling_id}/models?refresh=true"))

    with ThreadPoolExecutor(max_workers=8) as pool:
        listings = [pool.submit(list_models) for _ in range(8)]
        assert wait_for(lambda: upstream.hits == 8)
        assert_responsive(server, reader, trickling_id, rounds=3)
        outcomes = [listing.result() for listing in listings]
    for listed, seconds in outcomes:
        assert listed.status_code == 502 and "(timeout)" in listed.json()["detail"]
        assert seconds < 4, seconds
    reader.close()


OPENAI_ENTRIES = [
    {"id": "nan-created", "created": "NaN"},
    {"id": "infinite-created", "created": "1e999"},
    {"id": "negative-created", "created": -1},
    {"id": "far-future", "created": 99999999999},
    {"id": "not-a-date", "created": "yesterday"},
    {"id": 5},
    {"id": ""},
    {"id": "x" * 300},
    {"id": "nul\u0000in-id"},
    {"id": "lone-\ud800-surrogate"},
    {"id": "shapeless-owner", "owned_by": {"name": "x"}},
    "not an object",
    None,
    {"id": "gpt-4o", "created": 1700000000, "owned_by": "openai"},
]


def openai_listing(entries):
    """A listing as raw JSON, with NaN and 1e999 written as bare tokens, as a hostile upstream would."""
    body = json.dumps({"object": "list", "data": entries})
    return body.replace('"NaN"', "NaN").replace('"1e999"', "1e999").encode()


HOSTILE_LISTINGS = {
    "nested 200,000 deep": (b'{"data": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deep"),
    "data that is not a list": (b'{"object": "list", "data": "everything"}', "no model list in data"),
    "a body that is not an object": (b"[1, 2, 3]", "no model list in data"),
    "NaN alone": (b"NaN", "no model list in data"),
    "not UTF-8": (b'{"data": ["\xff\xfe"]}', "not JSON"),
}


def hostile_upstream(fake_upstream, body, flavor="openai"):
    upstream = fake_upstream(flavor=flavor)
    upstream.answer_with(200, body)
    return upstream


def test_hostile_listings_are_filtered_or_failed_never_a_500(start_gunicorn, fake_upstream):
    server = start_gunicorn(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_UPSTREAM_TIMEOUT="5")
    admin, reader = server.client("admin"), server.client("reader")
    filtered = hostile_upstream(fake_upstream, openai_listing(OPENAI_ENTRIES))
    created = admin.post(PROVIDERS, json=provider_body(base_url=filtered.base_url, api_key=filtered.api_key))
    assert created.status_code == 201, created.text
    filtered_id = created.json()["id"]
    listed = reader.get(f"{PROVIDERS}/{filtered_id}/models").json()
    assert [model["id"] for model in listed["items"]] == ["openai:gpt-4o"]
    assert listed["items"][0]["created"] == 1700000000
    assert wait_for(lambda: "13 of 14 model entries" in server.log())

    for name, (body, reason) in HOSTILE_LISTINGS.items():
        upstream = hostile_upstream(fake_upstream, body)
        refused = admin.post(PROVIDERS, json=provider_body(base_url=upstream.base_url))
        assert refused.status_code == 400, (name, refused.text)
        assert reason in refused.json()["detail"], name
    watsonx = hostile_upstream(
        fake_upstream, b'{"resources": [{"model_id": "ibm/granite", "lifecycle": 5}]}', "watsonx"
    )
    refused = admin.post(
        PROVIDERS, json=provider_body(type="watsonx", base_url=watsonx.base_url, watsonx_project_id="p")
    )
    assert refused.status_code == 400 and "lifecycle" in refused.json()["detail"]

    # Stored without verification, then served by every catalog route and probed.
    stored = [
        stored_provider(server, base_url=hostile_upstream(fake_upstream, body).base_url)
        for body, _ in HOSTILE_LISTINGS.values()
    ]
    stored.append(stored_provider(server, type="watsonx", base_url=watsonx.base_url, watsonx_project_id="p"))
    catalog = [
        reader.get("/api/v1/openai/models"),
        reader.post(f"{PROVIDERS}/match", json={"capability": "llm", "suggested_models": ["gpt-4o"]}),
        server.client("service").post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-4o"}),
    ]
    assert [answer.status_code for answer in catalog] == [200, 200, 200], [answer.text for answer in catalog]
    assert "openai:gpt-4o" in [model["id"] for model in catalog[0].json()["data"]]
    for provider_id in stored:
        assert reader.get(f"{PROVIDERS}/{provider_id}/models").json()["items"] == []
        assert admin.get(f"{PROVIDERS}/{provider_id}/models?refresh=true").status_code == 502
        checked = admin.post(f"{PROVIDERS}/{provider_id}/check")
        assert checked.status_code == 200 and checked.json()["last_error"], checked.text
    admin.close()
    reader.close()


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_200_mb_listing_is_refused_without_the_worker_growing(start_gunicorn, fake_upstream):
    server = start_gunicorn(workers=1, REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_UPSTREAM_TIMEOUT="20")
    [worker] = server.worker_pids()
    normal, huge = fake_upstream(), fake_upstream()
    huge.streamed_bytes = 200 * 1024 * 1024
    with server.client("admin") as admin:
        warm_up = admin.post(PROVIDERS, json=provider_body(base_url=normal.base_url, api_key=normal.api_key))
        assert warm_up.status_code == 201, warm_up.text
        before = rss_bytes(worker)
        refused = admin.post(PROVIDERS, json=provider_body(base_url=huge.base_url, api_key=huge.api_key))
        grown = rss_bytes(worker) - before
    assert refused.status_code == 400, refused.text
    assert "over 4 MiB (refused)" in refused.json()["detail"]
    assert huge.sent_bytes < 32 * 1024 * 1024  # the registry hung up early, not after 200 MB
    # The cap (4 MiB read before refusing) and allocator slack; unbounded, it grew by 650 MiB.
    assert grown <= 5 * 1024 * 1024, f"worker grew by {grown / 2**20:.1f} MiB"


def test_a_flood_of_slow_hashes_does_not_stall_the_others(start_gunicorn):
    server = start_gunicorn()
    provider_id = stored_provider(server)
    reader = responsive_reader(server)
    stop = threading.Event()

    def guess_names(number):
        with httpx.Client(base_url=server.base_url, timeout=30) as guesser:
            for attempt in range(10_000):
                if stop.is_set():
                    return
                guesser.get(PROVIDERS, auth=(f"guess-{number}-{attempt}", "wrong password"))

    with ThreadPoolExecutor(max_workers=16) as pool:
        guessers = [pool.submit(guess_names, number) for number in range(16)]
        try:
            time.sleep(1)
            assert_responsive(server, reader, provider_id)
        finally:
            stop.set()
        for guesser in guessers:
            guesser.result()
    reader.close()


@SQLITE_ONLY
def test_a_create_waiting_for_the_write_lock_does_not_stall_its_worker(start_gunicorn, instance_path):
    """SQLite's busy handler would sleep in C until the lock came free, and the worker's
    other connections with it: the registry waits in gevent's sleeps instead."""
    server = start_gunicorn(workers=1)
    provider_id = stored_provider(server)
    reader = responsive_reader(server)
    other_writer = sqlite3.connect(instance_path / "registry.db", isolation_level=None)
    other_writer.execute("BEGIN IMMEDIATE")
    with server.client("admin") as admin, ThreadPoolExecutor(max_workers=1) as pool:
        try:
            waiting = pool.submit(
                admin.post, PROVIDERS, params={"verify": "false"}, json=provider_body(base_url="http://waits.test/v1")
            )
            time.sleep(0.5)
            assert not waiting.done()
            assert_responsive(server, reader, provider_id)
        finally:
            other_writer.rollback()
        assert waiting.result().status_code == 201
    other_writer.close()
    reader.close()
