"""IBM watsonx.ai: the foundation model specs, without withdrawn models."""

from datetime import date

from upstreams import UpstreamModel, get_json, model_entries

WATSONX_API_VERSION = "2024-05-01"


def is_withdrawn(spec, today):
    return any(
        stage.get("id") == "withdrawn" and str(stage.get("start_date") or "0000") <= today.isoformat()
        for stage in spec.get("lifecycle") or []
        if isinstance(stage, dict)
    )


def list_models(connection):
    params = {"version": WATSONX_API_VERSION, "limit": 200}
    document = get_json(connection, f"{connection.base_url}/ml/v1/foundation_model_specs", params=params)
    today = date.today()
    return [
        UpstreamModel(
            id=str(spec["model_id"]), owned_by=str(spec.get("provider") or "ibm"), display_name=spec.get("label")
        )
        for spec in model_entries(document, "resources", id_key="model_id")
        if not is_withdrawn(spec, today)
    ]
