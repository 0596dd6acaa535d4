"""The background jobs run in a process of their own beside gunicorn's workers, started and
stopped with the server."""

import json
import math
import os
import signal
import threading
import time

import httpx
import pytest
import sqlalchemy as sa

from access.crypto import cipher
from models import PROVIDERS, db
from tests.conftest import client_as, provider_body, wait_for

SILENT_PROVIDERS = 1000
HEALTHZ_P99_SECONDS = 0.1
GATEWAY_TIMEOUT_SECONDS = 1.0
LATE_BY_AT_MOST_SECONDS = 0.5
MEASURED_SECONDS = 4.0  # a whole probe round: its probes start, time out after 2 s, and are written


def add_silent_providers(app, black_hole, count):
    """`count` providers whose upstream accepts the probe's connection and never answers."""
    with app.app_context():
        sealed_api_key = cipher.seal("sk-silent")
        rows = [
            {"type": "openai", "base_url": black_hole.base_url(f"/silent{number}/v1"), "sealed_api_key": sealed_api_key}
            for number in range(count)
        ]
        db.session.execute(sa.insert(PROVIDERS), rows)
        db.session.commit()


def register_model_server(app, upstream):
    body = provider_body(type=upstream.flavor, base_url=upstream.base_url, api_key=upstream.api_key)
    created = client_as(app, "admin").post("/api/v1/model_providers", json=body)
    assert created.status_code == 201, created.get_json()


def process_of_request(server):
    """{request id: pid of the worker that answered it}, from the access lines (LOG_FORMAT=json)."""
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return {line["request_id"]: line["process"] for line in lines if line["logger"] == "gunicorn.access"}


def healthz_seconds(server, until):
    """(request id, seconds) of each /healthz asked on a new connection until `until` (monotonic)."""
    timings = []
    with httpx.Client(base_url=server.base_url, limits=httpx.Limits(max_keepalive_connections=0)) as new_connections:
        while time.monotonic() < until:
            started = time.monotonic()
            answer = new_connections.get("/healthz", timeout=10)
            timings.append((answer.headers["X-Request-ID"], time.monotonic() - started))
            assert answer.status_code == 200
            time.sleep(0.005)
    return timings


def caller_token(app):
    """An API token of role caller: checked by a digest, where a password costs a slow hash."""
    created = client_as(app, "service").post("/api/v1/tokens", json={"name": "agent", "role": "caller"})
    assert created.status_code == 201, created.get_json()
    return created.get_json()["token"]


def gateway_seconds(server, token, until):
    """(status, seconds) of each chat call to the model that never answers, until `until`."""
    body = {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    timings = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as caller:
        while time.monotonic() < until:
            started = time.monotonic()
            answer = caller.post("/api/v1/openai/chat/completions", json=body, headers={"Connection": "close"})
            timings.append((answer.status_code, time.monotonic() - started))
    return timings


def p99(seconds):
    """The nearest-rank 99th percentile: the smallest value that 99 % of them do not exceed."""
    return sorted(seconds)[math.ceil(0.99 * len(seconds)) - 1]


@pytest.mark.timed
def test_a_probe_round_of_silent_providers_delays_no_worker(start_gunicorn, make_app, black_hole, fake_upstream):
    app = make_app(REGISTRY_VERIFY_ON_CREATE="true")
    add_silent_providers(app, black_hole, SILENT_PROVIDERS)
    upstream = fake_upstream(api_key="sk-model")
    register_model_server(app, upstream)
    upstream.delay = 30  # the gateway's calls wait on it until their deadline
    token = caller_token(app)
    server = start_gunicorn(
        workers=2,
        LOG_FORMAT="json",
        REGISTRY_PROBE_INTERVAL="1",
        REGISTRY_UPSTREAM_TIMEOUT="2",
        REGISTRY_GATEWAY_TIMEOUT=str(GATEWAY_TIMEOUT_SECONDS),
        REGISTRY_PROBE_FAILURES="100",  # the model server stays online whatever its probes meet
    )
    assert wait_for(lambda: len(black_hole.accepted) > 0, timeout=20)  # a probe round runs
    until = time.monotonic() + MEASURED_SECONDS
    gateway_timings = []
    calls = threading.Thread(target=lambda: gateway_timings.extend(gateway_seconds(server, token, until)))
    calls.start()
    healthz_timings = healthz_seconds(server, until)
    calls.join()

    assert len(black_hole.accepted) >= SILENT_PROVIDERS / 2  # the round's probes were under way meanwhile
    assert gateway_timings and all(status == 504 for status, _ in gateway_timings), gateway_timings
    assert max(seconds for _, seconds in gateway_timings) < GATEWAY_TIMEOUT_SECONDS + LATE_BY_AT_MOST_SECONDS
    assert wait_for(lambda: all(request_id in process_of_request(server) for request_id, _ in healthz_timings))
    worker_of = process_of_request(server)
    seconds_per_worker = {}
    for request_id, seconds in healthz_timings:
        seconds_per_worker.setdefault(worker_of[request_id], []).append(seconds)
    assert set(seconds_per_worker) == set(server.worker_pids())
    for worker_seconds in seconds_per_worker.values():
        assert p99(worker_seconds) < HEALTHZ_P99_SECONDS, sorted(worker_seconds)[-5:]


def is_running(pid):
    """True while `pid` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_jobs_process_is_started_again_when_it_dies_and_stops_with_the_server(start_gunicorn):
    server = start_gunicorn(workers=1)
    assert wait_for(lambda: len(server.jobs_pids()) == 1)
    [first] = server.jobs_pids()
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: server.jobs_pids() not in ([], [first]))
    [second] = server.jobs_pids()
    server.kill()
    assert not is_running(second)
    assert f"the jobs process (pid: {first}) ended" in server.log()


def test_a_reload_starts_a_new_jobs_process(start_gunicorn):
    server = start_gunicorn(workers=1)
    assert wait_for(lambda: len(server.jobs_pids()) == 1)
    [before] = server.jobs_pids()
    os.kill(server.process.pid, signal.SIGHUP)
    assert wait_for(lambda: server.jobs_pids() not in ([], [before]))
    assert not is_running(before)
    assert f"the jobs process (pid: {before}) ended" not in server.log()  # a restart, not a crash


def test_the_jobs_process_of_a_killed_server_ends_too(start_gunicorn):
    server = start_gunicorn(workers=1)
    assert wait_for(lambda: len(server.jobs_pids()) == 1)
    [jobs_pid] = server.jobs_pids()
    os.kill(server.process.pid, signal.SIGKILL)  # the master gets no chance to stop it
    assert wait_for(lambda: not is_running(jobs_pid), timeout=5)
