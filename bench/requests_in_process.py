"""CPU microseconds per request of the API's and the gateway's hot routes, in one process (no HTTP server).

    .venv/bin/python bench/requests_in_process.py [--requests 2000] [--rounds 5] [--only "get one" ...]

The real app on a fresh SQLite file with 200 providers, driven through Flask's test
client: what a code change costs per request, without the noise of sockets and workers.
The gateway's calls go to a fake OpenAI-compatible model server (tests/fakes/) in a
process of its own, so its work is not counted; the registry's, its HTTP client's
included, is. Prints the median of the rounds' mean per request, in CPU time
(time.process_time), which other processes on a busy machine disturb less than wall time.
The scenarios interleave, so machine noise hits them alike.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from flask_migrate import upgrade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from access.tokens import create_token  # noqa: E402
from app import create_app  # noqa: E402
from bench.gateway import BENCH_LIMITS  # noqa: E402
from models import TokenLimits  # noqa: E402
from serving.cli import create_first_admin  # noqa: E402
from storage.users import user_named  # noqa: E402
from tests.conftest import basic_auth, provider_body  # noqa: E402

PROVIDERS = "/api/v1/model_providers"
CHAT = "/api/v1/openai/chat/completions"
MODEL_KEY = "sk-bench"  # the key the fake of `python -m tests.fakes` expects
CHAT_BODY = {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
# name: (method, path or None for one provider's, credentials, JSON body)
SCENARIOS = {
    "get one": ("GET", None, "basic", None),
    "get one bearer": ("GET", None, "bearer", None),
    "list 50": ("GET", f"{PROVIDERS}?limit=50", "basic", None),
    "chat": ("POST", CHAT, "bearer", CHAT_BODY),
    "chat stream": (
        "POST",
        CHAT,
        "bearer",
        {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi fake_pieces=3"}], "stream": True},
    ),
    "chat limited": ("POST", CHAT, "limited", CHAT_BODY),
}


def start_fake():
    """The fake model server of `python -m tests.fakes` in a process of its own, and its port."""
    command = [sys.executable, "-m", "tests.fakes"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    return process, int(process.stdout.readline())


def seeded_client(instance, providers, fake_port):
    """The test client, {"basic": ..., "bearer": ...} Authorization headers, and the last provider's id."""
    app = create_app({"REGISTRY_INSTANCE_PATH": instance, "REGISTRY_ADMIN_PASSWORD": "bench"})
    with app.app_context():
        upgrade()
        create_first_admin(app)
        token = create_token(user_named("admin"), "bench")["token"]
        limited = create_token(user_named("admin"), "bench-limited", limits=TokenLimits(**BENCH_LIMITS))["token"]
    client = app.test_client()
    authorizations = {
        "basic": basic_auth("admin", "bench"),
        "bearer": f"Bearer {token}",
        "limited": f"Bearer {limited}",
    }
    client.environ_base["HTTP_AUTHORIZATION"] = authorizations["basic"]
    fake = provider_body(base_url=f"http://127.0.0.1:{fake_port}/v1", api_key=MODEL_KEY)
    assert client.post(PROVIDERS, json=fake).status_code == 201  # verified: its models indexed
    seeds = [provider_body(base_url=f"https://p{number}.example.com/v1") for number in range(providers)]
    ids = [client.post(f"{PROVIDERS}?verify=false", json=seed).get_json()["id"] for seed in seeds]
    return client, authorizations, ids[-1]


def microseconds_per_request(client, method, path, headers, body, requests):
    started = time.process_time()
    for _ in range(requests):
        response = client.open(path, method=method, headers=headers, json=body)
        assert response.status_code == 200, (path, response.status_code, response.get_data()[:300])
        response.get_data()  # a stream's chunks are relayed as it is read
        response.close()
    return (time.process_time() - started) / requests * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run")
    options = parser.parse_args()
    fake, fake_port = start_fake()
    try:
        with tempfile.TemporaryDirectory() as instance:
            client, authorizations, provider_id = seeded_client(instance, 200, fake_port)
            runs = {}
            for name in options.only:
                method, path, credentials, body = SCENARIOS[name]
                path = path or f"{PROVIDERS}/{provider_id}"
                runs[name] = (method, path, {"Authorization": authorizations[credentials]}, body)
                microseconds_per_request(client, *runs[name], 100)  # warm-up
            samples = {name: [] for name in runs}
            for _ in range(options.rounds):
                for name, run in runs.items():
                    samples[name].append(microseconds_per_request(client, *run, options.requests))
    finally:
        fake.kill()
    for name, values in samples.items():
        print(f"{name}: {statistics.median(values):.0f} us per request (median of {options.rounds} rounds)")


if __name__ == "__main__":
    main()
