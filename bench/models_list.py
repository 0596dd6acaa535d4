"""Cross-provider model list: cold and cached, against many slow fake upstreams.

Prints medians of interleaved runs and how they compare to one upstream's latency:
a cold list should cost about one upstream call (they are asked at once), a cached
list a small fraction of it.

    .venv/bin/python bench/models_list.py [--upstreams 20] [--delay 0.2] [--runs 7]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import httpx
from flask_migrate import upgrade

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import create_app  # noqa: E402
from cli import create_first_admin  # noqa: E402
from tests.conftest import basic_auth, provider_body  # noqa: E402
from tests.fake_upstreams import FakeUpstream  # noqa: E402


def build_registry(instance, cache_ttl):
    environ = {
        "REGISTRY_INSTANCE_PATH": instance,
        "REGISTRY_VERIFY_ON_CREATE": "false",
        "REGISTRY_MODELS_CACHE_TTL": str(cache_ttl),
        "REGISTRY_ADMIN_PASSWORD": "bench",
    }
    app = create_app(environ)
    with app.app_context():
        upgrade()
        create_first_admin(app)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = basic_auth("admin", "bench")
    return app, client


def timed(call):
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstreams", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds each fake upstream takes to answer")
    parser.add_argument("--runs", type=int, default=7)
    options = parser.parse_args()

    upstreams = [
        FakeUpstream(models=[f"model-{i}-a", f"model-{i}-b"], delay=options.delay) for i in range(options.upstreams)
    ]
    with tempfile.TemporaryDirectory() as cold_dir, tempfile.TemporaryDirectory() as warm_dir:
        cold_app, cold = build_registry(cold_dir, cache_ttl=0)
        warm_app, warm = build_registry(warm_dir, cache_ttl=300)
        for upstream in upstreams:
            for client in (cold, warm):
                client.post(
                    "/api/v1/model_providers", json=provider_body(base_url=upstream.base_url, api_key=upstream.api_key)
                )
        warm.get("/api/v1/openai/models")  # fill the cache

        def list_models(client):
            response = client.get("/api/v1/openai/models")
            assert len(response.get_json()["data"]) == 2 * options.upstreams

        one_upstream = f"{upstreams[0].base_url}/models"
        headers = {"Authorization": f"Bearer {upstreams[0].api_key}"}
        samples = {"one upstream": [], "cold list": [], "cached list": []}
        for _ in range(options.runs):  # interleaved, so machine noise hits all three alike
            samples["one upstream"].append(timed(lambda: httpx.get(one_upstream, headers=headers)))
            samples["cold list"].append(timed(lambda: list_models(cold)))
            samples["cached list"].append(timed(lambda: list_models(warm)))
        for upstream in upstreams:
            upstream.down()

    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians["one upstream"]
    setup = f"{options.upstreams} upstreams, each answering in {options.delay:g} s"
    print(f"{setup}; medians of {options.runs} interleaved runs")
    for name, median in medians.items():
        print(f"  {name:<13} {median * 1000:9.1f} ms   {median / baseline:6.2f} x one upstream")
    print(f"  sequential would be about {options.upstreams:.0f} x one upstream")


if __name__ == "__main__":
    main()
