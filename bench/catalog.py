"""The catalog and the prober at scale: N providers, a third answering with five models, a
third refusing connections, a third accepting them and never answering.

For each size (default 100, then 1000) the registry runs under gunicorn with the prober on,
and the benchmark prints the time of a probe round (from the prober's log), the time until
every dead provider is offline, and the medians of the OpenAI list, match, resolve and one
provider's models while the prober keeps probing. Then, in one process, a probe round over
--lock-providers answering providers on SQLite, with another process writing beside it:
its longest wait for the write lock is the longest the prober held it.

    .venv/bin/python bench/catalog.py [--sizes 100,1000] [--timeout 2] [--runs 15] [--lock-providers 3000]

Smoke run: --sizes 30 --timeout 1 --runs 3 --lock-providers 60
"""

import argparse
import json
import multiprocessing
import os
import re
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from access.crypto import cipher  # noqa: E402
from app import create_app  # noqa: E402
from jobs.prober import probe_all  # noqa: E402
from models import PROVIDERS, db  # noqa: E402
from tests.conftest import Gunicorn, free_port, migrate_and_add_users, registry_environ  # noqa: E402
from tests.fakes import BlackHole  # noqa: E402

MODELS_PER_PROVIDER = 5
PROBE_ROUND_LINE = re.compile(r"probed (\d+) providers in ([\d.]+) s")


def model_ids(tenant):
    return [f"model-{tenant}-{index}" for index in range(MODELS_PER_PROVIDER)]


class TenantsHandler(BaseHTTPRequestHandler):
    """GET /{tenant}/v1/models: an OpenAI-style list of the tenant's five models."""

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        tenant = self.path.strip("/").split("/")[0]
        data = [
            {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "bench"}
            for model_id in model_ids(tenant)
        ]
        payload = json.dumps({"object": "list", "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class TenantsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 2048  # a whole probe round connects at once


def serve_tenants(port):
    TenantsServer(("127.0.0.1", port), TenantsHandler).serve_forever()


def start_answering():
    """The answering upstreams, in a process of their own: in this one they would compete
    with the measured prober (in measure_write_lock) for the interpreter."""
    port = free_port()
    server = multiprocessing.Process(target=serve_tenants, args=(port,), daemon=True)
    server.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port, server
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the answering upstreams did not start")


def base_urls(count, answering_port, black_hole):
    """A third answering, a third refused (nothing listens on the port), a third black-holed."""
    refused_port = free_port()
    urls = []
    for index in range(count):
        kind = ("answering", "refused", "silent")[index % 3]
        if kind == "answering":
            urls.append((kind, f"http://127.0.0.1:{answering_port}/t{index}/v1"))
        elif kind == "refused":
            urls.append((kind, f"http://127.0.0.1:{refused_port}/t{index}/v1"))
        else:
            urls.append((kind, black_hole.base_url(f"/t{index}/v1")))
    return urls


def add_providers(folder, urls):
    app = create_app(registry_environ(folder))
    with app.app_context():
        sealed_api_key = cipher.seal("sk-bench")
        rows = [{"type": "openai", "base_url": base_url, "sealed_api_key": sealed_api_key} for _, base_url in urls]
        db.session.execute(sa.insert(PROVIDERS), rows)
        db.session.commit()
        db.engine.dispose()


def new_instance(root, name):
    folder = Path(root) / name
    folder.mkdir()
    migrate_and_add_users(folder)
    return folder


def median_ms(call, runs):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = call()
        times.append(time.perf_counter() - started)
        assert response.status_code == 200, (response.status_code, response.text[:200])
    return statistics.median(times) * 1000


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def offline_count(client):
    return client.get("/api/v1/model_providers", params={"state": "offline", "limit": 1}).json()["total_count"]


def measure_size(root, count, timeout, runs, answering_port, black_hole):
    urls = base_urls(count, answering_port, black_hole)
    dead = sum(kind != "answering" for kind, _ in urls)
    folder = new_instance(root, f"size-{count}")
    add_providers(folder, urls)
    server = Gunicorn(
        folder,
        REGISTRY_UPSTREAM_TIMEOUT=str(timeout),
        REGISTRY_PROBE_INTERVAL=str(3 * timeout),
        LOG_LEVEL="info",
    )
    started = time.monotonic()
    try:
        with server.client("admin") as admin, server.client("service") as service:
            if not wait_until(lambda: offline_count(admin) == dead, 20 * timeout + 60):
                raise RuntimeError(f"only {offline_count(admin)} of {dead} dead providers went offline")
            all_offline = time.monotonic() - started
            answering_id = next(
                provider["id"]
                for provider in admin.get("/api/v1/model_providers", params={"state": "online", "limit": 1}).json()[
                    "items"
                ]
            )
            listed = admin.get("/api/v1/openai/models").json()["data"]
            assert len(listed) == (count - dead) * MODELS_PER_PROVIDER, len(listed)
            target = listed[len(listed) // 2]["id"]
            calls = {
                "OpenAI list": lambda: service.get("/api/v1/openai/models"),
                "match": lambda: service.post(
                    "/api/v1/model_providers/match",
                    json={"capability": "llm", "suggested_models": [target, "gpt-4o"]},
                ),
                "resolve": lambda: service.post("/api/v1/model_providers/resolve", json={"model": target}),
                "a provider's models": lambda: service.get(f"/api/v1/model_providers/{answering_id}/models"),
            }
            medians = {name: [] for name in calls}
            for _ in range(3):  # interleaved, so a busy moment of the machine spreads over all
                for name, call in calls.items():
                    medians[name].append(median_ms(call, max(1, runs // 3)))
    finally:
        server.kill()
    rounds = [float(seconds) for probed, seconds in PROBE_ROUND_LINE.findall(server.log()) if int(probed) == count]
    return {
        "providers": count,
        "probe rounds (s)": rounds,
        "all dead offline after (s)": round(all_offline, 1),
        **{f"{name} (ms)": round(statistics.median(values), 1) for name, values in medians.items()},
    }


def longest_write_wait(database_path, ready, stop, longest):
    """Take SQLite's write lock again and again beside the prober, in a process of its own;
    put the longest wait for it in `longest`.

    A writer in the prober's process would wait for the interpreter too, behind the probe
    threads, after the lock was free; and SQLite's busy handler retries 1 to 100 ms apart.
    Both counted in its wait. This one asks every half millisecond without the handler.
    """
    connection = sqlite3.connect(database_path, timeout=0, isolation_level=None)
    waits = []
    ready.set()
    while not stop.is_set():
        started = time.perf_counter()
        while not try_write_lock(connection):
            time.sleep(0.0005)
        waits.append(time.perf_counter() - started)
        connection.execute("COMMIT")
        time.sleep(0.002)
    connection.close()
    longest.put((max(waits), len(waits)))


def try_write_lock(connection):
    try:
        connection.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as error:
        if "locked" not in str(error):
            raise
        return False


def measure_write_lock(root, count, timeout, answering_port):
    folder = new_instance(root, f"lock-{count}")
    urls = [("answering", f"http://127.0.0.1:{answering_port}/t{index}/v1") for index in range(count)]
    add_providers(folder, urls)
    app = create_app(registry_environ(folder, REGISTRY_UPSTREAM_TIMEOUT=str(timeout)))
    ready, stop, longest = multiprocessing.Event(), multiprocessing.Event(), multiprocessing.Queue()
    writer = multiprocessing.Process(target=longest_write_wait, args=(folder / "registry.db", ready, stop, longest))
    writer.start()
    ready.wait()
    started = time.monotonic()
    with app.app_context():
        probe_all(app)
        listed = db.session.scalar(sa.text("SELECT count(*) FROM provider_models"))
        errors = db.session.execute(
            sa.text("SELECT last_error, count(*) FROM model_providers GROUP BY last_error")
        ).all()
        db.engine.dispose()
    elapsed = time.monotonic() - started
    stop.set()
    longest_wait, writes = longest.get()
    writer.join()
    # A probe or two timing out on a busy machine leaves the writes as heavy; many would not.
    assert listed >= 0.99 * count * MODELS_PER_PROVIDER, errors
    return {
        "providers": count,
        "providers listed": listed // MODELS_PER_PROVIDER,
        "probe round (s)": round(elapsed, 2),
        "longest wait of another writer (ms)": round(longest_wait * 1000, 1),
        "writes beside it": writes,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="provider counts, comma-separated")
    parser.add_argument("--timeout", type=float, default=2.0, help="REGISTRY_UPSTREAM_TIMEOUT, seconds")
    parser.add_argument("--runs", type=int, default=15, help="calls per catalog route and size")
    parser.add_argument("--lock-providers", type=int, default=3000)
    arguments = parser.parse_args()
    (answering_port, answering), black_hole = start_answering(), BlackHole()
    with tempfile.TemporaryDirectory() as root:
        for count in (int(size) for size in arguments.sizes.split(",")):
            print(json.dumps(measure_size(root, count, arguments.timeout, arguments.runs, answering_port, black_hole)))
        print(json.dumps(measure_write_lock(root, arguments.lock_providers, arguments.timeout, answering_port)))
    black_hole.close()
    answering.terminate()


if __name__ == "__main__":
    main()
