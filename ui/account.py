"""Signing in and out of the console."""

from flask import g, make_response, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException, NotFound

from access.auth import verify_password
from ui.console import FormProblem, answered, caller, form_problem, safe_next, ui_bp
from ui.sessions import (
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    clear_cookie,
    end_session,
    new_secret,
    set_cookie,
    set_session_cookie,
    start_session,
)

WRONG_CREDENTIALS = FormProblem(401, "Wrong user name or password.", {}, {})


@ui_bp.get("/")
def index():
    return redirect(url_for("ui.providers"))


@ui_bp.get("/<path:unknown>")
def no_such_page(unknown):
    raise NotFound("The console has no page at this address.")


def sign_in_page(problem=None, username=""):
    """The sign-in form, with the cookie whose secret its CSRF token is made of."""
    secret = g.sign_in_secret = request.cookies.get(SIGN_IN_COOKIE) or new_secret()
    page = render_template("ui/sign_in.html", problem=problem, username=username, next=request.values.get("next", ""))
    response = make_response(answered(page, problem))
    set_cookie(response, SIGN_IN_COOKIE, secret)
    return response


@ui_bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    """A registry user's name and password, checked as the API checks Basic credentials, with
    the same limits on failed attempts."""
    if request.method == "GET":
        if caller() is not None:
            return redirect(safe_next(request.args.get("next")))
        return sign_in_page()
    username = request.form.get("username", "")
    try:
        signed_in = verify_password(username, request.form.get("password", ""))
    except HTTPException as error:  # too many failed attempts
        return sign_in_page(form_problem(error), username)
    if signed_in is None:
        return sign_in_page(WRONG_CREDENTIALS, username)
    response = redirect(safe_next(request.form.get("next")), 303)
    set_session_cookie(response, start_session(signed_in))
    clear_cookie(response, SIGN_IN_COOKIE)
    return response


@ui_bp.post("/sign-out")
def sign_out():
    """Ends the session on the server: its cookie, wherever it was copied, signs in no more."""
    end_session(request.cookies[SESSION_COOKIE])
    response = redirect(url_for("ui.sign_in", notice="signed-out"), 303)
    clear_cookie(response, SESSION_COOKIE)
    return response
