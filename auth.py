"""HTTP Basic authentication against stored users, with roles reader < service < admin."""

import hashlib
import hmac
import math
import os
import threading
import time
from collections import OrderedDict, deque
from functools import cache

import sqlalchemy as sa
from flask import current_app, request
from flask_httpauth import HTTPBasicAuth
from werkzeug.exceptions import TooManyRequests
from werkzeug.security import check_password_hash, generate_password_hash

from errors import problem
from models import User, canonical_username, read_connection, roles_up_to

REALM = "model-provider-registry"
auth = HTTPBasicAuth(realm=REALM)
auth.__doc__ = "HTTP Basic credentials of a registry user; roles reader < service < admin."


class VerifiedPasswords:
    """Passwords this process has already checked with the slow hash.

    Keyed by the user's id and stored hash, so a password change or a new user of the
    same name never matches, and by a keyed digest of the password, so a wrong password
    never matches and the plain password is never held.
    """

    def __init__(self, capacity=1024):
        self._capacity = capacity
        self._secret = os.urandom(32)
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, user, password):
        digest = hmac.new(self._secret, password.encode(), hashlib.sha256).digest()
        return user.id, user.password_hash, digest

    def __contains__(self, user_and_password):
        key = self._key(*user_and_password)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        return False

    def add(self, user, password):
        with self._lock:
            self._entries[self._key(user, password)] = True
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


verified_passwords = VerifiedPasswords()


class FailedLogins:
    """Failed logins per client address and username over a sliding window, in this process.

    After `limit` failures within `window` seconds a pair is refused, before its password
    is checked, until its oldest failure leaves the window. Other addresses trying the
    same name, and the same address trying other names, are not affected.
    """

    def __init__(self, limit, window, capacity=10000):
        self.limit = limit
        self.window = window
        self._capacity = capacity
        self._failures = OrderedDict()  # key -> deque of monotonic failure times
        self._lock = threading.Lock()

    @staticmethod
    def _key(address, username):
        return address, hashlib.sha256(username.encode()).digest()  # bounded size, whatever was sent

    def retry_after(self, address, username):
        """Seconds until this pair may try again, or 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(self._key(address, username))
            while failures and failures[0] <= now - self.window:
                failures.popleft()
            if not failures or len(failures) < self.limit:
                return 0
            return max(1, math.ceil(failures[0] + self.window - now))

    def record(self, address, username):
        key = self._key(address, username)
        with self._lock:
            self._failures.setdefault(key, deque(maxlen=self.limit)).append(time.monotonic())
            self._failures.move_to_end(key)
            while len(self._failures) > self._capacity:
                self._failures.popitem(last=False)

    def forget(self, address, username):
        with self._lock:
            self._failures.pop(self._key(address, username), None)


@cache
def decoy_password_hash():
    return generate_password_hash(os.urandom(16).hex())


def init_auth(app):
    app.extensions["failed_logins"] = FailedLogins(app.config["LOGIN_FAILURE_LIMIT"], app.config["LOGIN_WINDOW"])
    decoy_password_hash()  # made now, so the first unknown name costs no more than a wrong password


# Every request runs this: a Core statement built once, giving a row rather than a User object.
USERS = User.__table__
CREDENTIALS_BY_USERNAME = sa.select(USERS.c.id, USERS.c.username, USERS.c.password_hash, USERS.c.role).where(
    USERS.c.username == sa.bindparam("username")
)


def check_credentials(username, password):
    """The caller's (id, username, password_hash, role) row when the password is right."""
    user = read_connection().execute(CREDENTIALS_BY_USERNAME, {"username": username}).first()
    if user is None:
        # Spend what a wrong password costs, so timing does not tell which names exist.
        check_password_hash(decoy_password_hash(), password)
        return None
    if (user, password) in verified_passwords:
        return user
    if check_password_hash(user.password_hash, password):
        verified_passwords.add(user, password)
        return user
    return None


@auth.verify_password
def verify_password(username, password):
    username = canonical_username(username)
    if username is None:
        return None
    failed_logins = current_app.extensions["failed_logins"]
    retry_after = failed_logins.retry_after(request.remote_addr, username)
    if retry_after:
        raise TooManyRequests(
            f"Too many failed logins as this user from your address; retry in {retry_after} s.", retry_after=retry_after
        )
    user = check_credentials(username, password)
    if user is None:
        failed_logins.record(request.remote_addr, username)
    else:
        failed_logins.forget(request.remote_addr, username)
    return user


@auth.get_user_roles
def user_roles(user):
    return roles_up_to(user.role)


@auth.error_handler
def auth_error(status):
    if status == 401:
        return problem(401, "Authentication is required: send valid HTTP Basic credentials.")
    return problem(403, "Your role does not allow this operation.")
