"""The console's blueprint and what every page shares: who is signed in, the CSRF check of
every POST, the role a page needs, its headers, and errors shown as pages.

The pages call the same domain functions and schemas as the API, so the console can do
nothing the user's role forbids through the API, and refuses bad input with the API's
messages. An error no page catches is answered by the app's error handlers, as for the API,
and its problem document is shown as an error page.
"""

import json
from functools import wraps
from typing import NamedTuple
from urllib.parse import urlsplit

from apifairy.exceptions import ValidationError as RequestValidationError
from flask import Blueprint, g, redirect, render_template, request, url_for
from marshmallow import EXCLUDE, ValidationError
from werkzeug.exceptions import Forbidden, HTTPException

from access.auth import user_roles
from api.errors import PROBLEM_MEDIA_TYPE, flatten_messages
from observability.logs import remember_user
from schemas import Timestamp
from ui.sessions import CSRF_FIELD, SESSION_COOKIE, SIGN_IN_COOKIE, csrf_token_of, is_csrf_token_of, session_caller

ui_bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

# Nothing but the registry's own files: no page can load anything from another origin.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# What a page says after the action that led to it (?notice=...): fixed texts, never the query's.
NOTICES = {
    "created": "The provider was added.",
    "updated": "The provider was saved.",
    "checked": "The provider was checked just now.",
    "refreshed": "The provider's models were listed just now.",
    "deleted": "The provider was deleted.",
    "revoked": "The token was revoked; it no longer works.",
    "defaults": "The default models were saved.",
    "signed-out": "You are signed out.",
}
ROLE_REFUSAL = "Your role does not allow this operation."
FORGED_FORM = "The form was not sent from this console's page, or your session ended meanwhile; reload it and retry."


class FormProblem(NamedTuple):
    """Why an action was refused, as the API says it: the status, a detail and messages per field."""

    status: int
    detail: str
    errors: dict
    headers: dict


def form_problem(error, nested_in=None):
    """The refusal a form shows; the messages of fields under `nested_in` (a part of the API's
    body the form spreads over fields of its own) named by their own field."""
    if isinstance(error, ValidationError):
        messages = flatten_messages(error.messages)
        if nested_in is not None:
            messages = {name.removeprefix(f"{nested_in}."): texts for name, texts in messages.items()}
        return FormProblem(422, "Some fields are invalid.", messages, {})
    kept = {name: value for name, value in error.get_headers() if name == "Retry-After"}
    return FormProblem(error.code, error.description, {}, kept)


def answered(page, problem=None):
    """A page, with the status and headers of the refusal it shows, if any."""
    return page if problem is None else (page, problem.status, problem.headers)


REFUSALS = (ValidationError, HTTPException)  # what an action refuses a form with, beside its fields


def form_values(names, optional=()):
    """The sent values of the form fields `names`; an `optional` one left blank is None (the API's null)."""
    values = {}
    for name in names:
        if name in request.form:
            value = request.form[name]
            values[name] = None if name in optional and not value.strip() else value
    return values


def query_values(schema):
    """The page's query, loaded by the API's schema of the same list; blank filters are left
    out, and values the schema refuses are a 422 naming them, as the API answers."""
    sent = {name: value for name, value in request.args.items() if value}
    try:
        return schema.load(sent, unknown=EXCLUDE)
    except ValidationError as error:
        raise RequestValidationError(422, {"query": error.messages}) from None


def caller():
    return g.console_caller


def is_admin():
    return "admin" in user_roles(caller())


def requires(role):
    """A page for `role` and above; others get the API's 403."""

    def decorate(view):
        @wraps(view)
        def guarded(*args, **kwargs):
            if role not in user_roles(caller()):
                raise Forbidden(ROLE_REFUSAL)
            return view(*args, **kwargs)

        return guarded

    return decorate


def safe_next(target):
    """`target` when it is a console page of this registry, else the providers page: a sign-in
    link cannot send anyone elsewhere."""
    parts = urlsplit(target or "")
    console_root = url_for("ui.index")
    if not parts.scheme and not parts.netloc and parts.path.startswith(console_root) and "\\" not in target:
        return target
    return url_for("ui.providers")


@ui_bp.before_request
def sign_in_or_refuse():
    if request.endpoint == "ui.static":
        return None
    g.console_caller = session_caller(request.cookies.get(SESSION_COOKIE))
    if g.console_caller is not None:
        remember_user(g.console_caller.username)  # in the log lines and audit events
    if request.endpoint == "ui.sign_in":
        return refuse_forged_post(request.cookies.get(SIGN_IN_COOKIE))
    if g.console_caller is None:
        next_page = request.script_root + request.full_path.rstrip("?") if request.method == "GET" else None
        return redirect(url_for("ui.sign_in", next=next_page), 303)
    return refuse_forged_post(request.cookies.get(SESSION_COOKIE))


def refuse_forged_post(cookie_secret):
    if request.method == "POST" and not is_csrf_token_of(cookie_secret, request.form.get(CSRF_FIELD)):
        raise Forbidden(FORGED_FORM)


def csrf_token():
    """The token the page's forms carry: of the session, or before it of the sign-in cookie."""
    secret = request.cookies.get(SESSION_COOKIE) if g.get("console_caller") else g.get("sign_in_secret")
    return csrf_token_of(secret) if secret else ""


def url_with(**changes):
    """This page's URL with some of its query's values changed (None drops one); a notice is not carried along."""
    query = {name: value for name, value in request.args.items() if name != "notice"}
    query.update(changes)
    kept = {name: value for name, value in query.items() if value}
    return url_for(request.endpoint, **(request.view_args or {}), **kept)


def shown_time(moment):
    """A stored (naive UTC) time as a page shows it; the machine-readable form is Timestamp's."""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


@ui_bp.context_processor
def page_context():
    return {
        "url_with": url_with,
        "shown_time": shown_time,
        "rfc3339": Timestamp.text_of,
        "caller": g.get("console_caller"),
        "is_admin": g.get("console_caller") is not None and is_admin(),
        "csrf_field": CSRF_FIELD,
        "csrf_token": csrf_token,
        "notice": NOTICES.get(request.args.get("notice")),
    }


def problem_page(response):
    """An error the app answered as a problem document, shown as a page with its status."""
    try:
        document = json.loads(response.get_data())
    except ValueError:
        document = {}
    page = render_template(
        "ui/error.html",
        status=response.status_code,
        title=document.get("title", "Error"),
        detail=document.get("detail", ""),
        errors=document.get("errors", {}),
    )
    response.set_data(page)
    response.mimetype = "text/html"
    return response


@ui_bp.after_request
def page_headers(response):
    if response.mimetype == PROBLEM_MEDIA_TYPE:
        response = problem_page(response)
    if request.endpoint != "ui.static":
        response.headers.update(PAGE_HEADERS)
    return response
