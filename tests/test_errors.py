"""Every error status of the contract is a problem document that changes nothing."""

import base64
import json

import pytest

from api.errors import anthropic_error_document
from tests.conftest import basic_auth, provider_body

PROVIDERS = "/api/v1/model_providers"


def assert_problem(response, status):
    assert response.status_code == status
    assert response.content_type == "application/problem+json"
    problem = response.get_json()
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    assert "Traceback" not in response.get_data(as_text=True)
    return problem


def page_token(**position):
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def count(client):
    return client.get(PROVIDERS).get_json()["total_count"]


@pytest.mark.parametrize("body", ["{not json", '{"type": "openai",', "\xff\xfe", ""])
def test_body_that_is_not_json_is_400(admin, body):
    response = admin.post(PROVIDERS, data=body, content_type="application/json")
    assert_problem(response, 400)
    assert count(admin) == 0


@pytest.mark.parametrize("body", ["[]", '["openai"]', "42", '"text"', "null", "true"])
def test_body_that_is_not_an_object_is_400(admin, body):
    assert_problem(admin.post(PROVIDERS, data=body, content_type="application/json"), 400)


def nested_list(depth):
    return "[" * depth + "]" * depth


# Python's JSON parser gives up past the interpreter's recursion limit (1000 frames). These
# bodies are nested far deeper, yet under the 64 KiB limit, so the parser does read them.
@pytest.mark.parametrize("body", [nested_list(30000), '{"name": ' + nested_list(30000) + "}"])
def test_json_nested_deeper_than_the_parser_takes_is_400(admin, body):
    assert len(body) < 64 * 1024
    assert_problem(admin.post(PROVIDERS, data=body, content_type="application/json"), 400)
    assert count(admin) == 0


def test_a_deeply_nested_value_the_parser_takes_is_422_on_its_field(admin):
    body = '{"type": "openai", "base_url": "https://api.openai.com/v1", "api_key": "sk-test-key", "name": '
    problem = assert_problem(
        admin.post(PROVIDERS, data=body + nested_list(500) + "}", content_type="application/json"), 422
    )
    assert list(problem["errors"]) == ["name"]
    assert count(admin) == 0


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/problem+json"]
)
def test_other_content_type_is_415(admin, content_type):
    response = admin.post(PROVIDERS, data='{"type": "openai"}', content_type=content_type)
    assert_problem(response, 415)
    assert count(admin) == 0


def test_body_without_content_type_is_415(admin):
    assert_problem(admin.post(PROVIDERS, data='{"type": "openai"}'), 415)


def test_body_over_64_kib_is_413(admin):
    response = admin.post(PROVIDERS, json=provider_body(description="d" * (64 * 1024)))
    assert_problem(response, 413)
    assert count(admin) == 0


def test_missing_credentials_are_401_with_basic_and_bearer_challenges(anonymous):
    response = anonymous.get(PROVIDERS)
    assert_problem(response, 401)
    assert response.headers.getlist("WWW-Authenticate") == [
        'Basic realm="model-provider-registry"',
        'Bearer realm="model-provider-registry"',
    ]


@pytest.mark.parametrize(
    "authorization",
    [
        basic_auth("admin", "wrong"),
        basic_auth("nobody", "admin-pass-1"),
        basic_auth("", ""),
        basic_auth("ad\x00min", "admin-pass-1"),
        "Bearer admin-pass-1",
        "Basic not-base64!!",
        "Basic",
    ],
)
def test_wrong_credentials_are_401(anonymous, authorization):
    response = anonymous.get(PROVIDERS, headers={"Authorization": authorization})
    assert_problem(response, 401)
    assert [challenge.split()[0] for challenge in response.headers.getlist("WWW-Authenticate")] == ["Basic", "Bearer"]


@pytest.mark.parametrize(
    "method, path",
    [("post", PROVIDERS), ("patch", PROVIDERS + "/{id}"), ("delete", PROVIDERS + "/{id}")],
)
def test_reader_and_service_get_403_on_writes(admin, reader, service, method, path):
    provider_id = admin.post(PROVIDERS, json=provider_body()).get_json()["id"]
    for client in (reader, service):
        response = getattr(client, method)(
            path.format(id=provider_id), json={"name": "x"} if method != "delete" else None
        )
        assert_problem(response, 403)
    assert admin.get(f"{PROVIDERS}/{provider_id}").get_json()["name"] is None


@pytest.mark.parametrize("provider_id", ["0b6f2d6e-3f57-4a57-9f0e-2f7c1c5e8d11", "not-a-uuid", "1", "%00", "x" * 300])
def test_unknown_or_malformed_id_is_404(admin, provider_id):
    for method in ("get", "patch", "delete"):
        response = getattr(admin, method)(f"{PROVIDERS}/{provider_id}", json={} if method == "patch" else None)
        assert_problem(response, 404)


def test_unknown_path_is_404(admin):
    assert_problem(admin.get("/api/v1/nothing-here"), 404)


@pytest.mark.parametrize("method, path", [("put", PROVIDERS), ("delete", PROVIDERS), ("post", PROVIDERS + "/some-id")])
def test_method_not_allowed_is_405_with_allow(admin, method, path):
    response = getattr(admin, method)(path)
    assert_problem(response, 405)
    assert "GET" in response.headers["Allow"]


def test_duplicate_base_url_is_409_naming_the_existing_provider(admin):
    existing = admin.post(PROVIDERS, json=provider_body()).get_json()
    problem = assert_problem(admin.post(PROVIDERS, json=provider_body(name="again")), 409)
    assert existing["id"] in problem["detail"]
    assert count(admin) == 1


def test_validation_problem_lists_errors_per_field(admin):
    problem = assert_problem(admin.post(PROVIDERS, json={"type": "nope", "base_url": 5, "unknown": 1}), 422)
    assert set(problem["errors"]) == {"type", "base_url", "api_key", "unknown"}
    assert all(isinstance(messages, list) and messages for messages in problem["errors"].values())


def test_bad_query_parameters_are_422(reader):
    for query in (
        "limit=0",
        "limit=1001",
        "limit=ten",
        "type=azure",
        "capability=vision",
        "state=up",
        "page_token=%%%",
        "registry=file%00",
        "page_token=" + page_token(created_at="2024-01-01T00:00:00", id="a\u0000"),
        "page_token=" + page_token(created_at="2024-01-01T00:00:00", id=7),
        "page_token=" + page_token(id="0b6f2d6e-3f57-4a57-9f0e-2f7c1c5e8d11"),
    ):
        problem = assert_problem(reader.get(f"{PROVIDERS}?{query}"), 422)
        assert query.split("=")[0] in problem["errors"]


@pytest.mark.parametrize("path", [PROVIDERS, "/api/v1/tokens", "/api/v1/audit"])
def test_a_deeply_nested_or_overlong_page_token_is_422_on_every_list(admin, path):
    nested = base64.urlsafe_b64encode(b"[" * 1100 + b"]" * 1100).decode()
    for token in (nested, "A" * 2000):
        problem = assert_problem(admin.get(path, query_string={"page_token": token}), 422)
        assert "page_token" in problem["errors"]


def test_database_gone_is_503_not_500(app, admin, databases, instance_path):
    from models import db

    with app.app_context():
        db.engine.dispose()
    databases.destroy(instance_path)
    assert_problem(admin.get(PROVIDERS), 503)
    assert_problem(app.test_client().get("/readyz"), 503)


@pytest.mark.parametrize(
    "status, error_type",
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "api_error"),
        (529, "overloaded_error"),
        (422, "invalid_request_error"),
        (501, "api_error"),
    ],
)
def test_anthropic_error_bodies_name_the_type_of_their_status(status, error_type):
    document = anthropic_error_document(status, "Nothing answers.")
    assert document == {"type": "error", "error": {"type": error_type, "message": "Nothing answers."}}
