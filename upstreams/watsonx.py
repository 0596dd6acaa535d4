"""IBM watsonx.ai: the foundation model specs, without withdrawn models."""

from datetime import date

from upstreams import UpstreamError, get_json, model_entries, upstream_model, usable_models

WATSONX_API_VERSION = "2024-05-01"


def is_withdrawn(spec, today):
    """Whether a lifecycle stage "withdrawn" has begun; a lifecycle that is not a list fails the listing."""
    lifecycle = spec.get("lifecycle") or []
    if not isinstance(lifecycle, list):
        raise UpstreamError("unexpected response from the upstream: a model lifecycle that is not a list")
    return any(
        stage.get("id") == "withdrawn" and str(stage.get("start_date") or "0000") <= today.isoformat()
        for stage in lifecycle
        if isinstance(stage, dict)
    )


def spec_model(spec):
    return upstream_model(spec.get("model_id"), None, spec.get("provider") or "ibm", spec.get("label"))


def list_models(connection):
    params = {"version": WATSONX_API_VERSION, "limit": 200}
    document = get_json(connection, f"{connection.base_url}/ml/v1/foundation_model_specs", params=params)
    today = date.today()
    specs = [
        spec
        for spec in model_entries(document, "resources")
        if not (isinstance(spec, dict) and is_withdrawn(spec, today))
    ]
    return usable_models(connection, specs, spec_model)
