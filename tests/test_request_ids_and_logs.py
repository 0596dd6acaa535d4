"""X-Request-ID on every response and in every log line; escaped lines; LOG_FORMAT=json."""

import json
import re
import socket
import time

import pytest

from observability.logs import escape
from tests.conftest import provider_body

PROVIDERS = "/api/v1/model_providers"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
SECRET = "sk-logged-nowhere-5150"


def test_a_sane_request_id_is_echoed(reader):
    response = reader.get(PROVIDERS, headers={"X-Request-ID": "client.trace-42_A"})
    assert response.headers["X-Request-ID"] == "client.trace-42_A"


def test_a_request_without_an_id_gets_a_new_one_each_time(reader):
    first, second = (reader.get(PROVIDERS).headers["X-Request-ID"] for _ in range(2))
    assert GENERATED_ID.fullmatch(first) and GENERATED_ID.fullmatch(second) and first != second


@pytest.mark.parametrize(
    "insane", ["", "x" * 129, "has space", "semi;colon", "new\tline", "ünïcode", "a/b", "$(id)"], ids=repr
)
def test_an_insane_request_id_is_replaced(reader, insane):
    response = reader.get(PROVIDERS, headers={"X-Request-ID": insane})
    assert response.status_code == 200
    assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"])


def test_the_longest_sane_id_is_kept(reader):
    sent = "a" * 128
    assert reader.get(PROVIDERS, headers={"X-Request-ID": sent}).headers["X-Request-ID"] == sent


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/no/such/path", 404), ("DELETE", "/healthz", 405), ("GET", f"{PROVIDERS}/not-an-id", 404)],
)
def test_errors_carry_the_request_id_too(admin, method, path, status):
    response = admin.open(path, method=method, headers={"X-Request-ID": "err-1"})
    assert response.status_code == status
    assert response.headers["X-Request-ID"] == "err-1"
    assert response.headers.getlist("X-Request-ID") == ["err-1"]


def test_refused_credentials_carry_the_request_id(anonymous):
    response = anonymous.get(PROVIDERS, headers={"X-Request-ID": "no-auth-7"})
    assert response.status_code == 401 and response.headers["X-Request-ID"] == "no-auth-7"


def test_escape_leaves_no_control_character_and_keeps_text_readable():
    escaped = escape("a\nb\r\x1b[31mc\x00\x7f\x85\u2028d\\x0a café")
    assert escaped == "a\\x0ab\\x0d\\x1b[31mc\\x00\\x7f\\x85\\u2028d\\\\x0a café"
    assert not any(ord(character) < 0x20 or 0x7F <= ord(character) <= 0x9F for character in escaped)


def raw_request(port, request_line):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request_line + b"\r\nHost: x\r\nConnection: close\r\nX-Request-ID: raw-1\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


FORGING_PATHS = [
    b"GET /api/v1/x%0a127.0.0.1%20%22GET%20/forged%22%20200 HTTP/1.1",
    b"GET /api/v1/x%0d%0aforged-line%1b[2J%1b]0;title%07%c2%85%e2%80%a8 HTTP/1.1",
]


def test_control_characters_in_a_path_forge_no_access_log_line(start_gunicorn):
    server = start_gunicorn(workers=1)
    for request_line in FORGING_PATHS:
        assert b"X-Request-ID: raw-1" in raw_request(server.port, request_line)
    server.kill()
    log = server.log()
    assert not any(line.startswith(('127.0.0.1 "GET /forged', "forged")) for line in log.splitlines())
    assert "\x1b" not in log and "\x07" not in log and "\u2028" not in log and "\x85" not in log
    assert '"GET /api/v1/x\\x0a127.0.0.1 \\"GET /forged\\" 200" 404' in log  # gunicorn escapes quotes
    assert "\\x0d\\x0aforged-line\\x1b[2J\\x1b]0;title\\x07\\x85\\u2028" in log
    access_lines = [line for line in log.splitlines() if line.startswith('127.0.0.1 "GET /api/v1/x')]
    assert len(access_lines) == 2 and all("request_id=raw-1" in line for line in access_lines)


def test_gunicorns_own_refusals_carry_a_request_id(start_gunicorn):
    server = start_gunicorn(workers=1)
    answer = raw_request(server.port, b"GET /" + b"x" * 5000 + b" HTTP/1.1")
    assert answer.startswith(b"HTTP/1.1 414")
    assert GENERATED_ID.fullmatch(re.search(rb"X-Request-ID: (\S+)", answer).group(1).decode())


def test_every_log_line_of_a_request_carries_its_id_and_no_secret(start_gunicorn, fake_upstream):
    upstream = fake_upstream(api_key=SECRET)
    server = start_gunicorn(workers=2, REGISTRY_VERIFY_ON_CREATE="true")  # verified, its models are indexed
    body = provider_body(base_url=upstream.base_url, api_key=SECRET)
    with server.client("admin") as admin:
        assert admin.post(PROVIDERS, json=body, headers={"X-Request-ID": "mk-1"}).status_code == 201
    with server.client("service") as service:
        resolved = service.post(
            f"{PROVIDERS}/resolve", json={"model": "openai:gpt-4o"}, headers={"X-Request-ID": "rs-1"}
        )
    assert resolved.status_code == 200 and resolved.headers["X-Request-ID"] == "rs-1"
    server.kill()
    log = server.log()
    assert re.search(r'"POST /api/v1/model_providers" 201 .* request_id=mk-1 user=admin', log)
    assert re.search(r'"POST /api/v1/model_providers/resolve" 200 .* request_id=rs-1 user=service', log)
    [resolve_line] = [line for line in log.splitlines() if "resolve by user service" in line]
    assert "[INFO] [rs-1] resolve by user service" in resolve_line  # the app's own line
    assert SECRET not in log


def test_json_logs_parse_line_by_line_with_the_request_fields(start_gunicorn):
    server = start_gunicorn(workers=2, LOG_FORMAT="json")
    with server.client("admin") as admin:
        started = time.perf_counter()
        created = admin.post(PROVIDERS, json=provider_body(api_key=SECRET), headers={"X-Request-ID": "js-1"})
        create_round_trip_ms = (time.perf_counter() - started) * 1000
        assert created.status_code == 201
        assert admin.get("/no/such/path%1b[31m").status_code == 404
    raw_request(server.port, FORGING_PATHS[0])
    server.kill()
    lines = server.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(records) > 5
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys()
        assert record["time"].endswith("Z")
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "gunicorn.access"} <= loggers
    access = [record for record in records if record["logger"] == "gunicorn.access"]
    for record in access:
        assert {"request_id", "method", "path", "status", "duration_ms", "user"} <= record.keys()
        assert isinstance(record["status"], int) and isinstance(record["duration_ms"], float)
    [create] = [record for record in access if record["request_id"] == "js-1"]
    assert create["method"] == "POST" and create["path"] == PROVIDERS and create["status"] == 201
    # Milliseconds: the same order as the client's round trip (in seconds or microseconds it
    # would be a thousand times off); the server's clock may stop after the client's.
    assert create_round_trip_ms / 100 < create["duration_ms"] < create_round_trip_ms * 10
    assert create["user"] == "admin"
    [forged] = [record for record in access if record["request_id"] == "raw-1"]
    assert forged["path"] == '/api/v1/x\\x0a127.0.0.1 "GET /forged" 200'
    assert SECRET not in "\n".join(lines)


def test_an_unknown_log_format_stops_the_server_with_a_reason(start_gunicorn):
    with pytest.raises(RuntimeError):
        start_gunicorn(workers=1, LOG_FORMAT="xml")
