"""HTTP Basic authentication against stored users, with roles reader < service < admin."""

import hashlib
import hmac
import os
import threading
from collections import OrderedDict
from functools import cache

import sqlalchemy as sa
from flask_httpauth import HTTPBasicAuth
from werkzeug.security import check_password_hash, generate_password_hash

from errors import problem
from models import User, db, is_storable_text

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


@cache
def decoy_password_hash():
    return generate_password_hash(os.urandom(16).hex())


@auth.verify_password
def verify_password(username, password):
    if not username or not is_storable_text(username):
        return None
    user = db.session.scalar(sa.select(User).where(User.username == username))
    if user is None:
        # Spend what a wrong password costs, so timing does not tell which names exist.
        check_password_hash(decoy_password_hash(), password)
        return None
    if (user, password) in verified_passwords:
        return user
    if user.check_password(password):
        verified_passwords.add(user, password)
        return user
    return None


@auth.get_user_roles
def user_roles(user):
    return user.roles


@auth.error_handler
def auth_error(status):
    if status == 401:
        return problem(401, "Authentication is required: send valid HTTP Basic credentials.")
    return problem(403, "Your role does not allow this operation.")
