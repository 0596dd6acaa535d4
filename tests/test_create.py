"""POST /api/v1/model_providers: the create contract, field for field."""

import re

import pytest

from models import CAPABILITIES_BY_TYPE
from tests.conftest import provider_body

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def create(client, **fields):
    return client.post("/api/v1/model_providers", json=provider_body(**fields))


def watsonx_ids(provider_type):
    return {"watsonx_project_id": "project-1"} if provider_type == "watsonx" else {}


@pytest.mark.parametrize("provider_type", sorted(CAPABILITIES_BY_TYPE))
def test_every_type_gets_its_capabilities(admin, provider_type):
    response = create(
        admin, type=provider_type, base_url=f"https://{provider_type}.example.com/v1", **watsonx_ids(provider_type)
    )
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["capabilities"] == list(CAPABILITIES_BY_TYPE[provider_type])


def test_there_are_22_types_with_llm_listed_first():
    assert len(CAPABILITIES_BY_TYPE) == 22
    assert CAPABILITIES_BY_TYPE["voyage"] == ("embedding",)
    assert all(capabilities[0] == "llm" for capabilities in CAPABILITIES_BY_TYPE.values() if len(capabilities) == 2)


def test_created_provider_has_every_field_of_the_contract(admin):
    response = create(admin, name="OpenAI", description="The main one")
    assert response.status_code == 201
    provider = response.get_json()
    assert UUID4.match(provider["id"])
    assert response.headers["Location"] == f"/api/v1/model_providers/{provider['id']}"
    assert TIMESTAMP.match(provider["created_at"])
    assert provider["type"] == "openai"
    assert provider["base_url"] == "https://api.openai.com/v1"
    assert provider["name"] == "OpenAI"
    assert provider["description"] == "The main one"
    assert provider["registry"] is None
    assert provider["state"] == "online"
    assert provider["watsonx_project_id"] is None and provider["watsonx_space_id"] is None
    assert "api_key" not in provider


def test_minimal_body_without_optional_fields_is_accepted(admin):
    response = admin.post(
        "/api/v1/model_providers", json={"type": "ollama", "base_url": "http://localhost:11434/v1", "api_key": ""}
    )
    assert response.status_code == 201
    assert response.get_json()["name"] is None


def test_empty_api_key_is_accepted_for_keyless_servers(admin):
    assert create(admin, type="ollama", base_url="http://localhost:11434", api_key="").status_code == 201


def test_created_provider_is_readable(admin):
    provider = create(admin).get_json()
    assert admin.get(f"/api/v1/model_providers/{provider['id']}").get_json() == provider


@pytest.mark.parametrize(
    "sent, stored",
    [
        ("HTTPS://API.OpenAI.com:443/v1/", "https://api.openai.com/v1"),
        ("http://Example.COM:80/", "http://example.com"),
        ("http://example.com:8080/v1//", "http://example.com:8080/v1"),
        ("https://example.com:80/v1", "https://example.com:80/v1"),
        ("https://example.com/v1?api-version=2024-01-01", "https://example.com/v1?api-version=2024-01-01"),
        ("http://[::1]:11434/v1/", "http://[::1]:11434/v1"),
        ("http://[0:0:0:0:0:0:0:1]:11434/v1", "http://[::1]:11434/v1"),
        ("http://[2001:DB8::0:1]/v1", "http://[2001:db8::1]/v1"),
        ("http://0x7f000001:8000/x", "http://127.0.0.1:8000/x"),
        ("http://2130706433:8000/x", "http://127.0.0.1:8000/x"),
        ("http://127.1:8000/x", "http://127.0.0.1:8000/x"),
        ("http://0177.0.0.1:8000/x", "http://127.0.0.1:8000/x"),
        ("http://127.0.0.1.:8000/x", "http://127.0.0.1:8000/x"),
        ("http://10.1.2:8000/x", "http://10.1.0.2:8000/x"),
        ("http://1.2.3.4.5:8000/x", "http://1.2.3.4.5:8000/x"),
        ("http://123.example.com/x", "http://123.example.com/x"),
        ("http://example.com./x", "http://example.com./x"),
    ],
)
def test_base_url_is_normalized(admin, sent, stored):
    assert create(admin, base_url=sent).get_json()["base_url"] == stored


@pytest.mark.parametrize(
    "first, second",
    [
        ("https://api.openai.com/v1", "HTTPS://API.OpenAI.com:443/v1/"),
        ("http://localhost", "http://LOCALHOST:80/"),
        ("http://localhost:11434/v1", "http://localhost:11434/v1///"),
        ("http://127.0.0.1:8000/x", "http://0x7f000001:8000/x"),
        ("http://127.0.0.1:8000/x", "http://2130706433:8000/x"),
        ("http://127.0.0.1:8000/x", "http://127.1:8000/x"),
    ],
)
def test_normalization_variants_collide(admin, first, second):
    existing = create(admin, base_url=first).get_json()
    response = create(admin, base_url=second)
    assert response.status_code == 409
    assert existing["id"] in response.get_json()["detail"]


def test_base_url_of_2083_characters_is_accepted_and_2084_refused(admin):
    prefix = "https://example.com/"
    longest = prefix + "a" * (2083 - len(prefix))
    assert len(longest) == 2083
    assert create(admin, base_url=longest).status_code == 201
    response = create(admin, base_url=longest + "b")
    assert response.status_code == 422
    assert "base_url" in response.get_json()["errors"]


def test_a_base_url_that_normalization_makes_longer_than_2083_is_422_and_stores_nothing(admin):
    sent = "http://1.1/" + "a" * (2083 - len("http://1.1/"))  # 2083 as sent; its host becomes 1.0.0.1
    response = create(admin, base_url=sent)
    assert response.status_code == 422
    assert "2087 characters" in response.get_json()["errors"]["base_url"][0]
    assert admin.get("/api/v1/model_providers").get_json()["total_count"] == 0


@pytest.mark.parametrize(
    "base_url",
    [
        "",
        "api.openai.com/v1",
        "ftp://example.com",
        "https://user:pass@example.com/v1",
        "https://example.com/v1#fragment",
        "https:///v1",
        "https://example.com:99999",
        "https://exa mple.com",
        "https://a..b/v1",
        "https://" + "a" * 64 + ".example.com",
        "https://例え.jp",
        "mailto:someone@example.com",
    ],
)
def test_invalid_base_url_is_422(admin, base_url):
    response = create(admin, base_url=base_url)
    assert response.status_code == 422
    assert list(response.get_json()["errors"]) == ["base_url"]
    assert admin.get("/api/v1/model_providers").get_json()["total_count"] == 0


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"type": "azure"}, "type"),
        ({"type": None}, "type"),
        ({"base_url": None}, "base_url"),
        ({"api_key": None}, "api_key"),
        ({"api_key": "k" * 8193}, "api_key"),
        ({"name": "n" * 1025}, "name"),
        ({"description": "d" * 4097}, "description"),
        ({"name": 5}, "name"),
        ({"extra": "field"}, "extra"),
        ({"capabilities": ["llm"]}, "capabilities"),
        ({"state": "offline"}, "state"),
    ],
)
def test_invalid_field_is_422_naming_it(admin, fields, field):
    response = create(admin, **fields)
    assert response.status_code == 422
    problem = response.get_json()
    assert response.content_type == "application/problem+json"
    assert problem["title"] == "Unprocessable Content"
    assert problem["detail"]
    assert field in problem["errors"]


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"name": "a\u0000b"}, "name"),
        ({"description": "\u0000"}, "description"),
        ({"api_key": "sk-\u0000"}, "api_key"),
        ({"name": "\ud800"}, "name"),
        ({"api_key": "sk-\udfff"}, "api_key"),
        ({"type": "watsonx", "watsonx_project_id": "p\u0000"}, "watsonx_project_id"),
        ({"type": "watsonx", "watsonx_space_id": "\udbff"}, "watsonx_space_id"),
    ],
)
def test_text_no_database_can_store_is_422(admin, fields, field):
    """PostgreSQL refuses NUL characters; an unpaired surrogate has no UTF-8 form."""
    response = create(admin, **fields)
    assert response.status_code == 422
    assert field in response.get_json()["errors"]
    assert admin.get("/api/v1/model_providers").get_json()["total_count"] == 0


@pytest.mark.parametrize("missing", ["type", "base_url", "api_key"])
def test_missing_required_field_is_422(admin, missing):
    body = provider_body()
    del body[missing]
    response = admin.post("/api/v1/model_providers", json=body)
    assert response.status_code == 422
    assert missing in response.get_json()["errors"]


def test_longest_name_description_and_key_are_accepted(admin):
    assert create(admin, name="n" * 1024, description="d" * 4096, api_key="k" * 8192).status_code == 201


@pytest.mark.parametrize("ids", [{"watsonx_project_id": "p"}, {"watsonx_space_id": "s"}])
def test_watsonx_with_one_id_is_accepted(admin, ids):
    response = create(admin, type="watsonx", base_url="https://us-south.ml.cloud.ibm.com", **ids)
    assert response.status_code == 201
    assert {key: response.get_json()[key] for key in ids} == ids


@pytest.mark.parametrize("ids", [{}, {"watsonx_project_id": "p", "watsonx_space_id": "s"}])
def test_watsonx_needs_exactly_one_id(admin, ids):
    response = create(admin, type="watsonx", base_url="https://us-south.ml.cloud.ibm.com", **ids)
    assert response.status_code == 422
    assert "_schema" in response.get_json()["errors"]


def test_other_types_refuse_watsonx_ids(admin):
    response = create(admin, watsonx_space_id="s")
    assert response.status_code == 422
    assert list(response.get_json()["errors"]) == ["watsonx_space_id"]
