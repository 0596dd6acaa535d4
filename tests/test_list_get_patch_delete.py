"""Listing, paging, reading, changing and deleting providers."""

import pytest

from models import db
from tests.conftest import provider_body

PROVIDERS = "/api/v1/model_providers"


def create_many(client, count, **fields):
    return [
        client.post(PROVIDERS, json=provider_body(base_url=f"https://p{index}.example.com/v1", **fields)).get_json()
        for index in range(count)
    ]


def test_empty_list_has_the_page_shape(reader):
    assert reader.get(PROVIDERS).get_json() == {
        "items": [],
        "total_count": 0,
        "has_more": False,
        "next_page_token": None,
    }


def test_list_is_newest_first(admin, reader):
    created = create_many(admin, 3)
    listed = reader.get(PROVIDERS).get_json()["items"]
    assert [provider["id"] for provider in listed] == [provider["id"] for provider in reversed(created)]


def test_paging_with_a_small_limit_sees_each_provider_exactly_once(admin, reader):
    created_ids = {provider["id"] for provider in create_many(admin, 23)}
    seen, page_token, pages = [], None, 0
    while True:
        query = {"limit": 5, **({"page_token": page_token} if page_token else {})}
        page = reader.get(PROVIDERS, query_string=query).get_json()
        pages += 1
        assert page["total_count"] == 23
        assert len(page["items"]) <= 5
        seen += [provider["id"] for provider in page["items"]]
        if not page["has_more"]:
            assert page["next_page_token"] is None
            break
        page_token = page["next_page_token"]
    assert pages == 5
    assert len(seen) == len(set(seen)) == 23
    assert set(seen) == created_ids


def test_an_empty_page_token_asks_for_the_first_page(admin, reader):
    created = create_many(admin, 3)
    page = reader.get(PROVIDERS, query_string={"limit": 2, "page_token": "", "capability": "llm"})
    assert page.status_code == 200
    assert [provider["id"] for provider in page.get_json()["items"]] == [created[2]["id"], created[1]["id"]]


def test_paging_is_stable_when_providers_are_added_meanwhile(admin, reader):
    create_many(admin, 4)
    first = reader.get(PROVIDERS, query_string={"limit": 2}).get_json()
    admin.post(PROVIDERS, json=provider_body(base_url="https://late.example.com"))
    second = reader.get(PROVIDERS, query_string={"limit": 2, "page_token": first["next_page_token"]}).get_json()
    assert not {p["id"] for p in first["items"]} & {p["id"] for p in second["items"]}


@pytest.mark.parametrize(
    "query, expected_types",
    [
        ({"type": "voyage"}, {"voyage"}),
        ({"capability": "embedding"}, {"voyage", "openai"}),
        ({"capability": "llm"}, {"anthropic", "openai"}),
        ({"state": "online"}, {"anthropic", "voyage", "openai"}),
        ({"state": "offline"}, set()),
        ({"type": "openai", "capability": "llm"}, {"openai"}),
    ],
)
def test_filters_narrow_the_list_and_its_count(admin, reader, query, expected_types):
    for provider_type in ("anthropic", "voyage", "openai"):
        admin.post(PROVIDERS, json=provider_body(type=provider_type, base_url=f"https://{provider_type}.example.com"))
    page = reader.get(PROVIDERS, query_string=query).get_json()
    assert {provider["type"] for provider in page["items"]} == expected_types
    assert page["total_count"] == len(expected_types)


def test_registry_filter_matches_api_created_providers_never(admin, reader):
    create_many(admin, 2)
    assert reader.get(PROVIDERS, query_string={"registry": "file:///etc/registry.yaml"}).get_json()["total_count"] == 0


def test_reader_can_get_one_provider(admin, reader):
    provider = create_many(admin, 1)[0]
    assert reader.get(f"{PROVIDERS}/{provider['id']}").get_json() == provider


def test_patch_changes_only_the_given_fields(admin):
    provider = create_many(admin, 1, name="before", description="kept")[0]
    response = admin.patch(f"{PROVIDERS}/{provider['id']}", json={"name": "after"})
    assert response.status_code == 200
    patched = response.get_json()
    assert patched["name"] == "after"
    assert patched["description"] == "kept"
    assert patched["created_at"] == provider["created_at"]
    assert patched["updated_at"] > provider["updated_at"]
    assert admin.get(f"{PROVIDERS}/{provider['id']}").get_json() == patched


def test_patch_with_null_clears_optional_fields(admin):
    provider = create_many(admin, 1, name="named")[0]
    assert admin.patch(f"{PROVIDERS}/{provider['id']}", json={"name": None}).get_json()["name"] is None


def test_patch_normalizes_base_url(admin):
    provider = create_many(admin, 1)[0]
    response = admin.patch(f"{PROVIDERS}/{provider['id']}", json={"base_url": "HTTPS://New.Example.com:443/v2/"})
    assert response.get_json()["base_url"] == "https://new.example.com/v2"


def test_patch_to_own_base_url_is_fine_and_to_anothers_is_409(admin):
    first, second = create_many(admin, 2)
    assert admin.patch(f"{PROVIDERS}/{first['id']}", json={"base_url": first["base_url"] + "/"}).status_code == 200
    response = admin.patch(f"{PROVIDERS}/{first['id']}", json={"base_url": second["base_url"]})
    assert response.status_code == 409
    assert second["id"] in response.get_json()["detail"]
    assert admin.get(f"{PROVIDERS}/{first['id']}").get_json()["base_url"] == first["base_url"]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"type": "anthropic"}, "type"),
        ({"base_url": None}, "base_url"),
        ({"api_key": None}, "api_key"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"name": "n" * 1025}, "name"),
        ({"name": "\u0000"}, "name"),
        ({"api_key": "\ud800"}, "api_key"),
        ({"state": "offline"}, "state"),
        ({"watsonx_project_id": "p"}, "watsonx_project_id"),
    ],
)
def test_invalid_patch_is_422_and_changes_nothing(admin, changes, field):
    provider = create_many(admin, 1)[0]
    response = admin.patch(f"{PROVIDERS}/{provider['id']}", json=changes)
    assert response.status_code == 422
    assert field in response.get_json()["errors"]
    assert admin.get(f"{PROVIDERS}/{provider['id']}").get_json() == provider


def test_patch_keeps_the_watsonx_rule(admin):
    provider = admin.post(
        PROVIDERS, json=provider_body(type="watsonx", base_url="https://w.example.com", watsonx_project_id="p")
    ).get_json()
    path = f"{PROVIDERS}/{provider['id']}"
    assert admin.patch(path, json={"watsonx_space_id": "s"}).status_code == 422
    assert admin.patch(path, json={"watsonx_project_id": None}).status_code == 422
    swapped = admin.patch(path, json={"watsonx_project_id": None, "watsonx_space_id": "s"})
    assert swapped.status_code == 200
    assert (swapped.get_json()["watsonx_project_id"], swapped.get_json()["watsonx_space_id"]) == (None, "s")


def test_empty_patch_is_a_no_op(admin):
    provider = create_many(admin, 1)[0]
    assert admin.patch(f"{PROVIDERS}/{provider['id']}", json={}).get_json()["name"] == provider["name"]


def test_delete_removes_the_provider_and_frees_its_base_url(admin):
    provider = create_many(admin, 1)[0]
    response = admin.delete(f"{PROVIDERS}/{provider['id']}")
    assert response.status_code == 204
    assert response.data == b""
    assert admin.get(f"{PROVIDERS}/{provider['id']}").status_code == 404
    assert admin.delete(f"{PROVIDERS}/{provider['id']}").status_code == 404
    assert admin.post(PROVIDERS, json=provider_body(base_url=provider["base_url"])).status_code == 201


def test_every_request_gives_its_database_connections_back(app, admin, reader, anonymous):
    provider = create_many(admin, 1)[0]
    reader.get(f"{PROVIDERS}/{provider['id']}")
    reader.get(PROVIDERS, query_string={"capability": "llm"})
    reader.get(f"{PROVIDERS}/00000000-0000-4000-8000-000000000000")  # 404
    reader.delete(f"{PROVIDERS}/{provider['id']}")  # 403
    anonymous.get(PROVIDERS)  # 401
    admin.patch(f"{PROVIDERS}/{provider['id']}", json={"name": "renamed"})
    with app.app_context():
        assert db.engine.pool.checkedout() == 0
