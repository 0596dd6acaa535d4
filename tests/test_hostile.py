"""Hostile requests over a real socket to gunicorn: each a clean 4xx problem document."""

import base64
import json
import socket

import httpx
import pytest

from tests.conftest import PASSWORDS, Gunicorn, basic_auth

pytestmark = pytest.mark.server  # one gunicorn for the module

PROVIDERS = "/api/v1/model_providers"
ADMIN = basic_auth("admin", PASSWORDS["admin"])


@pytest.fixture(scope="module")
def server(tmp_path_factory, databases):
    instance = tmp_path_factory.mktemp("hostile")
    databases.create(instance, True)
    server = Gunicorn(instance, workers=1)
    yield server
    server.kill()
    databases.drop(instance)


def raw_request(server, head, body=b""):
    """Send bytes as they are; the status, headers and body the client gets back."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(head + b"\r\n\r\n" + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def request_head(method, target, *headers):
    lines = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: registry", b"Connection: close", *headers]
    return b"\r\n".join(lines)


def json_post(body, *headers):
    """A create with admin credentials; its head and body, for raw_request."""
    head = request_head(
        "POST", PROVIDERS.encode(), b"Authorization: " + ADMIN.encode(), b"Content-Type: application/json", *headers
    )
    return head, body


def chunked(body, chunk_size=16384):
    chunks = [body[start : start + chunk_size] for start in range(0, len(body), chunk_size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


def assert_problem(answer, status):
    got_status, headers, body = answer
    assert got_status == status, body
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


def authorized_get(target, *headers):
    return request_head("GET", target, b"Authorization: " + ADMIN.encode(), *headers)


def credentials(username, password):
    return b"Authorization: Basic " + base64.b64encode(username + b":" + password)


DEEP = b"[" * 30000 + b"]" * 30000


@pytest.mark.parametrize(
    "body, status",
    [
        (DEEP, 400),
        (b'{"type": "openai", "name": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400),
        (b'{"type": "openai", "name": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}', 422),
        (b'{"type": "openai", "name": "\xff\xfe"}', 400),
        (b'{"type": "openai", "limit": ' + b"9" * 5000 + b"}", 400),
        (b'{"name": "' + b"n" * 70000 + b'"}', 413),
    ],
    ids=["deep array", "deep field", "nested field", "invalid utf-8", "huge number", "over 64 KiB"],
)
def test_hostile_bodies_are_refused(server, body, status):
    assert_problem(raw_request(server, *json_post(body, b"Content-Length: %d" % len(body))), status)


def test_chunked_body_over_64_kib_is_413(server):
    body = b'{"name": "' + b"n" * 70000 + b'"}'
    assert_problem(raw_request(server, *json_post(chunked(body), b"Transfer-Encoding: chunked")), 413)


def test_huge_declared_body_is_413_before_it_is_read(server):
    head, _ = json_post(b"", b"Content-Length: 1000000000")
    assert_problem(raw_request(server, head, b'{"name": "'), 413)


def test_huge_body_sent_by_a_client_library_is_413(server):
    with httpx.Client(base_url=server.base_url, auth=("admin", PASSWORDS["admin"])) as admin:
        response = admin.post(PROVIDERS, content=b"[" * 10_000_000, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "target, status",
    [
        (PROVIDERS.encode() + b"?registry=" + b"r" * 4000, 200),
        (PROVIDERS.encode() + b"?page_token=" + b"t" * 4000, 422),
        (PROVIDERS.encode() + b"?type=" + b"t" * 5000, 414),
        (PROVIDERS.encode() + b"?type=%ff%fe", 422),
        (PROVIDERS.encode() + b"/%ff%fe", 404),
        (PROVIDERS.encode() + b"?type=\xff", 400),
        (PROVIDERS.encode() + b"/\xff\xfe", 400),
    ],
    ids=[
        "long query",
        "long page token",
        "query over the line limit",
        "percent-encoded invalid utf-8",
        "invalid utf-8 id",
        "raw invalid utf-8 query",
        "raw invalid utf-8 path",
    ],
)
def test_long_or_invalid_request_lines(server, target, status):
    answer = raw_request(server, authorized_get(target))
    if status == 200:
        assert answer[0] == 200 and json.loads(answer[2])["total_count"] == 0
    else:
        assert_problem(answer, status)


@pytest.mark.parametrize(
    "headers, status",
    [
        ([b"X-Padding: " + b"p" * 9000], 431),
        ([b"X-Padding-%d: p" % number for number in range(120)], 431),
        ([b"X-Odd: \xff\xfe"], 200),
    ],
    ids=["header over 8190 bytes", "over 100 headers", "invalid utf-8 header"],
)
def test_long_many_or_odd_headers(server, headers, status):
    answer = raw_request(server, authorized_get(PROVIDERS.encode(), *headers))
    if status == 200:
        assert answer[0] == 200
    else:
        assert_problem(answer, status)


@pytest.mark.parametrize(
    "authorization, status",
    [
        (credentials(b"a" * 5000, b"b" * 500), 401),
        (credentials(b"admin", b"p" * 6000), 401),
        (credentials(b"a" * 7000, b"b"), 431),
        (credentials(b"\xff\xfe", b"\xff"), 401),
        (b"Authorization: Bearer " + PASSWORDS["admin"].encode(), 401),
        (b'Authorization: Digest username="admin", realm="model-provider-registry"', 401),
        (b"Authorization: Basic", 401),
        (b"Authorization: Basic !!not-base64!!", 401),
        (b"Authorization: " + b"x" * 8000, 401),
    ],
    ids=[
        "long username",
        "long password",
        "credentials over the header limit",
        "invalid utf-8",
        "bearer",
        "digest",
        "basic without credentials",
        "basic not base64",
        "long scheme",
    ],
)
def test_odd_credentials_are_401_or_431(server, authorization, status):
    problem = assert_problem(raw_request(server, request_head("GET", PROVIDERS.encode(), authorization)), status)
    assert PASSWORDS["admin"] not in problem["detail"]


def test_not_http_at_all_is_400(server):
    assert_problem(raw_request(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), 400)


def test_hostile_requests_changed_nothing(server):
    with httpx.Client(base_url=server.base_url, auth=("admin", PASSWORDS["admin"])) as admin:
        assert admin.get(PROVIDERS).json()["total_count"] == 0
    assert "Traceback" not in server.log()
