"""/healthz, /readyz, /openapi.json and /docs (which must work with no internet)."""

import re

import sqlalchemy as sa
from openapi_spec_validator import validate

from app import create_app
from models import db
from tests.conftest import free_port, registry_environ


def test_healthz_answers_without_credentials(anonymous):
    response = anonymous.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_200_on_a_current_schema(anonymous):
    assert anonymous.get("/readyz").status_code == 200


def test_readyz_is_503_when_the_schema_is_behind(app, anonymous):
    with app.app_context():
        db.session.execute(sa.text("UPDATE alembic_version SET version_num = 'old'"))
        db.session.commit()
    response = anonymous.get("/readyz")
    assert response.status_code == 503
    assert "migrations" in response.get_json()["detail"]


def test_readyz_is_503_before_migrations(make_instance):
    app = create_app(registry_environ(make_instance(migrated=False)))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.content_type == "application/problem+json"


def test_openapi_document_describes_the_api(anonymous):
    spec = anonymous.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    create = spec["paths"]["/api/v1/model_providers"]["post"]
    body_schema = create["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = spec["components"]["schemas"][body_schema]
    assert set(fields["properties"]) == {
        "type",
        "base_url",
        "api_key",
        "name",
        "description",
        "watsonx_project_id",
        "watsonx_space_id",
    }
    assert set(fields["required"]) == {"type", "base_url", "api_key"}
    assert len(fields["properties"]["type"]["enum"]) == 22
    assert fields["properties"]["base_url"]["maxLength"] == 2083
    assert create["security"] == [{"basic_auth": ["admin"]}, {"token_auth": ["admin"]}]
    assert "application/problem+json" in create["responses"]["409"]["content"]
    assert spec["components"]["securitySchemes"]["basic_auth"]["scheme"] == "basic"
    assert spec["components"]["securitySchemes"]["token_auth"]["scheme"] == "bearer"
    operations = [operation for path in spec["paths"].values() for operation in path.values()]
    secured = [operation["security"] for operation in operations if "security" in operation]
    assert secured and all([*requirement] == ["basic_auth"] for requirement, _ in secured)
    assert all([*requirement] == ["token_auth"] for _, requirement in secured)


def test_openapi_tags_are_spelled_for_readers(anonymous):
    spec = anonymous.get("/openapi.json").get_json()
    declared = {tag["name"] for tag in spec["tags"]}
    assert "OpenAI" in declared and "Openai" not in declared
    assert spec["paths"]["/api/v1/openai/models"]["get"]["tags"] == ["OpenAI"]
    used = {name for path in spec["paths"].values() for operation in path.values() for name in operation["tags"]}
    assert used <= declared


def test_openapi_document_is_valid_openapi_3(anonymous):
    validate(anonymous.get("/openapi.json").get_json())  # raises, naming the first fault


def test_docs_page_loads_only_local_assets(anonymous):
    page = anonymous.get("/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sources and all(source.startswith("/") for source in sources)
    for source in sources:
        asset = anonymous.get(source)
        assert asset.status_code == 200 and len(asset.data) > 1000
    assert "/openapi.json" in html


def test_unreachable_database_at_start_serves_503_not_a_crash(make_app):
    app = make_app(DATABASE_URL=f"postgresql+psycopg://nobody:nothing@127.0.0.1:{free_port()}/registry")
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.content_type == "application/problem+json"
