"""Usage: one event per gateway call, written off the call; the usage report, per role; the
retention; nothing secret in any usage row; nothing lost to a graceful stop, at most the
last second to a killed worker."""

import json
import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timedelta

import httpx
import openai
import pytest
import sqlalchemy as sa

from models import USAGE_DAYS, USAGE_EVENTS, db, utcnow
from observability.usage import MAX_PENDING, prune_old_usage
from tests.conftest import SQLITE_ONLY, client_as, provider_body, wait_for
from tests.fakes.model import USAGE
from tests.test_gateway import CALLER, ask, silent_after_first_chunk
from tests.test_metrics import delta, parse, scrape

PROVIDERS = "/api/v1/model_providers"
CHAT = "/api/v1/openai/chat/completions"
EMBEDDINGS = "/api/v1/openai/embeddings"
USAGE_REPORT = "/api/v1/usage"
MODEL_KEY = "sk-model-key-USAGE-SECRET-5150"
PROMPT = "a prompt that is PROMPT-MARKER-31337"
ANSWER_PIECES = ["ANSWER-", "MARKER-", "4711"]


def register(app, server, **fields):
    body = provider_body(type=server.flavor, base_url=server.base_url, api_key=server.api_key, **fields)
    response = client_as(app, "admin").post(PROVIDERS, json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def new_token(app, owner, role):
    """(id, secret) of a new token of `owner`."""
    created = client_as(app, owner).post("/api/v1/tokens", json={"name": f"{owner}-{role}", "role": role})
    assert created.status_code == 201, created.get_json()
    return created.get_json()["id"], created.get_json()["token"]


def bearer(app, secret):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    return client


def chat_body(model="openai:gpt-4o", **fields):
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **fields}


def sse_data(response):
    """The JSON documents of a streamed answer's events (without the final [DONE])."""
    events = [event.removeprefix("data: ") for event in response.get_data(as_text=True).split("\n\n") if event]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def stored_events(app):
    """Every usage event in the database, oldest first, once the app's pending ones are written."""
    assert app.extensions["usage"].flush()
    with app.app_context():
        rows = db.session.execute(sa.select(USAGE_EVENTS).order_by(USAGE_EVENTS.c.id)).mappings().all()
        db.session.remove()
    return [dict(row) for row in rows]


def only_event(app):
    [event] = stored_events(app)
    return event


def report(client, **query):
    response = client.get(USAGE_REPORT, query_string=query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["items"]


# One event per call, on every protocol ------------------------------------------------------


def test_a_chat_completion_records_one_event_with_who_what_and_the_tokens(registry, fake_upstream):
    provider_id = register(registry, fake_upstream(api_key=MODEL_KEY))
    token_id, secret = new_token(registry, "service", "caller")
    before = utcnow()
    response = bearer(registry, secret).post(CHAT, json=chat_body())
    assert response.status_code == 200
    event = only_event(registry)
    assert before <= event["created_at"] <= utcnow() and event["day"] == event["created_at"].date()
    assert (event["token_id"], event["username"], event["provider_id"]) == (token_id, "service", provider_id)
    assert (event["model"], event["endpoint"], event["outcome"]) == ("openai:gpt-4o", "chat.completions", "ok")
    assert (event["input_tokens"], event["output_tokens"]) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert event["duration_seconds"] > 0 and event["first_chunk_seconds"] is None


def test_a_stream_records_its_usage_though_the_client_did_not_ask_for_it(registry, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    response = client_as(registry, "service").post(CHAT, json=chat_body(stream=True))
    chunks = sse_data(response)
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)  # the client gets only what it asked
    assert upstream.calls[-1][2]["stream_options"] == {"include_usage": True}  # the upstream was asked all the same
    event = only_event(registry)
    assert (event["input_tokens"], event["output_tokens"]) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    assert event["token_id"] is None and event["username"] == "service"  # Basic credentials
    assert event["outcome"] == "ok" and 0 < event["first_chunk_seconds"] <= event["duration_seconds"]


def test_a_stream_that_asked_for_usage_gets_it_and_records_it(registry, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    body = chat_body(stream=True, stream_options={"include_usage": True})
    chunks = sse_data(client_as(registry, "service").post(CHAT, json=body))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE
    event = only_event(registry)
    assert (event["input_tokens"], event["output_tokens"]) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])


def test_a_watsonx_stream_records_its_usage_and_counts_its_tokens(registry, make_app, fake_upstream, anonymous):
    upstream = fake_upstream("watsonx", api_key="watsonx-key-USAGE", models=["ibm/granite-3-8b-instruct"])
    app = make_app(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_WATSONX_IAM_URL=upstream.iam_url)
    register(app, upstream, watsonx_project_id="project-1")
    before = parse(scrape(anonymous))
    body = chat_body("watsonx:ibm/granite-3-8b-instruct", stream=True)
    chunks = sse_data(client_as(app, "service").post(CHAT, json=body))
    assert all("usage" not in chunk for chunk in chunks)
    event = only_event(app)
    assert (event["input_tokens"], event["output_tokens"]) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
    after = parse(scrape(anonymous))
    labels = {"type": "watsonx", "model": "watsonx:ibm/granite-3-8b-instruct"}
    assert delta(before, after, "registry_gateway_tokens_total", **labels, kind="prompt") == USAGE["prompt_tokens"]
    assert delta(before, after, "registry_gateway_tokens_total", **labels, kind="completion") == 3


def test_embeddings_record_their_input_tokens(registry, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    body = {"model": "openai:text-embedding-3-small", "input": ["one", "two"]}
    assert client_as(registry, "service").post(EMBEDDINGS, json=body).status_code == 200
    event = only_event(registry)
    assert (event["endpoint"], event["model"], event["outcome"]) == (
        "embeddings",
        "openai:text-embedding-3-small",
        "ok",
    )
    assert (event["input_tokens"], event["output_tokens"]) == (2, None)  # the upstream reported no output


def test_an_answer_without_usage_records_no_tokens_rather_than_an_estimate(registry, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    choice = {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    completion = {"id": "c", "object": "chat.completion", "created": 1, "choices": [choice]}
    upstream.script = lambda handler, body: handler.answer(200, completion)
    assert client_as(registry, "service").post(CHAT, json=chat_body()).status_code == 200
    event = only_event(registry)
    assert (event["input_tokens"], event["output_tokens"], event["outcome"]) == (None, None, "ok")


def test_calls_that_fail_are_recorded_with_their_status(registry, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    provider_id = register(registry, upstream)
    service = client_as(registry, "service")
    assert service.post(CHAT, json=chat_body("openai:no-such-model")).status_code == 404
    upstream.fail_with(400, "context too long")
    assert service.post(CHAT, json=chat_body()).status_code == 400
    upstream.fail_with(500)
    assert service.post(CHAT, json=chat_body()).status_code == 502
    upstream.failure = None
    upstream.break_after_chunks = 2  # the stream breaks off after its answer began
    assert "error" in sse_data(service.post(CHAT, json=chat_body(stream=True)))[-1]
    unknown, refused, failed, broken = stored_events(registry)
    assert (unknown["outcome"], unknown["model"], unknown["provider_id"]) == ("404", None, None)
    assert (refused["outcome"], refused["provider_id"]) == ("400", provider_id)
    assert (failed["outcome"], failed["model"]) == ("502", "openai:gpt-4o")
    assert (broken["outcome"], broken["provider_id"]) == ("502", provider_id)
    assert all(event["username"] == "service" for event in (unknown, refused, failed, broken))


# Nothing secret in the usage -----------------------------------------------------------------


def test_no_prompt_answer_key_or_token_secret_is_stored(registry, fake_upstream, databases, instance_path):
    upstream = fake_upstream(api_key=MODEL_KEY)
    upstream.pieces = ANSWER_PIECES
    register(registry, upstream)
    _, secret = new_token(registry, "service", "caller")
    caller = bearer(registry, secret)
    answered = caller.post(CHAT, json=chat_body()).get_json()
    assert answered["choices"][0]["message"]["content"] == "".join(ANSWER_PIECES)
    chunks = sse_data(caller.post(CHAT, json=chat_body(stream=True)))
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == "".join(ANSWER_PIECES)
    assert caller.post(EMBEDDINGS, json={"model": "openai:text-embedding-3-small", "input": PROMPT}).status_code == 200
    upstream.fail_with(400, f"the prompt {PROMPT} is too long for key {MODEL_KEY}")
    assert caller.post(CHAT, json=chat_body()).status_code == 400
    assert len(stored_events(registry)) == 4
    secrets = ("PROMPT-MARKER", "ANSWER-MARKER", "".join(ANSWER_PIECES), MODEL_KEY, secret)
    with registry.app_context():
        usage_rows = [
            *db.session.execute(sa.select(USAGE_EVENTS)).all(),
            *db.session.execute(sa.select(USAGE_DAYS)).all(),
        ]
        db.session.remove()
    assert len(usage_rows) > 4
    assert not any(secret in str(row) for row in usage_rows for secret in secrets)
    stored = databases.stored_bytes(instance_path)  # the whole database: nothing keeps a prompt or an answer
    assert not any(secret.encode() in stored for secret in secrets)


# The report ----------------------------------------------------------------------------------


@pytest.fixture
def calls_by_three(registry, fake_upstream):
    """Calls by service (Basic: 2; its caller token: 1) and by admin (Basic: 1); the token's id."""
    register(registry, fake_upstream(api_key=MODEL_KEY))
    token_id, secret = new_token(registry, "service", "caller")
    for client in (client_as(registry, "service"), client_as(registry, "service"), bearer(registry, secret)):
        assert client.post(CHAT, json=chat_body()).status_code == 200
    assert client_as(registry, "admin").post(CHAT, json=chat_body("openai:no-such-model")).status_code == 404
    registry.extensions["usage"].flush()
    return token_id


def test_an_admin_reads_everyones_usage(registry, calls_by_three):
    rows = report(client_as(registry, "admin"), group_by="user,token")
    per_call = {"input_tokens": USAGE["prompt_tokens"], "output_tokens": USAGE["completion_tokens"]}
    assert rows == [
        {"user": "admin", "token_id": None, "requests": 1, "errors": 1, "input_tokens": 0, "output_tokens": 0},
        {"user": "service", "token_id": None, "requests": 2, "errors": 0, **{k: 2 * v for k, v in per_call.items()}},
        {"user": "service", "token_id": calls_by_three, "requests": 1, "errors": 0, **per_call},
    ]
    assert [row["user"] for row in report(client_as(registry, "admin"), group_by="user", user="service")] == ["service"]


def test_other_roles_read_only_their_own_users_usage(registry, calls_by_three):
    service_rows = [{"user": "service", "requests": 3}]
    assert slim(report(client_as(registry, "service"), group_by="user")) == service_rows
    _, service_token = new_token(registry, "service", "reader")  # a token acts for its owner
    assert slim(report(bearer(registry, service_token), group_by="user")) == service_rows
    assert report(client_as(registry, "reader"), group_by="user") == []
    _, reader_token = new_token(registry, "reader", "reader")  # a token of another user
    assert report(bearer(registry, reader_token), group_by="user") == []
    assert report(bearer(registry, reader_token), group_by="user", token_id=calls_by_three) == []
    refused = client_as(registry, "service").get(USAGE_REPORT, query_string={"user": "admin"})
    assert refused.status_code == 403 and refused.mimetype == "application/problem+json"
    assert client_as(registry, "service").get(USAGE_REPORT, query_string={"user": "service"}).status_code == 200
    assert registry.test_client().get(USAGE_REPORT).status_code == 401


def slim(rows):
    return [{"user": row["user"], "requests": row["requests"]} for row in rows]


def test_the_report_defaults_to_the_last_30_days_by_day(registry, calls_by_three):
    today = utcnow().date().isoformat()
    rows = report(client_as(registry, "admin"))
    assert [(row["day"], row["requests"], row["errors"]) for row in rows] == [(today, 4, 1)]
    assert set(rows[0]) == {"day", "requests", "errors", "input_tokens", "output_tokens"}
    assert report(client_as(registry, "admin"), until=(utcnow() - timedelta(minutes=5)).isoformat() + "Z") == []
    since, until = utcnow().isoformat() + "Z", (utcnow() - timedelta(days=1)).isoformat() + "Z"
    assert report(client_as(registry, "admin"), since=since, until=until) == []  # an empty range


@pytest.mark.parametrize(
    "query", [{"since": "9999-12-31T12:00:00Z"}, {"until": "0001-01-02T00:00:00Z"}, {"until": "9999-12-31T23:59:59Z"}]
)
def test_a_range_at_the_ends_of_time_is_answered(admin, query):
    assert report(admin, **query) == []


@pytest.mark.parametrize(
    "query, field",
    [
        ({"group_by": "day,week"}, "group_by"),
        ({"group_by": ""}, "group_by"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-13-01T00:00:00Z"}, "until"),
        ({"model": "nul\x00"}, "model"),
    ],
)
def test_a_bad_query_is_a_422_naming_the_parameter(admin, query, field):
    response = admin.get(USAGE_REPORT, query_string=query)
    assert response.status_code == 422 and field in response.get_json()["errors"]


def synthetic_event(at, rng):
    """An event as the gateway records it, at `at`, of random keys."""
    tokens = rng.choice([None, rng.randrange(1, 500)])
    return {
        "created_at": at,
        "day": at.date(),
        "token_id": rng.choice([None, "token-a", "token-b"]),
        "user_id": 2,
        "username": "service",
        "provider_id": rng.choice([None, "provider-a", "provider-b"]),
        "model": rng.choice([None, "openai:gpt-4o", "openai:gpt-4o-mini"]),
        "endpoint": "chat.completions",
        "input_tokens": tokens,
        "output_tokens": rng.choice([None, 3]),
        "outcome": rng.choice(["ok", "ok", "502"]),
        "duration_seconds": 0.1,
        "first_chunk_seconds": None,
    }


def expected_rows(events, group_by, since, until, filters):
    """The report, added up here from the events themselves."""
    names = {"day": "day", "model": "model", "provider": "provider_id", "token": "token_id", "user": "username"}
    sums = {}
    for event in events:
        if event["created_at"] < since or (until is not None and event["created_at"] >= until):
            continue
        if any(event[name] != value for name, value in filters.items()):
            continue
        key = tuple(event[names[key]] for key in group_by)
        total = sums.setdefault(key, Counter())
        total.update(
            requests=1,
            errors=event["outcome"] != "ok",
            input_tokens=event["input_tokens"] or 0,
            output_tokens=event["output_tokens"] or 0,
        )
    shown = {"day": lambda day: day.isoformat(), "user": lambda name: name}
    rows = []
    for key in sorted(sums, key=lambda key: tuple("" if part is None else part for part in key)):
        fields = {
            ("user" if name == "user" else names[name]): shown.get(name, str)(part) if part is not None else None
            for name, part in zip(group_by, key, strict=True)
        }
        counts = {name: sums[key][name] for name in ("requests", "errors", "input_tokens", "output_tokens")}
        rows.append(fields | counts)
    return rows


def test_grouping_and_filters_add_up_whole_and_partial_days_alike(registry, admin):
    rng = random.Random(24)
    midnight = datetime.combine(utcnow().date(), datetime.min.time())
    start = midnight - timedelta(days=6)
    events = [synthetic_event(start + timedelta(minutes=rng.randrange(7 * 24 * 60)), rng) for _ in range(400)]
    events.append(synthetic_event(midnight - timedelta(days=2), rng))  # on a day's first instant
    recorder = registry.extensions["usage"]
    for event in events:
        recorder.record(event)
    assert recorder.flush()
    ranges = [
        (start, None),
        (midnight - timedelta(days=2), midnight),  # whole days only
        (midnight - timedelta(days=3, hours=5), midnight - timedelta(days=1, hours=7)),  # partial ends
        (midnight - timedelta(days=2, hours=20), midnight - timedelta(days=2, hours=3)),  # within one day
        (midnight - timedelta(days=3, hours=1), midnight - timedelta(days=2)),  # one partial day, one boundary
    ]
    for since, until in ranges:
        for group_by in (["day"], ["day", "model"], ["provider", "token"], ["model", "user", "day"]):
            query = {"group_by": ",".join(group_by), "since": since.isoformat() + "Z"}
            if until is not None:
                query["until"] = until.isoformat() + "Z"
            assert report(admin, **query) == expected_rows(events, group_by, since, until, {}), (since, until, group_by)
    since = start.isoformat() + "Z"
    for filters in ({"model": "openai:gpt-4o"}, {"provider_id": "provider-a", "token_id": "token-b"}):
        rows = report(admin, group_by="day,model", since=since, **filters)
        assert rows == expected_rows(events, ["day", "model"], start, None, filters)
        assert rows


# Retention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("retention_days, kept", [("90", [0, 2, 89]), ("1", [0])])
def test_the_scheduler_prunes_usage_past_the_retention(make_app, retention_days, kept):
    app = make_app(REGISTRY_USAGE_RETENTION_DAYS=retention_days)
    rng = random.Random(90)
    for age_days in (0, 2, 89, 91):
        event = synthetic_event(utcnow() - timedelta(days=age_days, minutes=1), rng)
        app.extensions["usage"].record(event | {"duration_seconds": float(age_days)})
    app.extensions["usage"].flush()
    with app.app_context():
        prune_old_usage(app)
    assert sorted(int(event["duration_seconds"]) for event in stored_events(app)) == kept
    since = (utcnow() - timedelta(days=100)).isoformat() + "Z"
    assert sum(row["requests"] for row in report(client_as(app, "admin"), since=since)) == len(kept)


def test_usage_pruning_runs_on_its_own_schedule_unless_the_retention_is_0(make_app):
    assert make_app(REGISTRY_USAGE_PRUNE_INTERVAL="60").config["USAGE_PRUNE_INTERVAL"] == 60
    assert (
        make_app(REGISTRY_USAGE_RETENTION_DAYS="0", REGISTRY_USAGE_PRUNE_INTERVAL="60").config["USAGE_PRUNE_INTERVAL"]
        == 0
    )


# The command ---------------------------------------------------------------------------------


def test_the_usage_command_prints_everyones_usage(registry, calls_by_three):
    result = registry.test_cli_runner().invoke(args=["usage", "--group-by", "user,model"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "user\tmodel\trequests\terrors\tinput_tokens\toutput_tokens",
        "admin\t-\t1\t1\t0\t0",
        f"service\topenai:gpt-4o\t3\t0\t{3 * USAGE['prompt_tokens']}\t{3 * USAGE['completion_tokens']}",
    ]
    refused = registry.test_cli_runner().invoke(args=["usage", "--group-by", "week"])
    assert refused.exit_code == 1 and "--group-by: Must be one or more of day" in refused.output


# A database that refuses the writes ------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.slow
def test_events_wait_for_a_database_that_refuses_them_and_the_oldest_go_past_the_bound(app, instance_path, caplog):
    recorder = app.extensions["usage"]
    # Only this test's flushes write: the recorder's thread, flushing between the two renames
    # below, would open the empty file SQLite creates there and keep that connection pooled.
    recorder.stop()
    before = parse(scrape(app.test_client()))
    with app.app_context():
        db.engine.dispose()  # no connection keeps the file open
    database = instance_path / "registry.db"
    database.rename(instance_path / "moved.db")
    database.mkdir()  # the database cannot be opened
    rng = random.Random(7)
    with caplog.at_level(logging.WARNING, logger="observability.usage"):
        for number in range(MAX_PENDING + 10):
            recorder.record(synthetic_event(utcnow(), rng) | {"duration_seconds": float(number)})
        assert recorder.flush() is False
    database.rmdir()
    (instance_path / "moved.db").rename(database)
    kept = [event["duration_seconds"] for event in stored_events(app)]
    assert kept == [float(number) for number in range(10, MAX_PENDING + 10)]  # the 10 oldest were dropped
    assert "dropped the 10 oldest usage events" in caplog.text
    assert "usage events wait for the database" in caplog.text
    after = parse(scrape(app.test_client()))
    assert delta(before, after, "registry_usage_events_dropped_total", reason="backlog") == 10


# Over gunicorn: a killed worker, a graceful stop ---------------------------------------------


class SteadyCalls:
    """Callers that chat back to back through the server, keeping when each answer came."""

    def __init__(self, server, secret, callers=4):
        self.base_url = f"{server.base_url}/api/v1/openai"
        self.secret = secret
        self.answered_at = []  # time.monotonic() of each 200
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self.call) for _ in range(callers)]
        for thread in self.threads:
            thread.start()

    def call(self):
        with httpx.Client(headers={"Authorization": f"Bearer {self.secret}"}, timeout=10) as client:
            while not self.stopped.is_set():
                try:
                    response = client.post(f"{self.base_url}/chat/completions", json=chat_body())
                except httpx.TransportError:
                    continue
                if response.status_code == 200:
                    self.answered_at.append(time.monotonic())

    def stop(self):
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_a_killed_worker_loses_at_most_its_last_second_of_events(registry, fake_upstream, start_gunicorn):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    _, secret = new_token(registry, "service", "caller")
    server = start_gunicorn(workers=2)
    calls = SteadyCalls(server, secret)
    assert wait_for(lambda: calls.answered_at, timeout=30)
    time.sleep(3)  # calls answered all along
    calls.stopped.set()
    killed_at = time.monotonic()
    server.kill(signal.SIGKILL)  # its workers with it
    calls.stop()
    answered_before_the_last_second = sum(answered_at < killed_at - 1 for answered_at in calls.answered_at)
    stored = len(stored_events(registry))
    assert answered_before_the_last_second <= stored <= len(calls.answered_at) + len(calls.threads)


def test_a_graceful_stop_writes_the_events_of_the_calls_it_waited_for(registry, fake_upstream, start_gunicorn):
    upstream = fake_upstream(api_key=MODEL_KEY)
    upstream.chunk_interval = 0.5  # a stream of about 2 s
    register(registry, upstream)
    token_id, secret = new_token(registry, "service", "caller")
    server = start_gunicorn(workers=1)
    client = openai.OpenAI(base_url=f"{server.base_url}/api/v1/openai", api_key=secret, max_retries=0)
    with client.chat.completions.create(model="openai:gpt-4o", messages=chat_body()["messages"], stream=True) as chunks:
        first = next(iter(chunks))  # the stream is under way
        server.process.send_signal(signal.SIGTERM)
        rest = list(chunks)
    client.close()  # the stop waits on an idle kept-alive connection too
    assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in [first, *rest])  # not asked for
    server.process.wait(timeout=30)
    [event] = stored_events(registry)
    assert (event["token_id"], event["outcome"]) == (token_id, "ok")
    assert (event["input_tokens"], event["output_tokens"]) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])


@pytest.mark.parametrize("stopped", ["worker", "server"])
def test_a_stream_cut_by_a_graceful_stop_records_it_as_a_503(registry, fake_upstream, start_gunicorn, stopped):
    """A worker told to stop (a reload, max_requests, a signal of its own, the server's stop)
    waits for its calls for most of the graceful timeout, then ends those still running, so
    that they are recorded before the master kills it at the timeout."""
    upstream = fake_upstream(api_key=MODEL_KEY)
    upstream.script = silent_after_first_chunk(threading.Event())  # 5 s of silence
    register(registry, upstream)
    token_id, secret = new_token(registry, "service", "caller")
    server = start_gunicorn(workers=1, GUNICORN_CMD_ARGS="--graceful-timeout 3")
    [worker] = server.worker_pids()
    headers = {"Authorization": f"Bearer {secret}"}
    with (
        httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client,
        client.stream("POST", CHAT, json=chat_body(stream=True)) as response,
    ):
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # the stream is under way
        os.kill(worker if stopped == "worker" else server.process.pid, signal.SIGTERM)
        with pytest.raises(httpx.RemoteProtocolError):  # cut before its end
            list(lines)
    assert wait_for(lambda: worker not in server.worker_pids())
    [event] = stored_events(registry)
    assert (event["token_id"], event["outcome"]) == (token_id, "503")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_protocol_records_one_event_naming_its_endpoint(registry, fake_upstream, protocol, stream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    response = ask(registry, protocol, stream=stream)
    response.get_data()  # a stream's event is recorded when it ends
    assert response.status_code == 200
    event = only_event(registry)
    endpoint = {"chat-completions": "chat.completions"}.get(protocol.name, protocol.name)
    assert (event["endpoint"], event["outcome"], event["username"]) == (endpoint, "ok", CALLER)
    assert (event["input_tokens"], event["output_tokens"]) == (USAGE["prompt_tokens"], USAGE["completion_tokens"])
