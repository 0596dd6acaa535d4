"""Who is calling: HTTP Basic credentials of a user, or a Bearer API token, on every
/api/v1 route (under /api/v1/anthropic/ the token may also come as `x-api-key`); roles
reader < caller < service < admin."""

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from datetime import timedelta
from functools import cache
from typing import NamedTuple

from flask import current_app, request
from flask_httpauth import HTTPBasicAuth
from werkzeug.datastructures import Authorization
from werkzeug.exceptions import TooManyRequests
from werkzeug.security import check_password_hash, generate_password_hash

from api.errors import ANTHROPIC_PATH_PREFIX, problem
from models import (
    TokenLimits,
    canonical_username,
    lower_role,
    roles_up_to,
    token_digest,
    utcnow,
)
from observability.logs import remember_user
from observability.metrics import record_failed_login
from serving.hub import off_the_hub
from storage.connections import no_connection
from storage.tokens import record_token_use, valid_token
from storage.users import credentials_of

log = logging.getLogger(__name__)
REALM = "model-provider-registry"
CHALLENGES = [("WWW-Authenticate", f'Basic realm="{REALM}"'), ("WWW-Authenticate", f'Bearer realm="{REALM}"')]
# Failed Basic logins per client address across all user names, as a multiple of the limit per name.
ADDRESS_LIMIT_FACTOR = 4
# last_used_at is written when the stored value is older than this, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class Caller(NamedTuple):
    """The authenticated caller: a user, and the token it came with, if any."""

    id: int  # the user's
    username: str
    role: str  # what this request may do: the user's role, or the token's (at most its owner's)
    token_id: str | None = None
    limits: TokenLimits | None = None  # the token's gateway limits, when it has any


class BasicOrBearerAuth(HTTPBasicAuth):
    """HTTP Basic credentials of a registry user, or `Authorization: Bearer <API token>`.

    One HTTPBasicAuth that also takes tokens, rather than flask-httpauth's MultiAuth:
    APIFairy documents only HTTPBasicAuth and HTTPTokenAuth (anything else is an "Unknown
    authentication scheme"), and docs.py declares the Bearer scheme beside Basic.
    """

    def __init__(self):
        super().__init__(realm=REALM)
        self.verify_token_callback = None

    def verify_token(self, callback):
        self.verify_token_callback = callback
        return callback

    def get_auth(self):
        # The headers read from the WSGI environ: request.headers costs more for each lookup.
        scheme, _, token = request.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer":
            return Authorization("bearer", token=token.strip())
        if not scheme and request.path.startswith(ANTHROPIC_PATH_PREFIX):
            api_key = request.environ.get("HTTP_X_API_KEY")
            if api_key:
                return Authorization("bearer", token=api_key.strip())  # as Anthropic's clients send their key
        return super().get_auth()

    # Two of flask-httpauth's steps that cost on every request and do nothing here: the
    # stored password it would fetch (verify_password checks the password itself), and
    # Flask's check, for each callback and view, of whether it is a coroutine (none is).
    def get_auth_password(self, auth):
        return None

    def ensure_sync(self, f):
        return f

    def authenticate(self, auth, stored_password):
        if auth is not None and auth.type == "bearer":
            return self.verify_token_callback(auth.token) if auth.token else None
        return super().authenticate(auth, stored_password)


auth = BasicOrBearerAuth()
auth.__doc__ = "HTTP Basic credentials of a registry user; roles reader < caller < service < admin."


class BoundedMemory:
    """A thread-safe mapping of at most `capacity` entries; the least recently used go first."""

    def __init__(self, capacity):
        self._capacity = capacity
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key, value):
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def pop(self, key):
        with self._lock:
            self._entries.pop(key, None)


class VerifiedPasswords:
    """Passwords this process has already checked with the slow hash.

    Keyed by user name and a keyed digest of the password, so a wrong password never
    matches and the plain password is never held. An entry spares the slow hash only while
    the user's id and stored hash are still the ones verified: a password change, or a new
    user of the same name, never matches. The user is read on every request all the same,
    so a demotion or a deletion takes effect on the next one (roles are always current).
    """

    def __init__(self, capacity=1024):
        self._secret = os.urandom(32)
        self._memory = BoundedMemory(capacity)

    def key(self, username, password):
        # BLAKE2's keyed mode: a MAC in one call, where an HMAC object costs several on every request.
        return username, hashlib.blake2b(password.encode(), key=self._secret).digest()

    def matches(self, key, user):
        return self._memory.get(key) == (user.id, user.password_hash)

    def remember(self, key, user):
        self._memory.put(key, (user.id, user.password_hash))
        return caller_of(user)


def caller_of(user):
    return Caller(user.id, user.username, user.role)


class FailedAttempts:
    """Failed attempts per key (a client address, or an address and user name) over a
    sliding window, in this process.

    After `limit` failures within `window` seconds a key is refused until its oldest
    failure leaves the window.
    """

    def __init__(self, limit, window, capacity=10000):
        self.limit = limit
        self.window = window
        self._capacity = capacity
        self._failures = OrderedDict()  # key -> deque of monotonic failure times
        self._lock = threading.Lock()

    def retry_after(self, key):
        """Seconds until this key may try again, or 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(key)
            while failures and failures[0] <= now - self.window:
                failures.popleft()
            if not failures or len(failures) < self.limit:
                return 0
            return max(1, math.ceil(failures[0] + self.window - now))

    def record(self, key):
        with self._lock:
            self._failures.setdefault(key, deque(maxlen=self.limit)).append(time.monotonic())
            self._failures.move_to_end(key)
            while len(self._failures) > self._capacity:
                self._failures.popitem(last=False)

    def forget(self, key):
        with self._lock:
            self._failures.pop(key, None)

    def refuse_if_limited(self, key, who):
        retry_after = self.retry_after(key)
        if retry_after:
            raise TooManyRequests(f"Too many failed {who}; retry in {retry_after} s.", retry_after=retry_after)


class AuthState:
    """What one process remembers about credentials (app.extensions["auth"])."""

    def __init__(self, limit, window):
        self.verified_passwords = VerifiedPasswords()
        self.login_failures_by_name = FailedAttempts(limit, window)
        self.login_failures_by_address = FailedAttempts(ADDRESS_LIMIT_FACTOR * limit, window)
        # Counted apart from logins, so a flood of bad tokens never locks out a password.
        self.token_failures = FailedAttempts(ADDRESS_LIMIT_FACTOR * limit, window)
        self.verified_tokens = BoundedMemory(capacity=1024)  # digests of tokens this process accepted


def auth_state():
    return current_app.extensions["auth"]


@cache
def decoy_password_hash():
    return generate_password_hash(os.urandom(16).hex())


def init_auth(app):
    app.extensions["auth"] = AuthState(app.config["LOGIN_FAILURE_LIMIT"], app.config["LOGIN_WINDOW"])
    decoy_password_hash()  # made now, so the first unknown name costs no more than a wrong password


# Slow hashes one worker runs at once, each in a thread off the gevent hub: requests that
# arrive together with a password not yet verified wait for the first one's hash and then
# find it verified, and wrong passwords keep at most this many cores busy per worker.
slow_hashes = threading.BoundedSemaphore(4)


@contextlib.contextmanager
def slow_hash_turn():
    """One of the worker's slow-hash turns. The request's database connection goes back to
    the pool first: requests waiting for a turn hold none, so they cannot use up the pool
    that the requests done hashing need next."""
    with no_connection(), slow_hashes:
        yield


def slow_hash_matches(password_hash, password):
    return off_the_hub(check_password_hash, password_hash, password)


def refuse_if_address_limited(state):
    state.login_failures_by_address.refuse_if_limited(request.remote_addr, "logins from your address")


def check_credentials(state, key, username, password, name_key):
    """The caller when the password is right, else None; the slow hash only for a password
    this process has not verified for this user's current hash, and the limits only for such a
    password: one a worker has verified is never refused for the guesses of others."""
    user = credentials_of(username)
    if user is not None and state.verified_passwords.matches(key, user):
        return caller_of(user)
    state.login_failures_by_name.refuse_if_limited(name_key, "logins as this user from your address")
    refuse_if_address_limited(state)
    with slow_hash_turn():
        refuse_if_address_limited(state)  # the guesses this request waited for may have reached the limit
        if user is None:
            # Spend what a wrong password costs, so timing does not tell which names exist.
            slow_hash_matches(decoy_password_hash(), password)
            return None
        verified = state.verified_passwords.matches(key, user)  # by a request this one waited for
        if verified or slow_hash_matches(user.password_hash, password):
            return state.verified_passwords.remember(key, user)
    return None


@auth.verify_password
def verify_password(username, password):
    username = canonical_username(username)
    if username is None:
        return None
    state = auth_state()
    name_key = (request.remote_addr, hashlib.sha256(username.encode()).digest())  # bounded, whatever was sent
    key = state.verified_passwords.key(username, password)
    caller = check_credentials(state, key, username, password, name_key)
    if caller is None:
        state.login_failures_by_name.record(name_key)
        state.login_failures_by_address.record(request.remote_addr)
        record_failed_login("password")
    else:
        state.login_failures_by_name.forget(name_key)
        remember_user(caller.username)
    return caller


def note_token_use(token, now):
    """Keep last_used_at within LAST_USED_RESOLUTION: a write at most about once a minute per token."""
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_RESOLUTION:
        return
    record_token_use(token.id, now, stale_before=now - LAST_USED_RESOLUTION)


@auth.verify_token
def verify_token(token):
    state = auth_state()
    digest = token_digest(token)
    if state.verified_tokens.get(digest) is None:
        state.token_failures.refuse_if_limited(request.remote_addr, "token attempts from your address")
    now = utcnow()
    row = valid_token(digest, now)
    if row is None:
        state.verified_tokens.pop(digest)
        state.token_failures.record(request.remote_addr)
        record_failed_login("token")
        return None
    state.verified_tokens.put(digest, True)
    note_token_use(row, now)
    remember_user(row.username, row.id)
    return Caller(row.user_id, row.username, lower_role(row.role, row.user_role), row.id, TokenLimits.of(row) or None)


@auth.get_user_roles
def user_roles(caller):
    return roles_up_to(caller.role)


@auth.error_handler
def auth_error(status):
    if status == 401:
        return problem(
            401, "Authentication is required: send HTTP Basic credentials or a Bearer API token.", headers=CHALLENGES
        )
    return problem(403, "Your role does not allow this operation.")
