"""The providers at a glance, one provider's page with its models, and an admin's changes."""

from flask import redirect, render_template, request, url_for
from werkzeug.http import quote_etag

from api.providers import provider_filter_values, should_verify
from catalog.index import indexed_models, refresh_models
from catalog.providers import (
    check_provider,
    create_provider,
    delete_provider,
    etag_of,
    provider_or_404,
    update_provider,
)
from models import CAPABILITIES, PROVIDER_TYPES, STATES
from schemas import ProviderChangesSchema, ProviderCreateSchema, ProvidersQuerySchema
from storage.providers import model_counts, providers_page
from ui.console import REFUSALS, answered, form_problem, form_values, query_values, requires, ui_bp

CREATE_FIELDS = ("type", "base_url", "api_key", "name", "description", "watsonx_project_id", "watsonx_space_id")
# Blank is null for these; a blank key on the edit form keeps the stored one.
OPTIONAL_FIELDS = ("name", "description", "watsonx_project_id", "watsonx_space_id")
EDIT_FIELDS = ("base_url", "name", "description", "watsonx_project_id", "watsonx_space_id")


def verify_requested():
    """The form's "verify against the upstream" box, as the API's ?verify= (the setting can turn it off)."""
    return should_verify({"verify": "verify" in request.form})


@ui_bp.get("/providers")
def providers():
    query = query_values(ProvidersQuerySchema())
    page = providers_page(provider_filter_values(query), query["limit"], query.get("page_token"))
    return render_template(
        "ui/providers.html",
        page=page,
        model_counts=model_counts(provider.id for provider in page["items"]),
        query=query,
        providers_url=url_for("ui.providers"),  # each provider's page is under it: /<id>
        filters={"state": STATES, "type": PROVIDER_TYPES, "capability": CAPABILITIES},
    )


def new_provider_page(problem=None, sent=None):
    page = render_template("ui/provider_new.html", types=PROVIDER_TYPES, problem=problem, sent=sent or {})
    return answered(page, problem)


@ui_bp.get("/providers/new")
@requires("admin")
def new_provider():
    return new_provider_page()


@ui_bp.post("/providers/new")
@requires("admin")
def add_provider():
    sent = form_values(CREATE_FIELDS, OPTIONAL_FIELDS)
    try:
        provider = create_provider(ProviderCreateSchema().load(sent), verify_requested())
    except REFUSALS as error:
        return new_provider_page(form_problem(error), sent)
    return redirect(url_for("ui.provider", provider_id=provider.id, notice="created"), 303)


def provider_page(provider, problem=None, sent=None):
    page = render_template(
        "ui/provider.html",
        provider=provider,
        etag=quote_etag(etag_of(provider)),
        models=indexed_models(provider),
        problem=problem,
        sent=sent or {},
    )
    return answered(page, problem)


@ui_bp.get("/providers/<provider_id>")
def provider(provider_id):
    return provider_page(provider_or_404(provider_id))


def preconditions():
    """The ETag the page showed, as If-Match: a change stored since makes the action a 412."""
    return {"if_match": request.form["etag"]} if "etag" in request.form else {}


@ui_bp.post("/providers/<provider_id>/edit")
@requires("admin")
def edit_provider(provider_id):
    shown = provider_or_404(provider_id)
    sent = form_values(EDIT_FIELDS, OPTIONAL_FIELDS)
    if request.form.get("api_key"):
        sent["api_key"] = request.form["api_key"]
    try:
        update_provider(shown, ProviderChangesSchema().load(sent), preconditions(), verify_requested())
    except REFUSALS as error:
        return provider_page(shown, form_problem(error), sent)
    return redirect(url_for("ui.provider", provider_id=provider_id, notice="updated"), 303)


@ui_bp.post("/providers/<provider_id>/check")
@requires("admin")
def check(provider_id):
    check_provider(provider_or_404(provider_id))
    return redirect(url_for("ui.provider", provider_id=provider_id, notice="checked"), 303)


@ui_bp.post("/providers/<provider_id>/refresh")
@requires("admin")
def refresh(provider_id):
    refresh_models(provider_or_404(provider_id))
    return redirect(url_for("ui.provider", provider_id=provider_id, notice="refreshed"), 303)


@ui_bp.post("/providers/<provider_id>/delete")
@requires("admin")
def delete(provider_id):
    delete_provider(provider_or_404(provider_id), preconditions())
    return redirect(url_for("ui.providers", notice="deleted"), 303)
