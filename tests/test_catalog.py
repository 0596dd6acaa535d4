"""The OpenAI-style model list, match, system configuration and resolve."""

import logging

import pytest
import sqlalchemy as sa

from models import PROVIDERS as PROVIDER_TABLE
from models import SystemConfiguration, db
from tests.conftest import provider_body

PROVIDERS = "/api/v1/model_providers"
KEY = "sk-catalog-secret-31337"


@pytest.fixture
def app(make_app):
    """Creates are verified, which stores each provider's models in the model index."""
    return make_app(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_UPSTREAM_TIMEOUT="1")


def register(admin, upstream, provider_type=None, **fields):
    body = provider_body(
        type=provider_type or upstream.flavor, base_url=upstream.base_url, api_key=upstream.api_key, **fields
    )
    response = admin.post(PROVIDERS, json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def set_state(app, provider_id, state):
    with app.app_context():
        db.session.execute(sa.update(PROVIDER_TABLE).where(PROVIDER_TABLE.c.id == provider_id).values(state=state))
        db.session.commit()


def openai_ids(client):
    response = client.get("/api/v1/openai/models")
    assert response.status_code == 200
    document = response.get_json()
    assert document["object"] == "list"
    return sorted(model["id"] for model in document["data"])


def test_openai_list_joins_every_online_provider(admin, reader, fake_upstream):
    register(admin, fake_upstream(models=["gpt-4o"]))
    register(admin, fake_upstream(flavor="anthropic", models=["claude-sonnet-4"]))
    assert openai_ids(reader) == ["anthropic:claude-sonnet-4", "openai:gpt-4o"]


def test_openai_list_leaves_out_offline_providers(app, admin, reader, fake_upstream):
    online = register(admin, fake_upstream(models=["gpt-4o"]))
    offline = register(admin, fake_upstream(models=["llama3"], api_key=""), provider_type="ollama")
    set_state(app, offline["id"], "offline")
    assert openai_ids(reader) == ["openai:gpt-4o"]
    set_state(app, online["id"], "offline")
    assert openai_ids(reader) == []


@pytest.fixture
def catalog(admin, fake_upstream):
    """Online providers: an OpenAI one with chat and embedding models, an Anthropic one, a Voyage one."""
    openai = register(admin, fake_upstream(models=["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]))
    anthropic = register(admin, fake_upstream(flavor="anthropic", models=["claude-sonnet-4"]))
    voyage = register(admin, fake_upstream(flavor="voyage"))
    return {"openai": openai, "anthropic": anthropic, "voyage": voyage}


def match(client, **body):
    response = client.post(f"{PROVIDERS}/match", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_exact_match_scores_1(reader, catalog):
    result = match(reader, capability="llm", suggested_models=["openai:gpt-4o"])
    assert result["items"][0] == {"model_id": "openai:gpt-4o", "score": 1.0}
    assert result["total_count"] == len(result["items"])


def test_scores_follow_the_formula_and_order(reader, catalog):
    from difflib import SequenceMatcher

    result = match(reader, capability="llm", suggested_models=["gpt-4o"])
    expected = {}
    for model_id in [
        "openai:gpt-4o",
        "openai:gpt-4o-mini",
        "openai:text-embedding-3-small",
        "anthropic:claude-sonnet-4",
    ]:
        ratio = SequenceMatcher(None, "gpt-4o", model_id.partition(":")[2]).ratio()
        if ratio > 0.4:
            expected[model_id] = round(0.5 + ratio / 2, 2)
    assert result["items"] == [
        {"model_id": model_id, "score": score}
        for model_id, score in sorted(expected.items(), key=lambda item: (-item[1], item[0]))
    ]
    assert [item["model_id"] for item in result["items"]][:2] == ["openai:gpt-4o", "openai:gpt-4o-mini"]


def test_cutoff_drops_weak_similarities(reader, catalog):
    assert match(reader, capability="llm", suggested_models=["gpt-4o"], score_cutoff=0.99)["items"] == [
        {"model_id": "openai:gpt-4o", "score": 1.0}
    ]
    assert match(reader, capability="llm", suggested_models=["zzzz"])["items"] == []


def test_capability_filters_the_candidates(reader, catalog):
    ids = [item["model_id"] for item in match(reader, capability="embedding", suggested_models=["voyage-3.5"])["items"]]
    assert ids[0] == "voyage:voyage-3.5"
    assert not any(model_id.startswith("anthropic:") for model_id in ids)


def test_default_model_scores_half(admin, reader, catalog):
    assert (
        admin.put("/api/v1/configurations/system", json={"default_llm_model": "anthropic:claude-sonnet-4"}).status_code
        == 200
    )
    result = match(reader, capability="llm", suggested_models=[])
    assert result["items"] == [{"model_id": "anthropic:claude-sonnet-4", "score": 0.5}]
    stronger = match(reader, capability="llm", suggested_models=["claude-sonnet-4"])
    assert stronger["items"][0] == {"model_id": "anthropic:claude-sonnet-4", "score": 1.0}


@pytest.mark.parametrize("suggestions", [{"suggested_models": None}, {}], ids=["null", "absent"])
def test_null_or_absent_suggestions_answer_as_an_empty_list(admin, reader, catalog, suggestions):
    admin.put("/api/v1/configurations/system", json={"default_llm_model": "anthropic:claude-sonnet-4"})
    expected = match(reader, capability="llm", suggested_models=[])
    assert expected["items"] == [{"model_id": "anthropic:claude-sonnet-4", "score": 0.5}]
    assert match(reader, capability="llm", **suggestions) == expected


def test_suggestions_at_their_bounds_are_taken(reader, catalog):
    suggestions = ["openai:gpt-4o"] + ["m" * 256] * 99
    assert match(reader, capability="llm", suggested_models=suggestions)["items"][0]["score"] == 1.0


def test_match_leaves_out_offline_providers(app, reader, catalog):
    set_state(app, catalog["openai"]["id"], "offline")
    assert match(reader, capability="llm", suggested_models=["openai:gpt-4o"])["items"] == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"suggested_models": ["x"]}, "capability"),
        ({"capability": "vision"}, "capability"),
        ({"capability": "llm", "score_cutoff": 2}, "score_cutoff"),
        ({"capability": "llm", "suggested_models": "gpt-4o"}, "suggested_models"),
        ({"capability": "llm", "suggested_models": ["gpt-4o"] * 101}, "suggested_models"),
        ({"capability": "llm", "suggested_models": ["gpt-4o", "m" * 257]}, "suggested_models.1"),
        ({"capability": "llm", "suggested_models": [None]}, "suggested_models.0"),
    ],
)
def test_invalid_match_body_is_422(reader, body, field):
    response = reader.post(f"{PROVIDERS}/match", json=body)
    assert response.status_code == 422
    assert field in response.get_json()["errors"]


def test_system_configuration_round_trip(admin, reader):
    initial = reader.get("/api/v1/configurations/system").get_json()
    assert initial["default_llm_model"] is None and initial["default_embedding_model"] is None
    body = {"default_llm_model": "openai:gpt-4o", "default_embedding_model": "voyage:voyage-3.5"}
    updated = admin.put("/api/v1/configurations/system", json=body)
    assert updated.status_code == 200
    document = updated.get_json()
    assert {key: document[key] for key in body} == body
    assert document["created_by"] == "admin"
    assert document["id"] == initial["id"]
    assert reader.get("/api/v1/configurations/system").get_json() == document
    cleared = admin.put("/api/v1/configurations/system", json={"default_llm_model": None}).get_json()
    assert cleared["default_llm_model"] is None


def test_reading_the_system_configuration_stores_nothing(app, reader):
    document = reader.get("/api/v1/configurations/system").get_json()
    assert document == {
        "default_llm_model": None,
        "default_embedding_model": None,
        "id": document["id"],
        "updated_at": None,
        "created_by": None,
    }
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count()).select_from(SystemConfiguration)) == 0


def test_system_configuration_is_admin_only_and_validated(admin, reader):
    assert reader.put("/api/v1/configurations/system", json={"default_llm_model": None}).status_code == 403
    response = admin.put("/api/v1/configurations/system", json={"default_llm_model": "gpt-4o"})
    assert response.status_code == 422
    assert "default_llm_model" in response.get_json()["errors"]


def test_resolve_gives_the_stored_key_to_service_and_admin(admin, service, fake_upstream, caplog):
    caplog.set_level(logging.INFO)
    provider = register(admin, fake_upstream(api_key=KEY, models=["gpt-4o"]))
    for client in (service, admin):
        response = client.post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-4o"})
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "no-store"
        assert response.get_json() == {
            "provider_id": provider["id"],
            "type": "openai",
            "base_url": provider["base_url"],
            "model": "gpt-4o",
            "api_key": KEY,
            "watsonx_project_id": None,
            "watsonx_space_id": None,
        }
    audit = [record.getMessage() for record in caplog.records if "resolve" in record.getMessage()]
    assert len(audit) == 2 and "service" in audit[0] and provider["id"] in audit[0]
    assert KEY not in caplog.text


def test_resolve_is_refused_to_readers(admin, reader, fake_upstream):
    register(admin, fake_upstream(api_key=KEY, models=["gpt-4o"]))
    response = reader.post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-4o"})
    assert response.status_code == 403
    assert KEY not in response.get_data(as_text=True)


def test_resolve_unknown_model_is_404_and_offline_provider_503(app, admin, service, fake_upstream):
    provider = register(admin, fake_upstream(models=["gpt-4o"]))
    assert service.post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-9"}).status_code == 404
    assert service.post(f"{PROVIDERS}/resolve", json={"model": "anthropic:claude"}).status_code == 404
    set_state(app, provider["id"], "offline")
    response = service.post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-4o"})
    assert response.status_code == 503
    assert "offline" in response.get_json()["detail"]
    assert service.post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-9"}).status_code == 404


def test_resolve_takes_the_oldest_online_provider_listing_the_model(app, admin, service, fake_upstream):
    oldest = register(admin, fake_upstream(models=["gpt-4o"]))
    register(admin, fake_upstream(models=["gpt-4o-mini"]))
    newest = register(admin, fake_upstream(models=["gpt-4o"]))

    def resolved_provider():
        response = service.post(f"{PROVIDERS}/resolve", json={"model": "openai:gpt-4o"})
        assert response.status_code == 200
        return response.get_json()["provider_id"]

    assert resolved_provider() == oldest["id"]
    set_state(app, oldest["id"], "offline")
    assert resolved_provider() == newest["id"]


@pytest.mark.parametrize("model", ["gpt-4o", "azure:gpt-4o", "openai:", "", None])
def test_resolve_of_a_malformed_model_is_422(service, model):
    assert service.post(f"{PROVIDERS}/resolve", json={"model": model}).status_code == 422
