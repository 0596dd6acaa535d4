"""The signed-in user's API tokens: made (the secret shown once) and revoked."""

from flask import redirect, render_template, url_for
from werkzeug.exceptions import NotFound

from access.tokens import create_token, revoke_token
from api.tokens import owner_for
from models import roles_up_to
from schemas import PageQuerySchema, TokenCreateSchema
from storage.tokens import tokens_page
from ui.console import REFUSALS, answered, caller, form_problem, form_values, query_values, ui_bp

TOKEN_FIELDS = ("name", "role", "expires_in_days")
# Left blank: the owner's role, and no expiry.
OPTIONAL_TOKEN_FIELDS = ("role", "expires_in_days")


def token_list_page(problem=None, sent=None, new_token=None):
    query = query_values(PageQuerySchema())
    page = render_template(
        "ui/tokens.html",
        page=tokens_page({"user": caller().username}, query["limit"], query.get("page_token")),
        roles=roles_up_to(caller().role),
        problem=problem,
        sent=sent or {},
        new_token=new_token,
    )
    return answered(page, problem)


@ui_bp.get("/tokens")
def tokens():
    return token_list_page()


@ui_bp.post("/tokens")
def make_token():
    sent = form_values(TOKEN_FIELDS, OPTIONAL_TOKEN_FIELDS)
    try:
        fields = TokenCreateSchema().load({name: value for name, value in sent.items() if value is not None})
        new_token = create_token(
            owner_for(caller(), None), fields["name"], fields.get("role"), fields.get("expires_in_days")
        )
    except REFUSALS as error:
        return token_list_page(form_problem(error), sent)
    return token_list_page(new_token=new_token), 201


@ui_bp.post("/tokens/<token_id>/revoke")
def revoke(token_id):
    if not revoke_token(token_id, caller().id):
        raise NotFound(f"You have no token with id {token_id!r}.")
    return redirect(url_for("ui.tokens", notice="revoked"), 303)
