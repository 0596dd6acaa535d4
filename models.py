"""Tables, constraints and the small domain rules that belong to stored data."""

import hashlib
import ipaddress
import re
import secrets
import socket
import unicodedata
import uuid
from dataclasses import dataclass, make_dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from werkzeug.security import generate_password_hash

from access.crypto import cipher

# Objects keep their values after a commit: a response is built from what was just written,
# without reading it back (nothing else writes to a session's objects meanwhile).
db = SQLAlchemy(session_options={"expire_on_commit": False})


CAPABILITIES_BY_TYPE = {
    "anthropic": ("llm",),
    "bedrock": ("llm",),
    "cerebras": ("llm",),
    "chutes": ("llm",),
    "cohere": ("llm", "embedding"),
    "deepseek": ("llm",),
    "gemini": ("llm", "embedding"),
    "github": ("llm",),
    "groq": ("llm",),
    "watsonx": ("llm", "embedding"),
    "jan": ("llm",),
    "mistral": ("llm", "embedding"),
    "moonshot": ("llm",),
    "nvidia": ("llm",),
    "ollama": ("llm", "embedding"),
    "openai": ("llm", "embedding"),
    "openrouter": ("llm",),
    "perplexity": ("llm",),
    "together": ("llm",),
    "voyage": ("embedding",),
    "rits": ("llm", "embedding"),
    "other": ("llm", "embedding"),
}
PROVIDER_TYPES = tuple(CAPABILITIES_BY_TYPE)


def capabilities_of(provider_type):
    """The capabilities a provider has, which its type decides."""
    return list(CAPABILITIES_BY_TYPE[provider_type])


def types_with(capability):
    return [provider_type for provider_type, capabilities in CAPABILITIES_BY_TYPE.items() if capability in capabilities]


@dataclass(frozen=True)
class ModelRef:
    """A model as the registry names it: "{type}:{upstream model id}", e.g. "openai:gpt-4o"."""

    type: str
    upstream_id: str

    @classmethod
    def parse(cls, text):
        """The reference `text` names, or ValueError saying how models are named."""
        provider_type, _, upstream_id = text.partition(":")
        if provider_type not in PROVIDER_TYPES or not upstream_id:
            raise ValueError('A model is named "{type}:{upstream model id}", e.g. "openai:gpt-4o".')
        return cls(provider_type, upstream_id)

    def __str__(self):
        return f"{self.type}:{self.upstream_id}"


CAPABILITIES = ("llm", "embedding")
STATES = ("online", "offline")
ROLES = ("reader", "caller", "service", "admin")
DEFAULT_PORTS = {"http": 80, "https": 443}


def roles_up_to(role):
    """A role includes every role before it."""
    return list(ROLES[: ROLES.index(role) + 1])


def lower_role(role, other_role):
    return min(role, other_role, key=ROLES.index)


def utcnow():
    """Naive UTC, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id():
    return str(uuid.uuid4())


# What str(uuid.UUID(...)) writes; matched, not parsed, since every GET of a resource asks.
CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_canonical_id(text):
    """True for a UUID in the lower-case canonical form every id is stored in."""
    return CANONICAL_ID.fullmatch(text) is not None


def is_storable_text(text):
    """True when every supported database can store `text`: PostgreSQL refuses NUL
    characters, and an unpaired surrogate has no UTF-8 form."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


USERNAME_MAX_LENGTH = 255
# Control and format characters (and line breaks): invisible, or able to rewrite a terminal or a log line.
UNPRINTABLE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def canonical_username(username):
    """The form a user name is stored and looked up in (NFC: "café" is one user however its
    accent was typed), or None when no user can have that name: empty, longer than the
    column, with a colon (HTTP Basic cannot carry it), not storable, or unprintable."""
    if not is_storable_text(username):
        return None
    username = unicodedata.normalize("NFC", username)
    if not 1 <= len(username) <= USERNAME_MAX_LENGTH or ":" in username:
        return None
    return username if is_printable(username) else None


def is_printable(text):
    if text.isascii():  # every Basic login asks: in ASCII only the control characters are unprintable
        return text.isprintable()
    return not any(unicodedata.category(char) in UNPRINTABLE_CATEGORIES for char in text)


def is_host_name(host):
    """Labels of 1 to 63 characters, 253 in all (a trailing dot allowed), as DNS takes them."""
    try:
        return len(host.encode("idna")) <= 254
    except UnicodeError:
        return False


def canonical_host(host):
    """An IP address in its one written form, so that one upstream is one provider: IPv4 in
    any form inet_aton takes (0x7f000001, 2130706433, 127.1, 0177.0.0.1, a trailing dot) as
    the dotted quad 127.0.0.1, IPv6 compressed; a host name as it is."""
    try:
        if ":" in host:
            return str(ipaddress.IPv6Address(host))
        return socket.inet_ntoa(socket.inet_aton(host.removesuffix(".")))
    except (ValueError, OSError):  # not an address
        return host


def normalize_base_url(url):
    """Return the canonical form of a provider URL, or raise ValueError saying why."""
    if any(ord(char) <= 0x20 or ord(char) >= 0x7F for char in url):
        raise ValueError("URL must be ASCII without spaces or control characters.")
    if "#" in url:
        raise ValueError("URL must not contain a fragment.")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("URL scheme must be http or https.")
    if "@" in parts.netloc:
        raise ValueError("URL must not contain user information.")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError("URL must have a host.")
    if ":" not in host and not is_host_name(host):
        raise ValueError("URL host is not a valid host name.")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("URL port is invalid.") from None
    host = canonical_host(host)
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    normalized = f"{scheme}://{netloc}{parts.path.rstrip('/')}"
    return f"{normalized}?{parts.query}" if parts.query else normalized


class ModelProvider(db.Model):
    __tablename__ = "model_providers"
    # Each filter of the list with the list's order (newest first), so a filtered page reads
    # only its rows; the capability filter is a set of types.
    __table_args__ = (
        sa.Index("ix_model_providers_newest", "created_at", "id"),
        sa.Index("ix_model_providers_type_newest", "type", "created_at", "id"),
        sa.Index("ix_model_providers_state_newest", "state", "created_at", "id"),
        sa.Index("ix_model_providers_registry_newest", "registry", "created_at", "id"),
    )

    id = sa.Column(sa.String(36), primary_key=True, default=new_id)
    type = sa.Column(sa.String(32), nullable=False)
    base_url = sa.Column(sa.String(2083), nullable=False, unique=True)
    name = sa.Column(sa.Text)
    description = sa.Column(sa.Text)
    sealed_api_key = sa.Column(sa.Text, nullable=False)
    watsonx_project_id = sa.Column(sa.Text)
    watsonx_space_id = sa.Column(sa.Text)
    # "registry" on the wire; the attribute name is reserved by SQLAlchemy's declarative base.
    manifest = sa.Column("registry", sa.Text)
    state = sa.Column(sa.String(16), nullable=False, default="online")
    consecutive_failures = sa.Column(sa.Integer, nullable=False, default=0)
    last_checked_at = sa.Column(sa.DateTime)
    last_error = sa.Column(sa.Text)
    # When the model index last received this provider's list; null until it first did.
    models_listed_at = sa.Column(sa.DateTime)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    updated_at = sa.Column(sa.DateTime, nullable=False, default=utcnow, onupdate=utcnow)
    # Counts edits: every edit (providers.py, manifests.py) is made WHERE version = the
    # version read, and adds one (a patch racing another change fails instead of storing a
    # mix); probes leave it.
    version = sa.Column(sa.Integer, nullable=False, server_default="1")


PROVIDERS = ModelProvider.__table__
PROVIDER_ATTRIBUTES = tuple(attribute.key for attribute in sa.inspect(ModelProvider).column_attrs)


class Provider(make_dataclass("ProviderColumns", PROVIDER_ATTRIBUTES, slots=True)):
    """A stored provider as every read gives it: the columns under the model's attribute
    names ("manifest" for the column "registry").

    Providers are read only as Core rows (PROVIDER_ROWS) made into these, and written with
    Core statements on PROVIDERS; ModelProvider declares the table. Loading ORM objects
    cost more than all the rest of a GET, and a Row's attributes ten times these. (Not a
    named tuple: apifairy takes a tuple returned by a route for (body, status, headers).)
    """

    __slots__ = ()

    @classmethod
    def from_row(cls, row):
        return cls(*row)

    @property
    def capabilities(self):
        return capabilities_of(self.type)

    def open_api_key(self):
        return cipher.open(self.sealed_api_key)


# Every read of providers selects these (a write returns them), in the order of Provider's fields.
PROVIDER_COLUMNS = tuple(attribute.columns[0] for attribute in sa.inspect(ModelProvider).column_attrs)
PROVIDER_ROWS = sa.select(*PROVIDER_COLUMNS)


def changed_field_names(values):
    """The API's names of the provider columns in `values`: the sealed key is `api_key`."""
    return ["api_key" if column == "sealed_api_key" else column for column in values]


def providers_of(rows):
    return [Provider.from_row(row) for row in rows]


def provider_of(rows):
    """The first of `rows` as a Provider, or None."""
    row = rows.first()
    return None if row is None else Provider.from_row(row)


def provider_etag(provider_id, version, last_checked_at):
    """The ETag of a provider as shown: what it shows changes by an edit (its version) or a
    probe (state and last_error, always with a new last_checked_at), so the tag does too."""
    shown = f"{provider_id}/{version}/{last_checked_at and last_checked_at.isoformat()}"
    return hashlib.blake2b(shown.encode(), digest_size=12).hexdigest()


class ProviderModel(db.Model):
    """The model index: one row per model a provider's upstream last listed."""

    __tablename__ = "provider_models"
    # Routing looks a model up by its upstream id, then by the provider's type.
    __table_args__ = (sa.Index("ix_provider_models_upstream_id", "upstream_id"),)

    provider_id = sa.Column(sa.String(36), sa.ForeignKey("model_providers.id", ondelete="CASCADE"), primary_key=True)
    upstream_id = sa.Column(sa.Text, primary_key=True)
    position = sa.Column(sa.Integer, nullable=False)  # where the upstream listed it
    created = sa.Column(sa.BigInteger, nullable=False)
    owned_by = sa.Column(sa.Text, nullable=False)
    display_name = sa.Column(sa.Text)


PROVIDER_MODELS = ProviderModel.__table__
# Index entries stay within every database's key size limit (PostgreSQL's is about 2.7 kB).
MAX_UPSTREAM_ID_BYTES = 1024


def is_indexable_model_id(upstream_id):
    return is_storable_text(upstream_id) and len(upstream_id.encode()) <= MAX_UPSTREAM_ID_BYTES


class User(db.Model):
    __tablename__ = "users"

    id = sa.Column(sa.Integer, primary_key=True)
    username = sa.Column(sa.String(USERNAME_MAX_LENGTH), nullable=False, unique=True)
    password_hash = sa.Column(sa.String(255), nullable=False)
    role = sa.Column(sa.String(16), nullable=False)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)

    def set_password(self, password):
        self.password_hash = generate_password_hash(password)


USERS = User.__table__


class Lease(db.Model):
    """A named lock with an expiry, held by one process across workers and instances."""

    __tablename__ = "leases"

    name = sa.Column(sa.String(64), primary_key=True)
    holder = sa.Column(sa.String(128), nullable=False)
    expires_at = sa.Column(sa.DateTime, nullable=False)


class JobRun(db.Model):
    """When a background job last started, so a new lease holder keeps the same rhythm."""

    __tablename__ = "job_runs"

    name = sa.Column(sa.String(64), primary_key=True)
    last_started_at = sa.Column(sa.DateTime, nullable=False)


class ManifestSync(db.Model):
    """The last sync of one manifest location (its providers carry the location in "registry")."""

    __tablename__ = "manifest_syncs"

    location = sa.Column(sa.Text, primary_key=True)
    synced_at = sa.Column(sa.DateTime, nullable=False)
    outcome = sa.Column(sa.String(16), nullable=False)
    error = sa.Column(sa.Text)


class SystemConfiguration(db.Model):
    __tablename__ = "system_configuration"

    id = sa.Column(sa.String(36), primary_key=True, default=new_id)
    default_llm_model = sa.Column(sa.Text)
    default_embedding_model = sa.Column(sa.Text)
    updated_at = sa.Column(sa.DateTime, nullable=False, default=utcnow, onupdate=utcnow)
    created_by = sa.Column(sa.String(255))


TOKEN_PREFIX = "mpr_"


def new_token_secret():
    """An API token: the prefix, then 256 random bits (43 URL-safe characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token):
    """What is stored of a token. A plain SHA-256 suffices for 256 random bits (bench/README.md says why)."""
    return hashlib.sha256(token.encode()).hexdigest()


class ApiToken(db.Model):
    """A bearer credential of a user, with a role at most the user's; only its digest is kept."""

    __tablename__ = "api_tokens"
    __table_args__ = (sa.Index("ix_api_tokens_newest", "created_at", "id"),)

    id = sa.Column(sa.String(36), primary_key=True, default=new_id)
    user_id = sa.Column(sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    name = sa.Column(sa.String(255), nullable=False)
    role = sa.Column(sa.String(16), nullable=False)
    digest = sa.Column(sa.String(64), nullable=False, unique=True)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    expires_at = sa.Column(sa.DateTime)
    last_used_at = sa.Column(sa.DateTime)
    # Its limits (access/limits.py), each null for none.
    requests_per_minute = sa.Column(sa.Integer)
    tokens_per_minute = sa.Column(sa.Integer)
    tokens_per_day = sa.Column(sa.Integer)
    max_parallel = sa.Column(sa.Integer)


TOKENS = ApiToken.__table__
LIMIT_NAMES = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "max_parallel")
LIMIT_COLUMNS = tuple(TOKENS.c[name] for name in LIMIT_NAMES)


@dataclass(frozen=True)
class TokenLimits:
    """A token's limits, each an int or None (no limit)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_parallel: int | None = None

    @classmethod
    def of(cls, values):
        """The limits in `values` (a mapping or a row with the limit names), None for those absent."""
        read = values.get if isinstance(values, dict) else lambda name: getattr(values, name, None)
        return cls(*(read(name) for name in LIMIT_NAMES))

    def as_dict(self):
        return {name: getattr(self, name) for name in LIMIT_NAMES}

    def __bool__(self):
        return any(getattr(self, name) is not None for name in LIMIT_NAMES)

    @property
    def counts_tokens(self):
        return self.tokens_per_minute is not None or self.tokens_per_day is not None

    def looser_than(self, ceiling):
        """The names of the limits set here above the ceiling's (nothing is above no limit)."""
        pairs = ((name, getattr(self, name), getattr(ceiling, name)) for name in LIMIT_NAMES)
        return [name for name, value, bound in pairs if None not in (value, bound) and value > bound]

    def within(self, ceiling):
        """These limits with each one left unset taken from the ceiling."""
        return TokenLimits.of(
            {name: getattr(ceiling if getattr(self, name) is None else self, name) for name in LIMIT_NAMES}
        )


class LimitBucket(db.Model):
    """What a limited token's calls did in one second (`span` 1), minute (60) or hour
    (3600): the calls admitted in it, the slots they hold (seconds only; a call's slot is
    given back when it ends; if its process dies, it stops counting a while after the call's
    deadline), and the tokens (input + output) of the calls that ended in it. A window's
    counts are the sums of at most 61 rows (a minute's, of seconds) or 85 (a day's: the
    minutes of its oldest hour, then whole hours), however many calls there were."""

    __tablename__ = "limit_buckets"
    __table_args__ = {"sqlite_with_rowid": False}

    token_id = sa.Column(sa.String(36), sa.ForeignKey("api_tokens.id", ondelete="CASCADE"), primary_key=True)
    span = sa.Column(sa.Integer, primary_key=True)
    starts_at = sa.Column(sa.DateTime, primary_key=True)
    requests = sa.Column(sa.Integer, nullable=False, server_default="0")
    slots = sa.Column(sa.Integer, nullable=False, server_default="0")
    tokens = sa.Column(sa.BigInteger, nullable=False, server_default="0")


LIMIT_BUCKETS = LimitBucket.__table__


class AuditEvent(db.Model):
    """One change (or key read) and who made it: written in the transaction of the change."""

    __tablename__ = "audit_events"
    __table_args__ = (sa.Index("ix_audit_events_newest", "created_at", "id"),)

    id = sa.Column(sa.String(36), primary_key=True, default=new_id)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    actor = sa.Column(sa.String(255), nullable=False, index=True)
    token_id = sa.Column(sa.String(36))  # the API token the actor used, if any
    client_address = sa.Column(sa.String(64))
    request_id = sa.Column(sa.String(128))
    action = sa.Column(sa.String(64), nullable=False, index=True)
    target_id = sa.Column(sa.Text, index=True)
    changed_fields = sa.Column(sa.JSON, nullable=False, default=list)
    detail = sa.Column(sa.Text)


AUDIT_EVENTS = AuditEvent.__table__


class UsageEvent(db.Model):
    """One gateway call as it ended: who made it, which provider and model served it, its
    tokens as the upstream reported them (null when it did not) and its outcome. Written
    in batches, off the call (observability/usage.py)."""

    __tablename__ = "usage_events"
    __table_args__ = (sa.Index("ix_usage_events_created_at", "created_at"),)

    id = sa.Column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True)
    created_at = sa.Column(sa.DateTime, nullable=False)  # when the call ended
    day = sa.Column(sa.Date, nullable=False)  # created_at's day in UTC: a report groups by it without a function
    token_id = sa.Column(sa.String(36))  # null for Basic credentials
    user_id = sa.Column(sa.Integer, nullable=False)  # no foreign key: usage outlives its user
    username = sa.Column(sa.String(USERNAME_MAX_LENGTH), nullable=False)
    provider_id = sa.Column(sa.String(36))  # null when no provider was tried
    model = sa.Column(sa.Text)  # the registry model id; null for a model the index does not know
    endpoint = sa.Column(sa.String(32), nullable=False)  # chat.completions, embeddings, responses, messages
    input_tokens = sa.Column(sa.Integer)
    output_tokens = sa.Column(sa.Integer)
    outcome = sa.Column(sa.String(16), nullable=False)  # ok, or the error status ("502")
    duration_seconds = sa.Column(sa.Float, nullable=False)
    first_chunk_seconds = sa.Column(sa.Float)  # streams only


USAGE_EVENTS = UsageEvent.__table__


class UsageDay(db.Model):
    """Usage events added up per day, model, provider, token and user, kept with the events.

    A report reads whole days here and only its first and last partial days from the
    events, so a month costs the same at a thousand events as at millions. The keys are
    never null (an empty string stands for none), so one combination is one row.
    """

    __tablename__ = "usage_days"
    # Without rowid, SQLite keeps the rows in the primary key's order: a range of days is read
    # in one sweep, already grouped by day and model.
    __table_args__ = (sa.Index("ix_usage_days_user", "user_id", "day"), {"sqlite_with_rowid": False})

    day = sa.Column(sa.Date, primary_key=True)
    model = sa.Column(sa.Text, primary_key=True)
    provider_id = sa.Column(sa.String(36), primary_key=True)
    token_id = sa.Column(sa.String(36), primary_key=True)
    user_id = sa.Column(sa.Integer, primary_key=True)
    username = sa.Column(sa.String(USERNAME_MAX_LENGTH), nullable=False)
    requests = sa.Column(sa.BigInteger, nullable=False)
    errors = sa.Column(sa.BigInteger, nullable=False)
    input_tokens = sa.Column(sa.BigInteger, nullable=False)
    output_tokens = sa.Column(sa.BigInteger, nullable=False)


USAGE_DAYS = UsageDay.__table__


def password_stamp(password_hash):
    """What a console session keeps of its user's password hash when it began: a new password
    (a new hash) ends the user's sessions."""
    return hashlib.sha256(password_hash.encode()).hexdigest()


class ConsoleSession(db.Model):
    """A signed-in session of the web console. Its cookie holds a random secret; only the
    secret's digest is kept, so the table lets no one in. Deleting the row signs it out."""

    __tablename__ = "ui_sessions"

    digest = sa.Column(sa.String(64), primary_key=True)
    user_id = sa.Column(sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    password_stamp = sa.Column(sa.String(64), nullable=False)
    created_at = sa.Column(sa.DateTime, nullable=False, default=utcnow)
    expires_at = sa.Column(sa.DateTime, nullable=False, index=True)


CONSOLE_SESSIONS = ConsoleSession.__table__
