"""What the gateway adds: the registry's chat completions, Responses and Messages routes against a
local fake model server, side by side with calling the same fake directly, and with a floor:
a bare Flask relay (bench/relay_app.py) forwarding the same calls under the same gunicorn
settings.

    .venv/bin/python bench/gateway.py [--rounds 5] [--calls 200] [--streams 500] [--protocol-streams 300]
                                      [--stream-seconds 10] [--relay-streams 100] [--relay-seconds 5]
                                      [--flap-calls 1000] [--flood-clients 32] [--creates 200]
                                      [--only latency ...]

Starts the fake (tests/fakes/, in its own process), the registry and the relay under
`make run`'s defaults (gunicorn.conf.py; REGISTRY_DEFAULT_MAX_PARALLEL raised, since the
held and relay scenarios open hundreds of streams with one token), registers the fake as an
openai provider, makes a token without limits and a limited one (every limit set, none
reached), then:

- latency: non-streaming calls one after another; what each registry route (chat
  completions with the token without limits, the same with the limited token, Responses,
  Messages) and the relay add (median and p99), the ratio of chat completions' added median
  to the relay's, and of each other route's to chat completions';
- first-chunk: streaming calls one after another; the same for the time to the first event;
- held: N streams at once through each protocol's route, a chunk every 0.5 s (opened over
  the first 2 s, as clients arrive, not in one instant), with /healthz asked every 0.2 s
  meanwhile (from another process); streams refused or cut, and /healthz's median and
  slowest answer;
- relay: N streams at once of 50 chunks a second, direct and through the registry; the
  chunks a second the client gets, and the registry's ratio to direct;
- flapping: a model with two providers, the older answering 503 every other second, called
  one call after another through two registries on one database, one with cooldowns off
  (every call tries the flapping provider first) and one with the default 30 s; the mean
  and p99 latency each adds over the same calls while both providers answer, and the
  calls that met a failed attempt;
- creates: provider creates one after another, alone and while N clients call models as
  fast as they can with the limited token (and, for comparison, with the other): on SQLite
  every admission and every call's end takes the write lock a create needs.

The runs of the endpoints interleave (which goes first rotates too) and the figures are
medians over the rounds. Targets are printed beside each figure.
"""

import argparse
import asyncio
import http.client
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from throughput import PASSWORD, USERNAME, Server, prepare_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODEL_KEY = "sk-bench"
SCENARIOS = ("latency", "first-chunk", "held", "relay", "flapping", "creates")
FLAP_SECONDS = 1.0
COOLDOWNS = {"cooldown off": "0", "cooldown 30 s": "30"}  # registry name: REGISTRY_GATEWAY_COOLDOWN
# What another protocol may add to a call, against what chat completions add.
PROTOCOL_TARGET = 1.2
# What a limited token's call may add, against what an unlimited token's adds.
LIMITED_TARGET = 1.1
# Every limit set, none reached in a run: each call pays for all of the bookkeeping.
BENCH_LIMITS = {
    "requests_per_minute": 1_000_000,
    "tokens_per_minute": 2_000_000_000,
    "tokens_per_day": 2_000_000_000,
    "max_parallel": 1000,
}


def start_fake():
    command = [sys.executable, "-m", "tests.fakes"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    return process, int(process.stdout.readline())


def prompt(pieces=None, interval=None):
    """The prompt, with the fake model's knobs: that many stream pieces, that far apart."""
    knobs = {"fake_pieces": pieces, "fake_interval": interval}
    return " ".join(["Hi", *(f"{name}={value}" for name, value in knobs.items() if value is not None)])


class ChatProtocol:
    """OpenAI's chat completions: what the fake, the relay and the registry's first route speak."""

    def body(self, model, text, stream):
        return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}

    def is_piece(self, line):
        return line.startswith("data: {") and "tok " in line

    def is_end(self, line):
        return line == "data: [DONE]"


class ResponsesProtocol:
    def body(self, model, text, stream):
        return {"model": model, "input": text, "stream": stream}

    def is_piece(self, line):
        return line.startswith("data: ") and '"type":"response.output_text.delta"' in line

    def is_end(self, line):
        return line == "event: response.completed"


class MessagesProtocol:
    def body(self, model, text, stream):
        return {"model": model, "max_tokens": 1024, "messages": [{"role": "user", "content": text}], "stream": stream}

    def is_piece(self, line):
        return line.startswith("data: ") and '"type":"text_delta"' in line

    def is_end(self, line):
        return line == "event: message_stop"


class Endpoint:
    """Where a client sends a prompt: the fake itself, the relay, or a route of the registry's gateway."""

    def __init__(self, name, url, headers, model, protocol):
        self.name, self.url, self.headers, self.model, self.protocol = name, url, headers, model, protocol

    def body(self, stream=False, pieces=None, interval=None):
        return self.protocol.body(self.model, prompt(pieces, interval), stream)


def endpoints(fake_port, registry_port, relay_port, token_authorization, limited_authorization):
    """(direct, the registry's routes with chat completions first, relay)."""
    chat = ChatProtocol()
    direct = Endpoint(
        "direct",
        f"http://127.0.0.1:{fake_port}/v1/chat/completions",
        {"Authorization": f"Bearer {MODEL_KEY}"},
        "gpt-4o",
        chat,
    )
    gateway = f"http://127.0.0.1:{registry_port}/api/v1/openai"
    registry_headers = {"Authorization": token_authorization}
    routes = [
        Endpoint("registry", f"{gateway}/chat/completions", registry_headers, "openai:gpt-4o", chat),
        Endpoint(
            "limited", f"{gateway}/chat/completions", {"Authorization": limited_authorization}, "openai:gpt-4o", chat
        ),
        Endpoint("responses", f"{gateway}/responses", registry_headers, "openai:gpt-4o", ResponsesProtocol()),
        Endpoint(
            "messages",
            f"http://127.0.0.1:{registry_port}/api/v1/anthropic/v1/messages",
            {**registry_headers, "anthropic-version": "2023-06-01"},
            "openai:gpt-4o",
            MessagesProtocol(),
        ),
    ]
    relay = Endpoint("relay", f"http://127.0.0.1:{relay_port}/v1/chat/completions", direct.headers, "gpt-4o", chat)
    return direct, routes, relay


def register_fake(registry_port, fake_port):
    provider = {"type": "openai", "base_url": f"http://127.0.0.1:{fake_port}/v1", "api_key": MODEL_KEY}
    response = httpx.post(
        f"http://127.0.0.1:{registry_port}/api/v1/model_providers", json=provider, auth=(USERNAME, PASSWORD)
    )
    response.raise_for_status()


def limited_token(registry_port):
    """The Authorization header of an admin token with BENCH_LIMITS."""
    response = httpx.post(
        f"http://127.0.0.1:{registry_port}/api/v1/tokens",
        json={"name": "bench-limited", "limits": BENCH_LIMITS},
        auth=(USERNAME, PASSWORD),
    )
    response.raise_for_status()
    return f"Bearer {response.json()['token']}"


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def interleaved(rounds, *endpoints):
    """(round, endpoint) pairs, every endpoint once a round, which one first rotating."""
    for number in range(rounds):
        first = number % len(endpoints)
        for endpoint in endpoints[first:] + endpoints[:first]:
            yield number, endpoint


def timed_calls(client, endpoint, calls, stream):
    """Seconds per call (to the whole answer, or with `stream` to its first chunk)."""
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        body = endpoint.body(stream=True, pieces=3) if stream else endpoint.body()
        with client.stream("POST", endpoint.url, json=body, headers=endpoint.headers) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{endpoint.name} answered {response.status_code}")
            lines = response.iter_lines()
            if stream:
                next(line for line in lines if line.startswith("data:"))
                timings.append(time.perf_counter() - started)
            for _ in lines:
                pass
            if not stream:
                timings.append(time.perf_counter() - started)
    return timings


def warm_up(relaying):
    """Calls enough for every worker to have opened its connections to the fake."""
    for _ in range(20):
        # A new connection each time, so the calls spread over the workers.
        httpx.post(relaying.url, json=relaying.body(), headers=relaying.headers, timeout=60).raise_for_status()


def added_time(options, direct, *relaying, stream):
    """What each of `relaying` (the registry's routes, then the relay) adds over `direct`; the
    ratio of chat completions' added median to the relay's, and of each other route's to chat
    completions'."""
    names = [endpoint.name for endpoint in (direct, *relaying)]
    per_round = {name: [] for name in names}
    every = {name: [] for name in names}
    with httpx.Client(timeout=60) as client:
        for endpoint in (direct, *relaying):
            timed_calls(client, endpoint, 10, stream)  # warm up the connections
        for _, endpoint in interleaved(options.rounds, direct, *relaying):
            timings = timed_calls(client, endpoint, options.calls, stream)
            per_round[endpoint.name].append(statistics.median(timings))
            every[endpoint.name] += timings
    figures = {"direct median ms": statistics.median(per_round["direct"]) * 1000}
    for endpoint in relaying:
        rounds = zip(per_round[endpoint.name], per_round["direct"], strict=True)
        added = [through - straight for through, straight in rounds]
        figures[f"{endpoint.name} adds median ms"] = statistics.median(added) * 1000
        p99_added = percentile(every[endpoint.name], 0.99) - percentile(every["direct"], 0.99)
        figures[f"{endpoint.name} adds p99 ms"] = p99_added * 1000

    def ratio(through, to):
        figures[f"{through}/{to} added"] = figures[f"{through} adds median ms"] / figures[f"{to} adds median ms"]

    chat, *others, relay = (endpoint.name for endpoint in relaying)
    ratio(chat, relay)
    for other in others:
        ratio(other, chat)
    return figures


async def one_stream(client, endpoint, pieces, interval, start_after=0.0):
    """(content chunks received, saw the stream's end); (None, False) when refused."""
    await asyncio.sleep(start_after)
    body = endpoint.body(stream=True, pieces=pieces, interval=interval)
    chunks, done = 0, False
    try:
        async with client.stream("POST", endpoint.url, json=body, headers=endpoint.headers) as response:
            if response.status_code != 200:
                return None, False
            async for line in response.aiter_lines():
                if endpoint.protocol.is_end(line):
                    done = True
                elif endpoint.protocol.is_piece(line):
                    chunks += 1
    except httpx.HTTPError:
        return (None, False) if chunks == 0 else (chunks, False)
    return chunks, done


async def many_streams(endpoint, count, pieces, interval, ramp_seconds=0.0):
    """Streams at once, opened evenly over `ramp_seconds`: [(chunks, done)] and the seconds taken."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(one_stream(client, endpoint, pieces, interval, number * ramp_seconds / count) for number in range(count))
        )
        return outcomes, time.perf_counter() - started


def health_latencies(registry_port, stop, results):
    """/healthz every 0.2 s until `stop` is set, from a process of its own: the streams' client
    keeps its own event loop busy, which would otherwise count in these latencies."""
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", registry_port, timeout=10)
        connection.request("GET", "/healthz")
        connection.getresponse().read()
        connection.close()
        latencies.append(time.perf_counter() - started)
        stop.wait(0.2)
    results.put(latencies)


async def held_streams(options, route, count, registry_port):
    pieces = int(options.stream_seconds / 0.5)
    stop, results = multiprocessing.Event(), multiprocessing.Queue()
    health = multiprocessing.Process(target=health_latencies, args=(registry_port, stop, results))
    health.start()
    outcomes, elapsed = await many_streams(route, count, pieces, 0.5, options.ramp_seconds)
    stop.set()
    latencies = results.get()
    health.join()
    refused = sum(1 for chunks, _ in outcomes if chunks is None)
    cut = sum(1 for chunks, done in outcomes if chunks is not None and (chunks < pieces or not done))
    return {
        "streams": count,
        "refused": refused,
        "cut": cut,
        "seconds": elapsed,
        "healthz max ms": max(latencies) * 1000,
        "healthz median ms": statistics.median(latencies) * 1000,
    }


def relay_rate(options, direct, registry):
    pieces = int(options.relay_seconds * 50)
    rates = {"direct": [], "registry": []}
    for _, endpoint in interleaved(options.rounds, direct, registry):
        outcomes, elapsed = asyncio.run(many_streams(endpoint, options.relay_streams, pieces, 1 / 50))
        rates[endpoint.name].append(sum(chunks or 0 for chunks, _ in outcomes) / elapsed)
    ratios = [reg / dir for reg, dir in zip(rates["registry"], rates["direct"], strict=True)]
    return {
        "direct chunks/s": statistics.median(rates["direct"]),
        "registry chunks/s": statistics.median(rates["registry"]),
        "ratio": statistics.median(ratios),
    }


def serve_flapping(ports, flapping):
    """A fake model server in a process of its own, answering every model call with 503 in
    every other FLAP_SECONDS while `flapping` is set."""
    from tests.fakes import FakeUpstream

    fake = FakeUpstream("openai", api_key=MODEL_KEY, models=["gpt-4o"])
    ports.put(fake.port)
    while True:
        if flapping.is_set() and int(time.monotonic() / FLAP_SECONDS) % 2:
            fake.fail_with(503, "flapping")
        else:
            fake.failure = None
        time.sleep(0.01)


def start_flapping_fake():
    ports, flapping = multiprocessing.Queue(), multiprocessing.Event()
    process = multiprocessing.Process(target=serve_flapping, args=(ports, flapping), daemon=True)
    process.start()
    return process, ports.get(timeout=30), flapping


def failed_attempts(log_path):
    with open(log_path, errors="replace") as log:
        return sum(1 for line in log if "trying the next provider" in line)


def flapping_latency(options):
    """What a flapping provider adds to each call, with cooldowns off and on."""
    instance_path = tempfile.mkdtemp(prefix="bench-flapping-")
    authorizations, _ = prepare_registry(instance_path, seeded=0)
    steady, steady_port = start_fake()
    flapper, flapper_port, flapping = start_flapping_fake()
    logs = {name: os.path.join(instance_path, f"{name.replace(' ', '-')}.log") for name in COOLDOWNS}
    servers = {
        name: Server(
            "wsgi:app", instance_path, logs[name], REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_GATEWAY_COOLDOWN=cooldown
        )
        for name, cooldown in COOLDOWNS.items()
    }
    try:
        first_server = next(iter(servers.values()))
        for fake_port in (flapper_port, steady_port):  # the flapping provider is the older: tried first
            register_fake(first_server.port, fake_port)
        registries = [
            Endpoint(
                name,
                f"http://127.0.0.1:{server.port}/api/v1/openai/chat/completions",
                {"Authorization": authorizations["bearer"]},
                "openai:gpt-4o",
                ChatProtocol(),
            )
            for name, server in servers.items()
        ]
        for registry in registries:
            warm_up(registry)
        timings = {(registry.name, flaps): [] for registry in registries for flaps in (False, True)}
        with httpx.Client(timeout=60) as client:
            for _, registry in interleaved(options.rounds, *registries):
                for flaps in (False, True):
                    flapping.set() if flaps else flapping.clear()
                    timings[registry.name, flaps] += timed_calls(client, registry, options.flap_calls, stream=False)
        flapping.clear()
        for registry in registries:
            steady_calls, flapping_calls = timings[registry.name, False], timings[registry.name, True]
            figures = {
                "mean adds ms": (statistics.mean(flapping_calls) - statistics.mean(steady_calls)) * 1000,
                "p99 adds ms": (percentile(flapping_calls, 0.99) - percentile(steady_calls, 0.99)) * 1000,
                "failed attempts": failed_attempts(logs[registry.name]),
                "calls": len(flapping_calls),
            }
            report(registry.name, figures, "with the cooldown, a failed attempt once per 30 s and worker")
    finally:
        for server in servers.values():
            server.stop()
        os.killpg(steady.pid, 15)
        steady.wait(timeout=10)
        flapper.terminate()


def call_as_fast_as_possible(endpoint, clients, stop, counts):
    """`clients` connections calling the endpoint one call after another until `stop`, in a
    process of its own; the statuses they got go to `counts`."""

    async def calling(client, statuses):
        while not stop.is_set():
            response = await client.post(endpoint.url, json=endpoint.body(), headers=endpoint.headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    async def all_clients():
        statuses = {}
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await asyncio.gather(*(calling(client, statuses) for _ in range(clients)))
        return statuses

    counts.put(asyncio.run(all_clients()))


def timed_creates(registry_port, count, label):
    """Seconds of each of `count` provider creates (verification off: the database's part)."""
    timings = []
    with httpx.Client(base_url=f"http://127.0.0.1:{registry_port}", auth=(USERNAME, PASSWORD), timeout=60) as admin:
        for number in range(count):
            provider = {"type": "openai", "base_url": f"https://{label}-{number}.example.com/v1", "api_key": "sk-x"}
            started = time.perf_counter()
            admin.post("/api/v1/model_providers", json=provider, params={"verify": "false"}).raise_for_status()
            timings.append(time.perf_counter() - started)
    return timings


def creates_during(options, registry_port, endpoint, label):
    """Create timings while `endpoint` is called by the flood clients, and the calls they made."""
    stop, counts = multiprocessing.Event(), multiprocessing.Queue()
    flooding = (endpoint, options.flood_clients, stop, counts)
    flood = multiprocessing.Process(target=call_as_fast_as_possible, args=flooding)
    flood.start()
    time.sleep(1)  # the flood under way
    started = time.perf_counter()
    timings = timed_creates(registry_port, options.creates, label)
    elapsed = time.perf_counter() - started
    stop.set()
    statuses = counts.get()
    flood.join()
    return timings, sum(statuses.values()) / (elapsed + 1), statuses


def creates_under_flood(options, registry_port, registry, limited):
    """Creates alone, during a flood of unlimited calls and during one of limited calls."""
    figures = {}
    alone = timed_creates(registry_port, options.creates, "alone")
    figures["alone median ms"] = statistics.median(alone) * 1000
    for endpoint in (registry, limited):
        timings, calls_per_second, statuses = creates_during(options, registry_port, endpoint, endpoint.name)
        if set(statuses) != {200}:
            raise RuntimeError(f"the {endpoint.name} flood was answered {statuses}")
        figures[f"{endpoint.name} flood calls/s"] = calls_per_second
        figures[f"{endpoint.name} flood median ms"] = statistics.median(timings) * 1000
        figures[f"{endpoint.name} flood p99 ms"] = percentile(timings, 0.99) * 1000
        figures[f"{endpoint.name} flood max ms"] = max(timings) * 1000
    figures["limited/unlimited median"] = figures["limited flood median ms"] / figures["registry flood median ms"]
    return figures


def report(name, figures, target):
    shown = ", ".join(
        f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in figures.items()
    )
    print(f"{name:15} {shown}   (target: {target})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="calls per round of latency and first-chunk")
    parser.add_argument("--streams", type=int, default=500, help="chat completions streams held at once")
    parser.add_argument(
        "--protocol-streams", type=int, default=300, help="streams held at once through each other protocol's route"
    )
    parser.add_argument("--stream-seconds", type=float, default=10)
    parser.add_argument("--ramp-seconds", type=float, default=2, help="the held streams open evenly over this time")
    parser.add_argument("--relay-streams", type=int, default=100)
    parser.add_argument("--relay-seconds", type=float, default=5)
    parser.add_argument("--flap-calls", type=int, default=1000, help="calls per round of flapping, each state")
    parser.add_argument("--flood-clients", type=int, default=32, help="clients calling models during the creates")
    parser.add_argument("--creates", type=int, default=200, help="creates timed alone and during each flood")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    options = parser.parse_args()
    if "flapping" in options.only:  # two registries and two fakes of its own
        flapping_latency(options)
        options.only = [scenario for scenario in options.only if scenario != "flapping"]
        if not options.only:
            return

    instance_path = tempfile.mkdtemp(prefix="bench-gateway-")
    # No provider but the fake, so no traffic leaves the machine; calls carry an API token, as agents' do.
    authorizations, _ = prepare_registry(instance_path, seeded=0)
    fake, fake_port = start_fake()
    # Verified on create, so the fake's models are in the index the gateway routes by.
    log_path = os.path.join(instance_path, "gunicorn.log")
    server = Server(
        "wsgi:app", instance_path, log_path, REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_DEFAULT_MAX_PARALLEL="1000"
    )
    relay_log_path = os.path.join(instance_path, "relay.log")
    relay_server = Server(
        "bench.relay_app:app", instance_path, relay_log_path, RELAY_UPSTREAM=f"http://127.0.0.1:{fake_port}"
    )
    try:
        register_fake(server.port, fake_port)
        direct, routes, relay = endpoints(
            fake_port, server.port, relay_server.port, authorizations["bearer"], limited_token(server.port)
        )
        registry, limited = routes[:2]
        for route in routes:
            warm_up(route)
        warm_up(relay)
        protocol_target = (
            f"limited adds <= {LIMITED_TARGET} x what registry adds; "
            f"each other route adds <= {PROTOCOL_TARGET} x what registry adds"
        )
        if "latency" in options.only:
            figures = added_time(options, direct, *routes, relay, stream=False)
            target = f"registry adds <= 3 ms median, <= 10 ms p99; registry/relay added <= 1.82; {protocol_target}"
            report("latency", figures, target)
        if "first-chunk" in options.only:
            figures = added_time(options, direct, *routes, relay, stream=True)
            target = f"registry adds <= 5 ms median; registry/relay added <= 1.82; {protocol_target}"
            report("first chunk", figures, target)
        if "held" in options.only:
            for route in (route for route in routes if route is not limited):
                count = options.streams if route is registry else options.protocol_streams
                figures = asyncio.run(held_streams(options, route, count, server.port))
                report(f"held {route.name}", figures, "none refused or cut, /healthz within 100 ms at the median")
        if "relay" in options.only:
            report("relay", relay_rate(options, direct, registry), "ratio >= 0.9")
        if "creates" in options.only:
            figures = creates_under_flood(options, server.port, registry, limited)
            report("creates", figures, "limited/unlimited median <= 1.5, none over 1 s")
    finally:
        server.stop()
        relay_server.stop()
        os.killpg(fake.pid, 15)
        fake.wait(timeout=10)
    print(f"registry log: {os.path.join(instance_path, 'gunicorn.log')}")


if __name__ == "__main__":
    main()
