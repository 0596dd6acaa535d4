"""The signed-in user's API tokens: made (the secret shown once) and revoked."""

from flask import redirect, render_template, url_for
from werkzeug.exceptions import NotFound

from access.tokens import create_token, revoke_token
from api.tokens import owner_for
from models import TokenLimits, roles_up_to
from schemas import PageQuerySchema, TokenCreateSchema
from storage.tokens import tokens_page
from ui.console import REFUSALS, answered, caller, form_problem, form_values, query_values, ui_bp

LIMIT_LABELS = {
    "requests_per_minute": "Requests per minute",
    "tokens_per_minute": "Tokens per minute",
    "tokens_per_day": "Tokens per day",
    "max_parallel": "Calls at once",
}
LIMIT_FIELDS = tuple(LIMIT_LABELS)
TOKEN_FIELDS = ("name", "role", "expires_in_days", *LIMIT_FIELDS)
# Left blank: the owner's role, no expiry, no limit.
OPTIONAL_TOKEN_FIELDS = ("role", "expires_in_days", *LIMIT_FIELDS)


def whole_number(text):
    """A form's digits as the number the API's JSON would carry; anything else as sent, for the
    schema to refuse."""
    return int(text) if text.strip().isdigit() else text


def token_request(sent):
    """The form's values as the API's create body: the limits under `limits`, blanks left out."""
    body = {name: value for name, value in sent.items() if value is not None and name not in LIMIT_FIELDS}
    limits = {name: whole_number(sent[name]) for name in LIMIT_FIELDS if sent.get(name) is not None}
    return {**body, "limits": limits} if limits else body


def token_list_page(problem=None, sent=None, new_token=None):
    query = query_values(PageQuerySchema())
    page = render_template(
        "ui/tokens.html",
        page=tokens_page({"user": caller().username}, query["limit"], query.get("page_token")),
        roles=roles_up_to(caller().role),
        problem=problem,
        sent=sent or {},
        new_token=new_token,
        limit_labels=LIMIT_LABELS,
    )
    return answered(page, problem)


@ui_bp.get("/tokens")
def tokens():
    return token_list_page()


@ui_bp.post("/tokens")
def make_token():
    sent = form_values(TOKEN_FIELDS, OPTIONAL_TOKEN_FIELDS)
    try:
        fields = TokenCreateSchema().load(token_request(sent))
        new_token = create_token(
            owner_for(caller(), None),
            fields["name"],
            fields.get("role"),
            fields.get("expires_in_days"),
            limits=TokenLimits.of(fields.get("limits") or {}),
        )
    except REFUSALS as error:
        return token_list_page(form_problem(error, nested_in="limits"), sent)
    return token_list_page(new_token=new_token), 201


@ui_bp.post("/tokens/<token_id>/revoke")
def revoke(token_id):
    if not revoke_token(token_id, caller().id):
        raise NotFound(f"You have no token with id {token_id!r}.")
    return redirect(url_for("ui.tokens", notice="revoked"), 303)
