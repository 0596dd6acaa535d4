"""Limits over gunicorn: exact across workers, a dead worker's slot given back, the real
OpenAI client's retry after Retry-After, and a flood of streams from one token that leaves
the service answering. The address behind a proxy in the access log."""

import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import wait_for
from tests.fakes.model import long_stream_prompt
from tests.test_gateway import chat_body
from tests.test_limits import caller_token

CHAT = "/api/v1/openai/chat/completions"
RESPONSIVE_SECONDS = 0.1


def long_stream_body(pieces, interval):
    return chat_body(stream=True, messages=[{"role": "user", "content": long_stream_prompt(pieces, interval)}])


def calls_at_once(base_urls, secret, count, **fields):
    """`count` chat calls fired together, each on a new connection (so the kernel spreads them
    over the workers), taking turns over the servers: their statuses."""
    start_together = threading.Barrier(count)

    def call(number):
        with httpx.Client(base_url=base_urls[number % len(base_urls)], timeout=60) as client:
            start_together.wait()
            answer = client.post(CHAT, json=chat_body(**fields), headers={"Authorization": f"Bearer {secret}"})
            if answer.status_code not in (200, 429):
                print("unexpected answer:", answer.status_code, answer.text)  # shown if the test fails
            return answer.status_code

    with ThreadPoolExecutor(max_workers=count) as pool:
        return sorted(pool.map(call, range(count)))


def admitting_processes(log):
    """The worker pids that answered a call with 200, from these JSON access lines."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line["process"] for line in lines if line.get("path") == CHAT and line.get("status") == 200]


def test_requests_per_minute_is_exact_across_workers(start_gunicorn, registry, upstream):
    server = start_gunicorn(workers=2, LOG_FORMAT="json")
    # A burst may all be accepted by one worker: bursts, each with a token of its own, until
    # both workers admitted calls of the same burst.
    for burst in range(1, 6):
        logged_before = len(server.log())
        secret = caller_token(registry, requests_per_minute=10)
        assert calls_at_once([server.base_url], secret, 40) == [200] * 10 + [429] * 30
        assert len(upstream.calls) == 10 * burst

        def admitting(logged_before=logged_before):
            return admitting_processes(server.log()[logged_before:])

        assert wait_for(lambda: len(admitting()) == 10)
        if len(set(admitting())) == 2:
            return
    pytest.fail("one worker admitted every call of five bursts")


def test_max_parallel_is_exact_across_workers(start_gunicorn, registry, upstream):
    server = start_gunicorn(workers=2)
    secret = caller_token(registry, max_parallel=3)
    upstream.delay = 2.0  # every call admitted is still in flight when the last arrives
    assert calls_at_once([server.base_url], secret, 16) == [200] * 3 + [429] * 13


def test_a_slot_held_by_a_killed_worker_comes_back_after_the_gateway_timeout(start_gunicorn, registry, upstream):
    gateway_timeout = 2
    server = start_gunicorn(workers=1, REGISTRY_GATEWAY_TIMEOUT=str(gateway_timeout))
    secret = caller_token(registry, max_parallel=1)
    headers = {"Authorization": f"Bearer {secret}"}
    [worker] = server.worker_pids()
    body = long_stream_body(100, 0.5)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        with client.stream("POST", CHAT, json=body, headers=headers) as streaming:
            assert streaming.status_code == 200
            admitted_at = time.monotonic()
            os.kill(worker, signal.SIGKILL)  # the call's slot is left held in the database
        assert wait_for(lambda: server.worker_pids() not in ([], [worker]))
        server.wait_until_ready()  # the new worker listening
        refused = client.post(CHAT, json=chat_body(), headers=headers)
        assert refused.status_code == 429, refused.text
        while client.post(CHAT, json=chat_body(), headers=headers).status_code == 429:
            assert time.monotonic() - admitted_at < gateway_timeout + 60 + 5, "the slot did not come back"
            time.sleep(1)
    assert time.monotonic() - admitted_at > gateway_timeout  # not before its call could have ended


def test_the_openai_clients_retry_waits_for_retry_after(start_gunicorn, registry, upstream):
    server = start_gunicorn(workers=1)
    secret = caller_token(registry, max_parallel=1)

    def client(max_retries):
        return openai.OpenAI(base_url=f"{server.base_url}/api/v1/openai", api_key=secret, max_retries=max_retries)

    def chat(openai_client):
        return openai_client.chat.completions.create(**chat_body())

    upstream.delay = 0.6
    with client(0) as first, client(0) as impatient, client(1) as patient:
        running = threading.Thread(target=chat, args=(first,))
        running.start()
        assert wait_for(lambda: upstream.calls, timeout=5)
        with pytest.raises(openai.RateLimitError) as refused:
            chat(impatient)
        assert refused.value.response.headers["Retry-After"] == "1"
        assert refused.value.body["code"] == "rate_limit_exceeded"
        started = time.monotonic()
        answer = chat(patient)  # refused too, then retried a second later, when the first call is over
        waited = time.monotonic() - started
        running.join()
    assert answer.choices[0].message.content == "Hello!"
    assert waited >= 1.0
    assert len(upstream.calls) == 2


# A flood of streams from one token ------------------------------------------------------------

FLOOD_STREAMS = 2300
STREAM_SECONDS = 25  # each admitted stream is held this long: every measurement falls within it


def flood(port, secret, count, sent, statuses):
    """Open `count` streams at once, as a client process of its own; tell `sent` when every
    request is out, then read each answer to its end; put the statuses in `statuses`."""
    body = json.dumps(long_stream_body(STREAM_SECONDS, 1.0)).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: registry\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    async def one_stream(out):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + body)
            await writer.drain()
        except OSError:
            return "not connected"
        finally:
            out.release()
        try:
            status_line = await asyncio.wait_for(reader.readline(), 60)
            while await asyncio.wait_for(reader.read(65536), 60):
                pass
            return status_line.split(b" ")[1].decode() if status_line else "closed"
        except (OSError, TimeoutError):
            return "broken"
        finally:
            writer.close()

    async def all_streams():
        out = asyncio.Semaphore(0)
        streams = [asyncio.ensure_future(one_stream(out)) for _ in range(count)]
        for _ in range(count):
            await out.acquire()
        sent.set()
        return await asyncio.gather(*streams)

    outcomes = asyncio.run(all_streams())
    statuses.put({outcome: outcomes.count(outcome) for outcome in set(outcomes)})


def median_seconds(call, rounds):
    timings = []
    for _ in range(rounds):
        started = time.monotonic()
        assert call().status_code == 200
        timings.append(time.monotonic() - started)
        time.sleep(0.1)
    return statistics.median(timings), timings


@pytest.mark.timed
def test_a_flood_of_streams_from_one_token_leaves_health_and_admin_reads_answering(start_gunicorn, registry, upstream):
    server = start_gunicorn(workers=2)
    secret = caller_token(registry)  # no max_parallel: the default, 32 a worker
    admin = server.client("admin")
    assert admin.get("/api/v1/model_providers").status_code == 200  # its password verified already
    sent, statuses = multiprocessing.Event(), multiprocessing.Queue()
    flooding = multiprocessing.Process(target=flood, args=(server.port, secret, FLOOD_STREAMS, sent, statuses))
    flooding.start()
    try:
        assert sent.wait(30), "the flood could not send its requests"
        # The first answers wait for the workers to refuse the burst ahead of them (a few seconds
        # on a busy machine); then the streams are held, and the service answers as if idle.
        with httpx.Client(base_url=server.base_url, limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
            health, health_timings = median_seconds(lambda: fresh.get("/healthz", timeout=30), rounds=15)
        admin_read, admin_timings = median_seconds(lambda: admin.get("/api/v1/model_providers", timeout=30), rounds=15)
        held = len(upstream.calls)
        assert flooding.is_alive(), "the flood was over before the measurements were"
    finally:
        outcomes = statuses.get(timeout=120)
        flooding.join(timeout=30)
        admin.close()
    assert health < RESPONSIVE_SECONDS, health_timings
    assert admin_read < RESPONSIVE_SECONDS, admin_timings
    assert held == 2 * 32
    assert outcomes == {"200": 2 * 32, "429": FLOOD_STREAMS - 2 * 32}, outcomes


# Behind a proxy ------------------------------------------------------------------------------


def test_the_access_log_names_the_forwarded_address_only_behind_trusted_proxies(start_gunicorn):
    forged = {"X-Forwarded-For": "203.0.113.7"}
    trusting, untrusting = start_gunicorn(workers=1, REGISTRY_PROXY_HOPS="1"), start_gunicorn(workers=1)
    for server in (trusting, untrusting):
        assert httpx.get(f"{server.base_url}/healthz", headers=forged).status_code == 200
    assert wait_for(lambda: '203.0.113.7 "GET /healthz"' in trusting.log())
    assert wait_for(lambda: '127.0.0.1 "GET /healthz"' in untrusting.log())
    assert "203.0.113.7" not in untrusting.log()
