"""Requests per second of the registry against a bare Flask app, both under gunicorn.conf.py.

    .venv/bin/python bench/throughput.py [--rounds 5] [--seconds 5] [--connections 16] [--only "get one" ...]

Starts the registry (on a fresh SQLite file with 200 providers) and bench/bare_app.py,
each with the project's gunicorn configuration, drives both with the same load (wrk,
installed with apt-get when missing and possible; else a Python client with keep-alive
connections), interleaving the runs, and prints the median requests per second, the
registry's ratio to the bare app and the target of each. A third server, the registry with
REGISTRY_METRICS=false, gives the overhead of the metrics (GET and list write no audit
event, so that is all the operations work adds to them): the ratio of the registry to it.
Also reports the RSS of the registry's workers after warm-up and at the end, to show
memory per request stays flat.
"""

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

USERNAME, PASSWORD = "bench", "bench-password-1"
BASIC_AUTHORIZATION = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
SEEDED_PROVIDERS = 200
# name: (method, path, target ratio to the bare app, credentials: "basic" or "bearer", an API token)
SCENARIOS = {
    "get one": ("GET", "/api/v1/model_providers/{provider_id}", 0.6, "basic"),
    "get one bearer": ("GET", "/api/v1/model_providers/{provider_id}", 0.6, "bearer"),
    "list 50": ("GET", "/api/v1/model_providers?limit=50", 0.3, "basic"),
    "create": ("POST", "/api/v1/model_providers", 0.2, "basic"),
}
WRK_SCRIPT = """
wrk.method = "%(method)s"
wrk.headers["Authorization"] = "%(authorization)s"
wrk.headers["Content-Type"] = "application/json"
local threads, counter, thread_number = 0, 0, 0
function setup(thread)
  threads = threads + 1
  thread:set("number", threads)
end
function init(args)
  thread_number = wrk.thread:get("number")
end
function request()
  if wrk.method ~= "POST" then
    return wrk.format()
  end
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(
    '{"type": "openai", "base_url": "https://%(run)s-%%d-%%d.example.com/v1", "api_key": "sk-bench"}',
    thread_number, counter))
end
"""


def prepare_registry(instance_path, seeded=SEEDED_PROVIDERS):
    """A migrated database with one admin, a token of it and `seeded` providers:
    {"basic": ..., "bearer": ...} Authorization headers, and one provider's id (or None)."""
    import sqlalchemy as sa
    from flask_migrate import upgrade

    from access.crypto import cipher
    from access.tokens import create_token
    from app import create_app
    from models import PROVIDERS, User, db

    app = create_app({"REGISTRY_INSTANCE_PATH": instance_path})
    with app.app_context():
        upgrade()
        admin = User(username=USERNAME, role="admin")
        admin.set_password(PASSWORD)
        db.session.add(admin)
        seeds = [
            {
                "type": "openai",
                "base_url": f"https://seed{number}.example.com/v1",
                "name": f"P{number}",
                "sealed_api_key": cipher.seal(f"sk-seed-{number}"),
            }
            for number in range(seeded)
        ]
        if seeds:  # an empty list would insert one row of defaults
            db.session.execute(sa.insert(PROVIDERS), seeds)
        db.session.commit()
        token = create_token(admin, "bench")["token"]
        provider_id = db.session.scalars(sa.select(PROVIDERS.c.id).limit(1)).first()
        db.engine.dispose()
    return {"basic": BASIC_AUTHORIZATION, "bearer": f"Bearer {token}"}, provider_id


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """gunicorn with the project's gunicorn.conf.py serving `application` on a free port."""

    def __init__(self, application, instance_path, log_path, **settings):
        self.port = free_port()
        environ = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "REGISTRY_INSTANCE_PATH": instance_path,
            "REGISTRY_VERIFY_ON_CREATE": "false",
            "REGISTRY_PROBE_INTERVAL": "0",
            "REGISTRY_SYNC_INTERVAL": "0",
            "REGISTRY_AUDIT_PRUNE_INTERVAL": "0",
            "LOG_LEVEL": "warning",
            **settings,
        }
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", application]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_until_serving()

    def wait_until_serving(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not start serving")

    def worker_rss_kib(self):
        """The resident memory of every worker, in KiB."""
        with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as children:
            return [read_rss_kib(pid) for pid in children.read().split()]

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


def read_rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def find_or_install_wrk():
    if shutil.which("wrk"):
        return shutil.which("wrk")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing; installing it with apt-get", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "wrk"], capture_output=True)
    return shutil.which("wrk")


class WrkLoad:
    name = "wrk"

    def __init__(self, wrk, connections, script_folder):
        self.wrk = wrk
        self.connections = connections
        self.script_folder = script_folder
        self.runs = 0

    def run(self, port, method, path, authorization, seconds):
        """Requests per second; every answer must be a 2xx, or the figure would mean nothing."""
        self.runs += 1
        script = os.path.join(self.script_folder, f"run{self.runs}.lua")
        with open(script, "w") as lua:
            lua.write(WRK_SCRIPT % {"method": method, "authorization": authorization, "run": f"run{self.runs}"})
        command = [self.wrk, "-t2", f"-c{self.connections}", f"-d{seconds}s", "-s", script]
        run = subprocess.run([*command, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True)
        rate = re.search(r"Requests/sec:\s+([\d.]+)", run.stdout)
        if rate is None or "Non-2xx" in run.stdout or "Socket errors" in run.stdout:
            raise RuntimeError(f"wrk failed or requests failed in a run:\n{run.stdout}{run.stderr}")
        return float(rate.group(1))


class PythonLoad:
    """Threads, each with one keep-alive connection, sending back to back."""

    name = "python threads"

    def __init__(self, connections):
        self.connections = connections
        self.runs = 0

    def run(self, port, method, path, authorization, seconds):
        self.runs += 1
        counts = [0] * self.connections
        deadline = time.monotonic() + seconds

        def drive(slot):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = {"Authorization": authorization, "Content-Type": "application/json"}
            while time.monotonic() < deadline:
                body = None
                if method == "POST":
                    base_url = f"https://py{self.runs}-{slot}-{counts[slot]}.example.com/v1"
                    body = json.dumps({"type": "openai", "base_url": base_url, "api_key": "sk-bench"})
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                if response.status >= 300:
                    raise RuntimeError(f"{method} {path} answered {response.status}")
                counts[slot] += 1

        threads = [threading.Thread(target=drive, args=(slot,)) for slot in range(self.connections)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) / seconds


def measure(servers, load, authorizations, provider_id, scenarios, rounds, seconds):
    """{scenario: {server name: [requests per second per round]}}, runs interleaved."""
    results = {scenario: {name: [] for name in servers} for scenario in scenarios}
    for round_number in range(rounds):
        for scenario in scenarios:
            method, path, _, credentials = SCENARIOS[scenario]
            for name, server in servers.items():
                path_of_provider = path.format(provider_id=provider_id)
                rate = load.run(server.port, method, path_of_provider, authorizations[credentials], seconds)
                results[scenario][name].append(rate)
        print(f"round {round_number + 1} of {rounds} done", file=sys.stderr)
    return results


def report(results, load, rss_before, rss_after, arguments):
    """Medians of each server's rates, and the median of the ratios of runs made back to back."""
    print(
        f"\nload: {load.name}, {arguments.connections} connections, {arguments.rounds} rounds of {arguments.seconds} s"
    )
    print(f"machine: {os.cpu_count()} cores\n")
    print(f"{'scenario':<15} {'bare req/s':>11} {'registry req/s':>15} {'ratio':>6} {'target':>7}")
    for scenario, rates in results.items():
        target = SCENARIOS[scenario][2]
        bare, registry = rates["bare"], rates["registry"]
        ratio = statistics.median(ours / theirs for ours, theirs in zip(registry, bare, strict=True))
        verdict = "ok" if ratio >= target else "BELOW"
        print(
            f"{scenario:<15} {statistics.median(bare):>11.0f} {statistics.median(registry):>15.0f}"
            f" {ratio:>6.2f} {target:>7} {verdict}"
        )
    print("\noverhead of the metrics: the registry against itself with REGISTRY_METRICS=false")
    for scenario, rates in results.items():
        without = rates["registry, metrics off"]
        ratio = statistics.median(ours / theirs for ours, theirs in zip(rates["registry"], without, strict=True))
        print(f"{scenario:<10} {statistics.median(without):>11.0f} req/s without, ratio {ratio:.2f}")
    served = sum(rate * arguments.seconds for rates in results.values() for rate in rates["registry"])
    growth = (sum(rss_after) - sum(rss_before)) / served * 1000
    print(f"\nregistry worker RSS after warm-up: {rss_before} KiB; at the end: {rss_after} KiB")
    print(f"{served:.0f} requests in between: {growth:.2f} KiB per 1000 requests")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--python-client", action="store_true", help="use the Python client even where wrk exists")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios to run")
    arguments = parser.parse_args()

    workspace = tempfile.mkdtemp(prefix="registry-bench-")
    instance_path = os.path.join(workspace, "instance")
    authorizations, provider_id = prepare_registry(instance_path)
    wrk = None if arguments.python_client else find_or_install_wrk()
    load = WrkLoad(wrk, arguments.connections, workspace) if wrk else PythonLoad(arguments.connections)
    servers = {
        "bare": Server("bench.bare_app:app", instance_path, os.path.join(workspace, "bare.log")),
        "registry": Server("wsgi:app", instance_path, os.path.join(workspace, "registry.log")),
        "registry, metrics off": Server(
            "wsgi:app", instance_path, os.path.join(workspace, "registry-no-metrics.log"), REGISTRY_METRICS="false"
        ),
    }
    try:
        measure(servers, load, authorizations, provider_id, arguments.only, rounds=1, seconds=2)  # warm-up
        rss_before = servers["registry"].worker_rss_kib()
        results = measure(
            servers, load, authorizations, provider_id, arguments.only, arguments.rounds, arguments.seconds
        )
        rss_after = servers["registry"].worker_rss_kib()
    finally:
        for server in servers.values():
            server.stop()
    report(results, load, rss_before, rss_after, arguments)
    shutil.rmtree(workspace)


if __name__ == "__main__":
    main()
