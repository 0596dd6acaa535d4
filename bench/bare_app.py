"""The yardstick for bench/throughput.py: Flask answering the registry's routes with constants.

No authentication, no database, no schemas: what Flask and gunicorn cost on their own.
`gunicorn -c gunicorn.conf.py bench.bare_app:app`
"""

from flask import Flask, jsonify, request

PROVIDER = {
    "id": "3f1c1c8e-5a55-4c55-8d0c-2f4a5b0e7d11",
    "type": "openai",
    "base_url": "https://api.openai.com/v1",
    "capabilities": ["llm", "embedding"],
    "name": "OpenAI",
    "description": None,
    "created_at": "2026-11-01T10:00:00.000000Z",
    "registry": None,
    "state": "online",
    "watsonx_project_id": None,
    "watsonx_space_id": None,
    "updated_at": "2026-11-01T10:00:00.000000Z",
    "last_checked_at": None,
    "last_error": None,
}
PAGE = {"items": [PROVIDER] * 50, "total_count": 200, "has_more": True, "next_page_token": "opaque"}

app = Flask(__name__)
app.json.sort_keys = False


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.get("/api/v1/model_providers")
def list_providers():
    return jsonify(PAGE)


@app.get("/api/v1/model_providers/<provider_id>")
def get_provider(provider_id):
    return jsonify(PROVIDER)


@app.post("/api/v1/model_providers")
def create_provider():
    request.get_json()
    return jsonify(PROVIDER), 201
