"""CPU microseconds per request of GET one provider and a list of 50, in one process (no HTTP).

    .venv/bin/python bench/requests_in_process.py [--requests 2000] [--rounds 5]

The real app on a fresh SQLite file with 200 providers, driven through Flask's test
client: what a code change costs per request, without the noise of sockets and workers.
Prints the median of the rounds' mean per request, in CPU time (time.process_time), which
other processes on a busy machine disturb less than wall time.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from flask_migrate import upgrade

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import create_app  # noqa: E402
from serving.cli import create_first_admin  # noqa: E402
from tests.conftest import basic_auth, provider_body  # noqa: E402

PROVIDERS = "/api/v1/model_providers"


def seeded_client(instance, providers):
    app = create_app(
        {"REGISTRY_INSTANCE_PATH": instance, "REGISTRY_VERIFY_ON_CREATE": "false", "REGISTRY_ADMIN_PASSWORD": "bench"}
    )
    with app.app_context():
        upgrade()
        create_first_admin(app)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = basic_auth("admin", "bench")
    ids = [
        client.post(PROVIDERS, json=provider_body(base_url=f"https://p{number}.example.com/v1")).get_json()["id"]
        for number in range(providers)
    ]
    return client, ids[-1]


def microseconds_per_request(client, path, requests):
    started = time.process_time()
    for _ in range(requests):
        response = client.get(path)
        assert response.status_code == 200, response.status_code
    return (time.process_time() - started) / requests * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as instance:
        client, provider_id = seeded_client(instance, 200)
        paths = {"get one": f"{PROVIDERS}/{provider_id}", "list 50": f"{PROVIDERS}?limit=50"}
        samples = {name: [] for name in paths}
        microseconds_per_request(client, paths["get one"], 100)  # warm-up
        for _ in range(options.rounds):  # interleaved, so machine noise hits both alike
            for name, path in paths.items():
                samples[name].append(microseconds_per_request(client, path, options.requests))
        for name, values in samples.items():
            print(f"{name}: {statistics.median(values):.0f} us per request (median of {options.rounds} rounds)")


if __name__ == "__main__":
    main()
