"""GET /metrics: Prometheus text, summed over every gunicorn worker, with no secret in it."""

import glob
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models import db
from observability.metrics import record_gateway_call
from tests.conftest import basic_auth, client_as, provider_body

PROVIDERS = "/api/v1/model_providers"
ONE_PROVIDER = "/api/v1/model_providers/<provider_id>"


def parse(text):
    """{(sample name, frozenset of labels): value} of a scrape, read by Prometheus' own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def scrape(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return response.text


def test_counters_add_up_every_request_across_two_workers(start_gunicorn, tmp_path):
    metrics_folder = tmp_path / "metrics"
    server = start_gunicorn(workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_folder))
    with server.client("admin") as admin:
        provider_id = admin.post(PROVIDERS, json=provider_body()).json()["id"]
    sent = 40
    auth = ("reader", "reader-pass-1")
    round_trips = []  # seconds of each GET of ONE_PROVIDER, as the client timed it
    for path in [provider_id] * sent + ["not-an-id"] * 3:  # a new connection each: both workers serve
        started = time.perf_counter()
        response = httpx.get(f"{server.base_url}{PROVIDERS}/{path}", auth=auth)
        round_trips.append(time.perf_counter() - started)
        assert response.status_code == (404 if path == "not-an-id" else 200)
    assert httpx.get(f"{server.base_url}/no/such/{provider_id}").status_code == 404
    writers = {re.search(r"_(\d+)\.db$", path).group(1) for path in glob.glob(str(metrics_folder / "counter_*.db"))}
    assert len(writers) == 2, "both workers served requests"

    first = parse(httpx.get(f"{server.base_url}/metrics").text)
    second = parse(httpx.get(f"{server.base_url}/metrics").text)

    requests = "registry_http_requests_total"
    assert value(first, requests, method="GET", route=ONE_PROVIDER, status="200") == sent
    assert value(first, requests, method="GET", route=ONE_PROVIDER, status="404") == 3
    assert value(first, requests, method="POST", route=PROVIDERS, status="201") == 1
    assert value(first, requests, method="GET", route="unmatched", status="404") == 1
    assert value(first, requests, method="GET", route="/metrics", status="200") == 0
    assert value(second, requests, method="GET", route="/metrics", status="200") == 1  # the first scrape
    histogram = "registry_http_request_duration_seconds"
    assert value(first, f"{histogram}_count", method="GET", route=ONE_PROVIDER) == sent + 3
    assert value(first, f"{histogram}_bucket", method="GET", route=ONE_PROVIDER, le="+Inf") == sent + 3
    assert_durations_fit_round_trips(first, histogram, round_trips, method="GET", route=ONE_PROVIDER)
    routes = {dict(labels).get("route") for name, labels in first if name.startswith("registry_http")}
    assert ONE_PROVIDER in routes and PROVIDERS in routes
    assert not any(provider_id in (route or "") or "not-an-id" in (route or "") for route in routes)
    assert value(first, "registry_providers", type="openai", state="online") == 1
    server.kill()
    assert not glob.glob(str(metrics_folder / "gauge_live*"))


def assert_durations_fit_round_trips(samples, histogram, round_trips, **labels):
    """The server times each request within the client's round trip: its sum of seconds is
    at most the round trips' sum, and each bucket counts at least the round trips within it."""
    assert 0 < value(samples, f"{histogram}_sum", **labels) <= sum(round_trips)
    buckets = {
        dict(sample_labels)["le"]: counted
        for (name, sample_labels), counted in samples.items()
        if name == f"{histogram}_bucket" and dict(sample_labels).items() >= labels.items()
    }
    assert len(buckets) > 5
    for bound, counted in buckets.items():
        assert counted >= sum(seconds <= float(bound) for seconds in round_trips), f"bucket le={bound}"


def test_gunicorn_makes_and_removes_its_own_metrics_folder(start_gunicorn):
    server = start_gunicorn(workers=2)
    with server.client("reader") as reader:
        for _ in range(5):
            reader.get(PROVIDERS)
    samples = parse(httpx.get(f"{server.base_url}/metrics").text)
    assert value(samples, "registry_http_requests_total", method="GET", route=PROVIDERS, status="200") == 5
    server.kill()


SECRETS = {
    "api key": "sk-metrics-secret-key-8080",
    "password": "metrics-secret-password-9090",
    "wrong password": "metrics-wrong-password-7070",
    "user name": "metrics-secret-user-6060",
    "query": "metrics-secret-query-5050",
    "method": "SECRETMETHOD",
}


def test_no_label_holds_a_key_password_path_or_typed_text(app, admin, anonymous):
    runner = app.test_cli_runner()
    created = runner.invoke(
        args=["users", "create", SECRETS["user name"], "--role", "reader", "--password-stdin"],
        input=SECRETS["password"] + "\n",
    )
    assert created.exit_code == 0, created.output
    provider_id = admin.post(PROVIDERS, json=provider_body(api_key=SECRETS["api key"])).get_json()["id"]
    user = client_as(app, "admin")
    user.environ_base["HTTP_AUTHORIZATION"] = basic_auth(SECRETS["user name"], SECRETS["password"])
    assert user.get(f"{PROVIDERS}/{provider_id}?x={SECRETS['query']}").status_code == 200
    wrong = {"Authorization": basic_auth(SECRETS["user name"], SECRETS["wrong password"])}
    assert anonymous.get(PROVIDERS, headers=wrong).status_code == 401
    assert admin.open(f"{PROVIDERS}/{provider_id}", method=SECRETS["method"]).status_code == 405
    record_gateway_call("openai", None, "not_found", 0.01)  # a model the index does not know
    text = scrape(anonymous)
    for secret in (*SECRETS.values(), provider_id):
        assert secret not in text
    assert 'method="unknown"' in text
    assert 'model="unknown"' in text


def delta(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


def test_providers_by_type_and_state_are_read_at_each_scrape(make_app, fake_upstream):
    app = make_app(REGISTRY_PROBE_FAILURES="1", REGISTRY_UPSTREAM_TIMEOUT="2")
    admin, anonymous = client_as(app, "admin"), app.test_client()
    upstream = fake_upstream()
    admin.post(PROVIDERS, json=provider_body(base_url="http://127.0.0.1:9/v1"))  # nothing listens on port 9
    online_id = admin.post(
        PROVIDERS, json=provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
    ).get_json()["id"]
    admin.post(PROVIDERS, json=provider_body(type="ollama", base_url="http://127.0.0.1:9/ollama", api_key=""))
    before = parse(scrape(anonymous))
    assert value(before, "registry_providers", type="openai", state="online") == 2
    assert value(before, "registry_providers", type="ollama", state="online") == 1
    assert value(before, "registry_providers", type="anthropic", state="offline") == 0  # every pair is present
    assert ("registry_providers", frozenset({"type": "anthropic", "state": "offline"}.items())) in before

    for provider in admin.get(PROVIDERS).get_json()["items"]:
        admin.post(f"{PROVIDERS}/{provider['id']}/check")
    after = parse(scrape(anonymous))
    assert value(after, "registry_providers", type="openai", state="online") == 1
    assert value(after, "registry_providers", type="openai", state="offline") == 1
    assert value(after, "registry_providers", type="ollama", state="offline") == 1
    assert delta(before, after, "registry_probes_total", type="openai", outcome="success") == 1
    assert delta(before, after, "registry_probes_total", type="openai", outcome="failure") == 1
    assert delta(before, after, "registry_probes_total", type="ollama", outcome="failure") == 1
    calls = "registry_upstream_request_duration_seconds_count"
    assert delta(before, after, calls, type="openai") == 2 and delta(before, after, calls, type="ollama") == 1
    assert online_id not in "".join(str(labels) for _, labels in after)


def test_a_scrape_without_the_database_still_answers_the_counters(app, anonymous, databases, instance_path):
    anonymous.get("/healthz")
    with app.app_context():
        db.engine.dispose()
    databases.destroy(instance_path)
    response = anonymous.get("/metrics")
    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "registry_http_requests_total", method="GET", route="/healthz", status="200") >= 1
    assert not any(name == "registry_providers" for name, _ in samples)


def test_failed_logins_are_counted(anonymous):
    before = parse(scrape(anonymous))
    for attempt in range(3):
        headers = {"Authorization": basic_auth("admin", f"wrong-{attempt}")}
        assert anonymous.get(PROVIDERS, headers=headers).status_code == 401
    anonymous.get(PROVIDERS, headers={"Authorization": basic_auth("admin", "admin-pass-1")})
    assert anonymous.get(PROVIDERS, headers={"Authorization": "Bearer mpr_not-a-token"}).status_code == 401
    after = parse(scrape(anonymous))
    assert delta(before, after, "registry_failed_logins_total", credential="password") == 3
    assert delta(before, after, "registry_failed_logins_total", credential="token") == 1


def test_manifest_syncs_are_counted_by_outcome(make_app, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("model_providers:\n  - type: openai\n    base_url: https://m.example.com/v1\n    api_key: k\n")
    bad.write_text("model_providers: [oops\n")
    app = make_app(REGISTRY_MANIFESTS=f"{good},{bad}")
    admin = client_as(app, "admin")
    before = parse(scrape(admin))
    assert admin.post("/api/v1/registry/sync").status_code == 200
    after = parse(scrape(admin))
    assert delta(before, after, "registry_manifest_syncs_total", outcome="ok") == 1
    assert delta(before, after, "registry_manifest_syncs_total", outcome="error") == 1


def test_gateway_calls_count_tokens_and_time_to_first_chunk(anonymous):
    before = parse(scrape(anonymous))
    record_gateway_call("openai", "openai:gpt-4o", "ok", 1.5, time_to_first_chunk=0.2, tokens=(12, 30))
    record_gateway_call("openai", "openai:gpt-4o", "upstream_error", 0.3)
    after = parse(scrape(anonymous))
    labels = {"type": "openai", "model": "openai:gpt-4o"}
    assert delta(before, after, "registry_gateway_requests_total", **labels, outcome="ok") == 1
    assert delta(before, after, "registry_gateway_requests_total", **labels, outcome="upstream_error") == 1
    assert delta(before, after, "registry_gateway_tokens_total", **labels, kind="prompt") == 12
    assert delta(before, after, "registry_gateway_tokens_total", **labels, kind="completion") == 30
    assert delta(before, after, "registry_gateway_time_to_first_chunk_seconds_count", **labels) == 1
    assert delta(before, after, "registry_gateway_request_duration_seconds_count", **labels) == 2
    with pytest.raises(ValueError):
        record_gateway_call("openai", "openai:gpt-4o", "something a client typed", 0.1)


def test_token_counts_beyond_two_to_the_53_are_not_counted(anonymous):
    before = parse(scrape(anonymous))
    record_gateway_call("openai", "openai:gpt-4o", "ok", 0.1, tokens=(10**400, 2**53 + 1))
    after = parse(scrape(anonymous))
    labels = {"type": "openai", "model": "openai:gpt-4o"}
    assert delta(before, after, "registry_gateway_requests_total", **labels, outcome="ok") == 1
    assert delta(before, after, "registry_gateway_tokens_total", **labels, kind="prompt") == 0
    assert delta(before, after, "registry_gateway_tokens_total", **labels, kind="completion") == 0


def test_metrics_can_be_turned_off(make_app):
    app = make_app(REGISTRY_METRICS="false")
    assert app.test_client().get("/metrics").status_code == 404
    assert client_as(app, "reader").get(PROVIDERS).status_code == 200
