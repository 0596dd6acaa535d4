"""The model catalog: every model an online provider serves, and the default models."""

from flask import redirect, render_template, url_for

from catalog.configuration import replace_system_configuration, system_configuration
from catalog.index import available_models
from schemas import SystemConfigurationChangesSchema
from ui.console import REFUSALS, answered, caller, form_problem, form_values, requires, ui_bp

DEFAULT_FIELDS = ("default_llm_model", "default_embedding_model")


def catalog_page(problem=None, sent=None):
    page = render_template(
        "ui/catalog.html",
        models=available_models(),
        configuration=system_configuration(),
        problem=problem,
        sent=sent or {},
    )
    return answered(page, problem)


@ui_bp.get("/catalog")
def catalog():
    return catalog_page()


@ui_bp.post("/catalog/defaults")
@requires("admin")
def set_defaults():
    sent = form_values(DEFAULT_FIELDS, optional=DEFAULT_FIELDS)  # blank clears, as null does
    try:
        replace_system_configuration(SystemConfigurationChangesSchema().load(sent), caller().username)
    except REFUSALS as error:
        return catalog_page(form_problem(error), sent)
    return redirect(url_for("ui.catalog", notice="defaults"), 303)
