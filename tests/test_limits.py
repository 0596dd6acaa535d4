"""Limits on tokens: set at creation and by an admin, no looser than the token that made one,
enforced before any provider is called with 429 in OpenAI's shape, and a default ceiling on
calls in flight for every caller. Driven in process: the real app, its real HTTP calls to a
fake model server."""

import threading
import time
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa

from models import LIMIT_BUCKETS, db, utcnow
from tests.conftest import PASSWORDS, SQLITE_ONLY, basic_auth, client_as, wait_for
from tests.fakes.model import USAGE
from tests.test_gateway import MODEL_KEY, chat_body, register
from tests.test_metrics import parse, value

TOKENS = "/api/v1/tokens"
CHAT = "/api/v1/openai/chat/completions"
NO_LIMITS = {"requests_per_minute": None, "tokens_per_minute": None, "tokens_per_day": None, "max_parallel": None}
CALL_TOKENS = USAGE["prompt_tokens"] + USAGE["completion_tokens"]


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


def new_token(client, **fields):
    created = client.post(TOKENS, json={"name": "agent", **fields})
    assert created.status_code == 201, created.get_json()
    return created.get_json()


def caller_token(app, **limits):
    """A caller token of the service user, with these limits (if any): its secret."""
    return new_token(client_as(app, "service"), role="caller", **({"limits": limits} if limits else {}))["token"]


def only_token_id(app):
    """The id of the one token there is: the test's caller token."""
    return client_as(app, "admin").get(TOKENS).get_json()["items"][0]["id"]


def add_buckets(app, rows):
    """Limit buckets (dicts of their columns) as the ends of earlier calls would have left them."""
    with app.app_context():
        db.session.execute(sa.insert(LIMIT_BUCKETS), rows)
        db.session.commit()


def chat(app, secret, **fields):
    return app.test_client().post(CHAT, json=chat_body(**fields), headers=bearer(secret))


def calls_at_once(app, secret, count):
    """`count` chat calls started together, each in its thread: their answers."""
    answers = [None] * count

    def call(number):
        answers[number] = chat(app, secret)

    threads = [threading.Thread(target=call, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def statuses(answers):
    return sorted(answer.status_code for answer in answers)


def stored_rows(app, table):
    with app.app_context():
        return db.session.execute(sa.select(table)).all()


# Setting limits ------------------------------------------------------------------------------


def test_a_token_is_created_with_its_limits_and_listed_with_them(app, reader):
    limits = {"requests_per_minute": 60, "tokens_per_minute": 10000, "tokens_per_day": 500000, "max_parallel": 4}
    created = new_token(reader, limits=limits)
    assert created["limits"] == limits
    unlimited = new_token(reader, limits={"max_parallel": 2})
    assert unlimited["limits"] == {**NO_LIMITS, "max_parallel": 2}
    listed = {item["id"]: item["limits"] for item in reader.get(TOKENS).get_json()["items"]}
    assert listed == {created["id"]: limits, unlimited["id"]: unlimited["limits"]}


def test_a_token_without_limits_shows_them_null(reader):
    assert new_token(reader)["limits"] == NO_LIMITS
    assert reader.get(TOKENS).get_json()["items"][0]["limits"] == NO_LIMITS


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True, 2**31, {"per": 1}])
def test_a_limit_that_is_not_a_whole_number_from_1_is_a_422(reader, bad):
    refused = reader.post(TOKENS, json={"name": "agent", "limits": {"requests_per_minute": bad}})
    assert refused.status_code == 422, refused.get_json()
    assert "limits.requests_per_minute" in refused.get_json()["errors"]


def test_an_unknown_limit_is_a_422(reader):
    refused = reader.post(TOKENS, json={"name": "agent", "limits": {"requests_per_hour": 5}})
    assert refused.status_code == 422
    assert "limits.requests_per_hour" in refused.get_json()["errors"]


def test_a_token_made_with_a_token_gets_its_makers_limits_unless_tighter(app, reader):
    maker = new_token(reader, limits={"requests_per_minute": 10, "max_parallel": 2})
    with_maker = app.test_client()
    with_maker.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {maker['token']}"
    inherited = new_token(with_maker)
    assert inherited["limits"] == {**NO_LIMITS, "requests_per_minute": 10, "max_parallel": 2}
    tighter = new_token(with_maker, limits={"requests_per_minute": 5, "tokens_per_day": 1000})
    assert tighter["limits"] == {**NO_LIMITS, "requests_per_minute": 5, "max_parallel": 2, "tokens_per_day": 1000}


def test_a_token_made_with_a_token_is_never_looser_than_it(app, reader):
    maker = new_token(reader, limits={"requests_per_minute": 10})
    with_maker = app.test_client()
    with_maker.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {maker['token']}"
    refused = with_maker.post(TOKENS, json={"name": "looser", "limits": {"requests_per_minute": 11}})
    assert refused.status_code == 403
    assert "requests_per_minute at most 10" in refused.get_json()["detail"]
    # A limit the maker does not have is no limit to stay under.
    assert new_token(with_maker, limits={"max_parallel": 100})["limits"]["max_parallel"] == 100


def test_an_admin_changes_a_tokens_limits_and_the_change_is_audited(app, admin, reader):
    token = new_token(reader, limits={"requests_per_minute": 10, "max_parallel": 2})
    changed = admin.patch(f"{TOKENS}/{token['id']}", json={"limits": {"requests_per_minute": 20, "max_parallel": None}})
    assert changed.status_code == 200, changed.get_json()
    assert changed.get_json()["limits"] == {**NO_LIMITS, "requests_per_minute": 20}
    assert changed.get_json()["id"] == token["id"] and "token" not in changed.get_json()
    assert reader.get(TOKENS).get_json()["items"][0]["limits"] == changed.get_json()["limits"]
    [event] = admin.get("/api/v1/audit", query_string={"action": "token.update"}).get_json()["items"]
    assert event["target_id"] == token["id"] and event["user"] == "admin"
    assert event["changed_fields"] == ["limits.max_parallel", "limits.requests_per_minute"]


def test_only_an_admin_changes_limits_of_a_token_that_exists(app, admin, reader):
    token = new_token(reader, limits={"requests_per_minute": 1})
    assert reader.patch(f"{TOKENS}/{token['id']}", json={"limits": {"requests_per_minute": None}}).status_code == 403
    for missing in ("4b0c4a9e-4c8e-4f3a-9d63-0c5b7c1d2e3f", "not-an-id"):
        assert admin.patch(f"{TOKENS}/{missing}", json={"limits": {}}).status_code == 404
    assert admin.patch(f"{TOKENS}/{token['id']}", json={"name": "renamed"}).status_code == 422
    assert admin.patch(f"{TOKENS}/{token['id']}", json={}).status_code == 422


def test_the_openapi_document_shows_limits_and_their_patch(anonymous):
    document = anonymous.get("/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    assert set(schemas["TokenLimits"]["properties"]) == set(NO_LIMITS)
    assert "limits" in schemas["Token"]["properties"] and "limits" in schemas["TokenCreate"]["properties"]
    assert "patch" in document["paths"]["/api/v1/tokens/{token_id}"]


# Enforcement -------------------------------------------------------------------------------


def test_calls_over_requests_per_minute_are_refused_before_any_upstream_call(registry, upstream):
    secret = caller_token(registry, requests_per_minute=2)
    first, second, refused = (chat(registry, secret) for _ in range(3))
    assert [first.status_code, second.status_code, refused.status_code] == [200, 200, 429]
    assert len(upstream.calls) == 2
    error = refused.get_json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "requests_per_minute 2" in error["message"] and secret not in refused.get_data(as_text=True)
    assert 55 <= int(refused.headers["Retry-After"]) <= 61  # the window counts by the second
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in (first, second, refused)] == ["1", "0", "0"]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"] in ("1m0s", "1m1s")
    assert "x-ratelimit-limit-tokens" not in first.headers


def test_a_refusal_is_in_each_protocols_own_shape_over_http(registry, upstream, gateway, protocol):
    server = gateway()
    secret = caller_token(registry, requests_per_minute=1)
    headers = {**protocol.headers, "Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        answers = [client.post(protocol.path, json=protocol.body("openai:gpt-4o"), headers=headers) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [200, 429]
    refused = answers[1].json()
    assert protocol.error_code(refused) == protocol.rate_limited
    assert "requests_per_minute 1" in protocol.error_message(refused)
    assert 55 <= int(answers[1].headers["Retry-After"]) <= 61
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == ["0", "0"]
    assert len(upstream.calls) == 1


@SQLITE_ONLY
def test_a_token_without_limits_gets_no_rate_limit_headers_and_costs_no_bookkeeping(make_app, registry, upstream):
    """Every statement SQLite runs for the app is seen (its trace), the direct ones included."""
    unlimited, limited = caller_token(registry), caller_token(registry, max_parallel=5)
    statements = []
    app = make_app()

    def trace(dbapi_connection, connection_record):
        dbapi_connection.set_trace_callback(statements.append)

    with app.app_context():
        sa.event.listen(db.engine, "connect", trace)
    answers = [chat(app, unlimited), chat(app, unlimited, stream=True)]
    unlimited_statements = list(statements)
    assert chat(app, limited).status_code == 200
    assert [answer.status_code for answer in answers] == [200, 200]
    assert not any(name.startswith("x-ratelimit") for answer in answers for name, _ in answer.headers)
    assert unlimited_statements and not [statement for statement in unlimited_statements if "limit_" in statement]
    assert [statement for statement in statements if "limit_buckets" in statement]  # a limited call's are seen


def test_a_limit_changed_by_an_admin_applies_to_the_next_call(registry, upstream):
    secret = caller_token(registry, requests_per_minute=1)
    assert chat(registry, secret).status_code == 200
    assert chat(registry, secret).status_code == 429
    token_id = only_token_id(registry)
    lifted = client_as(registry, "admin").patch(f"{TOKENS}/{token_id}", json={"limits": {"requests_per_minute": 2}})
    assert lifted.status_code == 200
    assert chat(registry, secret).status_code == 200


def test_tokens_per_minute_admits_calls_while_the_minutes_tokens_are_below_it(registry, upstream):
    secret = caller_token(registry, tokens_per_minute=CALL_TOKENS + 1)
    first, second, refused = (chat(registry, secret) for _ in range(3))
    assert [first.status_code, second.status_code, refused.status_code] == [200, 200, 429]
    assert first.headers["x-ratelimit-remaining-tokens"] == str(CALL_TOKENS + 1)
    assert second.headers["x-ratelimit-remaining-tokens"] == "1"
    error = refused.get_json()["error"]
    assert error["type"] == "tokens" and f"tokens_per_minute {CALL_TOKENS + 1}" in error["message"]
    assert 55 <= int(refused.headers["Retry-After"]) <= 61
    assert len(upstream.calls) == 2


def test_streamed_calls_count_their_tokens_even_unasked(registry, upstream):
    secret = caller_token(registry, tokens_per_minute=CALL_TOKENS)
    streamed = chat(registry, secret, stream=True)
    assert streamed.status_code == 200 and "usage" not in streamed.get_data(as_text=True)
    assert streamed.headers["x-ratelimit-remaining-tokens"] == str(CALL_TOKENS)
    assert chat(registry, secret, stream=True).status_code == 429


def test_tokens_per_day_refuses_until_the_days_tokens_leave_it(registry, upstream):
    secret = caller_token(registry, tokens_per_day=CALL_TOKENS)
    assert chat(registry, secret).status_code == 200
    refused = chat(registry, secret)
    assert refused.status_code == 429 and "tokens_per_day" in refused.get_json()["error"]["message"]
    assert 86400 - 120 <= int(refused.headers["Retry-After"]) <= 86400 + 60
    assert refused.headers["x-ratelimit-limit-tokens"] == str(CALL_TOKENS)


def test_the_days_tokens_are_read_from_its_hours_and_the_minutes_of_its_oldest_hour(registry, upstream):
    limit = 10**6
    secret = caller_token(registry, tokens_per_day=limit)
    token_id = only_token_id(registry)
    five_hours_ago = utcnow() - timedelta(hours=5)
    buckets = [  # the hour's tokens, and one of its minutes (the same tokens, counted once)
        (3600, five_hours_ago.replace(minute=0, second=0, microsecond=0), 1000),
        (60, five_hours_ago.replace(second=0, microsecond=0), 7),
    ]
    add_buckets(
        registry,
        [
            {"token_id": token_id, "span": span, "starts_at": starts_at, "tokens": tokens}
            for span, starts_at, tokens in buckets
        ],
    )
    answer = chat(registry, secret)
    assert answer.status_code == 200 and answer.headers["x-ratelimit-remaining-tokens"] == str(limit - 1000)

    def hours_tokens():
        with registry.app_context():
            hours = sa.select(sa.func.sum(LIMIT_BUCKETS.c.tokens)).where(LIMIT_BUCKETS.c.span == 3600)
            return db.session.scalar(hours)

    assert wait_for(lambda: hours_tokens() == 1000 + CALL_TOKENS, timeout=5)  # the call's end, in its hour


def test_max_parallel_refuses_the_call_beyond_it_and_frees_slots_as_calls_end(registry, upstream):
    secret = caller_token(registry, max_parallel=2)
    chat(registry, secret)  # the first call of the process opens its connections
    upstream.delay = 1.0
    answers = calls_at_once(registry, secret, 3)
    assert statuses(answers) == [200, 200, 429]
    [refused] = [answer for answer in answers if answer.status_code == 429]
    assert "max_parallel 2 (2 calls in flight)" in refused.get_json()["error"]["message"]
    assert refused.headers["Retry-After"] == "1"
    upstream.delay = 0
    assert statuses(calls_at_once(registry, secret, 2)) == [200, 200]


def test_a_slot_comes_back_whatever_the_calls_end(registry, upstream):
    secret = caller_token(registry, max_parallel=1)
    assert chat(registry, secret, model="openai:no-such-model").status_code == 404
    assert chat(registry, secret, stream=True).status_code == 200
    upstream.fail_with(500)
    assert chat(registry, secret).status_code == 502
    upstream.failure = None
    assert chat(registry, secret).status_code == 200

    def slots_held():
        with registry.app_context():
            return db.session.scalar(sa.select(sa.func.coalesce(sa.func.sum(LIMIT_BUCKETS.c.slots), 0)))

    assert wait_for(lambda: slots_held() == 0, timeout=5)  # the ends are written off the calls' path


def test_the_ends_of_calls_delete_the_buckets_no_window_counts(registry, upstream):
    secret = caller_token(registry, max_parallel=5, tokens_per_day=10**6)
    token_id = only_token_id(registry)
    now = utcnow().replace(microsecond=0)
    this_hour = now.replace(minute=0, second=0)
    slot_lifetime = timedelta(seconds=registry.config["GATEWAY_TIMEOUT"] + 60)
    buckets = {
        (1, now - timedelta(minutes=2), 0): False,  # out of the minute, no slot held
        (1, now - timedelta(minutes=3), 1): True,  # a call still running
        (1, now - slot_lifetime - timedelta(seconds=5), 1): False,  # a slot of a process that died
        (60, now - timedelta(hours=1), 0): True,
        (60, now - timedelta(days=1, minutes=2), 0): False,
        (3600, this_hour - timedelta(hours=3), 0): True,
        (3600, this_hour - timedelta(days=1, hours=2), 0): False,
    }
    add_buckets(
        registry,
        [
            {"token_id": token_id, "span": span, "starts_at": starts_at, "slots": slots, "tokens": 7}
            for span, starts_at, slots in buckets
        ],
    )
    assert chat(registry, secret).status_code == 200

    def old_buckets():
        with registry.app_context():
            columns = (LIMIT_BUCKETS.c.span, LIMIT_BUCKETS.c.starts_at, LIMIT_BUCKETS.c.slots)
            old = (  # not the buckets of the call: its second, minute and hour
                LIMIT_BUCKETS.c.starts_at < now - timedelta(minutes=1),
                sa.or_(LIMIT_BUCKETS.c.span != 3600, LIMIT_BUCKETS.c.starts_at < this_hour),
            )
            return set(map(tuple, db.session.execute(sa.select(*columns).where(*old))))

    wait_for(lambda: old_buckets() == {bucket for bucket, kept in buckets.items() if kept}, timeout=5)
    assert old_buckets() == {bucket for bucket, kept in buckets.items() if kept}


def test_callers_without_max_parallel_get_the_default_per_worker(make_app, fake_upstream):
    app = make_app(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_DEFAULT_MAX_PARALLEL="1")
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(app, upstream)
    secret = caller_token(app, requests_per_minute=100)
    upstream.delay = 0.5
    refused = [answer for answer in calls_at_once(app, secret, 2) if answer.status_code == 429]
    assert len(refused) == 1 and "default max_parallel of 1" in refused[0].get_json()["error"]["message"]
    basic_answers = []

    def basic_call():
        headers = {"Authorization": basic_auth("service", PASSWORDS["service"])}
        basic_answers.append(app.test_client().post(CHAT, json=chat_body(), headers=headers))

    callers = [threading.Thread(target=basic_call) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert statuses(basic_answers) == [200, 429]


def test_a_worker_at_its_gateway_capacity_refuses_with_503_and_still_serves_the_api(make_app, fake_upstream):
    app = make_app(REGISTRY_VERIFY_ON_CREATE="true", GUNICORN_WORKER_CONNECTIONS="2")  # one for the gateway
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(app, upstream)
    first, second = caller_token(app), caller_token(app)
    upstream.delay = 1.0
    answers = []
    running = threading.Thread(target=lambda: answers.append(chat(app, first)))
    running.start()
    while not upstream.calls:
        time.sleep(0.01)
    refused = chat(app, second)
    assert client_as(app, "reader").get("/api/v1/model_providers").status_code == 200
    running.join()
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "capacity of 1 calls in flight" in refused.get_json()["error"]["message"]
    assert answers[0].status_code == 200


def test_refusals_are_counted_by_limit_and_as_limited_calls(registry, upstream):
    secret = caller_token(registry, requests_per_minute=1)

    def counted():
        samples = parse(registry.test_client().get("/metrics").get_data(as_text=True))
        refusals = value(samples, "registry_gateway_refusals_total", limit="requests_per_minute") or 0
        limited = value(samples, "registry_gateway_requests_total", type="openai", model="unknown", outcome="limited")
        return refusals, limited or 0

    before = counted()
    chat(registry, secret)
    chat(registry, secret)
    after = counted()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
