"""Console sign-in: sessions kept in the database, their cookie, and the CSRF token of every form.

A session's cookie holds a random secret; the database keeps its digest, its user, its
expiry and a stamp of the user's password hash. Signing out deletes the row, so a copied
cookie stops working at once, in every worker and instance; so does the user's deletion
(the rows cascade) or a new password (the stamp no longer matches). The user's role is read
with the session on every page, so a demotion counts from the next one.

A form's CSRF token is an HMAC of the secret of the cookie it goes with: the session's once
signed in, before that a sign-in cookie's. Another site can neither read the cookie nor
send it (SameSite=Strict), so it cannot make the token.
"""

import hashlib
import hmac
import secrets
from datetime import timedelta

from flask import current_app, request

from access.auth import Caller
from models import db, password_stamp, token_digest, utcnow
from storage.ui_sessions import add_session, delete_session, delete_sessions_expired_by, live_session
from storage.users import credentials_of

SESSION_COOKIE = "registry_console"
SIGN_IN_COOKIE = "registry_console_sign_in"
CSRF_FIELD = "csrf_token"


def new_secret():
    return secrets.token_urlsafe(32)


def csrf_token_of(secret):
    return hmac.new(secret.encode(), b"console form", hashlib.sha256).hexdigest()


def is_csrf_token_of(secret, sent_token):
    return bool(secret) and hmac.compare_digest(csrf_token_of(secret), sent_token or "")


def session_lifetime():
    return timedelta(hours=current_app.config["UI_SESSION_HOURS"])


def start_session(caller):
    """A new session of the user whose password was just verified: its secret, for the cookie.
    Sessions that expired, anyone's, are deleted on the way."""
    user = credentials_of(caller.username)
    now, secret = utcnow(), new_secret()
    delete_sessions_expired_by(now)
    add_session(
        {
            "digest": token_digest(secret),
            "user_id": user.id,
            "password_stamp": password_stamp(user.password_hash),
            "created_at": now,
            "expires_at": now + session_lifetime(),
        }
    )
    db.session.commit()
    return secret


def session_caller(secret):
    """The signed-in user of the session with this secret (a Caller), or None when there is
    no such session, it expired, or the user's password changed since."""
    if not secret:
        return None
    user = live_session(token_digest(secret), utcnow())
    if user is None or not hmac.compare_digest(user.password_stamp, password_stamp(user.password_hash)):
        return None
    return Caller(user.id, user.username, user.role)


def end_session(secret):
    delete_session(token_digest(secret))
    db.session.commit()


def cookie_path():
    """The console's path, under the mount path: the API never receives the cookies."""
    return request.script_root + "/ui"


def set_cookie(response, name, value, max_age=None):
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=cookie_path(),
        secure=request.is_secure,
        httponly=True,
        samesite="Strict",
    )


def set_session_cookie(response, secret):
    set_cookie(response, SESSION_COOKIE, secret, max_age=int(session_lifetime().total_seconds()))


def clear_cookie(response, name):
    response.delete_cookie(name, path=cookie_path(), secure=request.is_secure, httponly=True, samesite="Strict")
