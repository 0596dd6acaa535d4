"""Model Provider Registry: where an organisation's LLM and embedding model providers live,
what they serve, and whether they answer."""

import functools
import logging
import math
import os

from alembic.script import ScriptDirectory
from flask import Flask
from flask_migrate import Migrate
from werkzeug.middleware.proxy_fix import ProxyFix

from access.auth import init_auth
from access.crypto import KEY_FILE_NAME, cipher
from access.limits import init_limits
from api.audit import audit_bp
from api.configurations import configurations_bp
from api.docs import apifairy, docs_bp
from api.errors import errors_bp
from api.health import health_bp
from api.providers import providers_bp
from api.registry import registry_bp
from api.tokens import tokens_bp
from api.usage import usage_bp
from catalog.manifests import ManifestVariables, sync_on_schedule
from gateway.anthropic import anthropic_bp
from gateway.openai import openai_bp
from jobs.prober import probe_all
from jobs.scheduler import Scheduler
from models import USERNAME_MAX_LENGTH, canonical_username, db
from observability import audit
from observability.logs import RequestIds
from observability.metrics import init_metrics
from observability.usage import init_usage, prune_old_usage
from schemas import ma
from serving.cli import register_commands
from storage.connections import end_connections
from storage.sqlite import prepare_sqlite
from ui import ui_bp
from upstreams.http import cap_gateway_connections

log = logging.getLogger("registry")
migrate = Migrate()

HERE = os.path.dirname(os.path.abspath(__file__))
MIGRATIONS_DIRECTORY = os.path.join(HERE, "migrations")
MAX_BODY_BYTES = 64 * 1024
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
ENSURE_SYNC_MEMORY = 1024  # far more hooks, views and callbacks than the registry has
DEFAULT_WORKER_CONNECTIONS = 1000  # gunicorn.conf.py's default too


# The registry's own settings besides REGISTRY_*: read here, in gunicorn.conf.py (and by gunicorn
# itself: SCRIPT_NAME), and LOG_FORMAT.
OTHER_SETTINGS = frozenset(
    {
        "DATABASE_URL",
        "HOST",
        "PORT",
        "LOG_FORMAT",
        "LOG_LEVEL",
        "WEB_CONCURRENCY",
        "GUNICORN_WORKER_CONNECTIONS",
        "PROMETHEUS_MULTIPROC_DIR",
        "SCRIPT_NAME",
    }
)


def is_registry_setting(name):
    """REGISTRY_*, OTHER_SETTINGS, and PG* (what libpq reads beside DATABASE_URL: PGPASSWORD, ...)."""
    return name.startswith(("REGISTRY_", "PG")) or name in OTHER_SETTINGS


def read_bool(environ, name, default):
    value = environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in TRUE_WORDS | FALSE_WORDS:
        raise RuntimeError(f"{name} must be true or false, not {value!r}.")
    return value in TRUE_WORDS


def read_number(environ, name, default, kind=int):
    value = environ.get(name, "").strip()
    try:
        number = kind(value) if value else default
    except ValueError:
        raise RuntimeError(f"{name} must be a number, not {value!r}.") from None
    if number < 0:
        raise RuntimeError(f"{name} must not be negative.")
    return number


def read_choice(environ, name, choices):
    """One of `choices` (any case); the first is the default."""
    value = environ.get(name, "").strip().upper() or choices[0]
    if value not in choices:
        raise RuntimeError(f"{name} must be one of {', '.join(choices)}, not {value!r}.")
    return value


def read_username(environ, name, default):
    username = canonical_username(environ.get(name) or default)
    if username is None:
        raise RuntimeError(f"{name} must be 1 to {USERNAME_MAX_LENGTH} characters, without ':' or control characters.")
    return username


def read_list(environ, name):
    return [item.strip() for item in environ.get(name, "").split(",") if item.strip()]


def setting_text(value):
    """A setting given as a Python value (False, 0, a list of keys) in the form the environment spells it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def settings_over(environ, settings):
    """`environ` with `settings` (named as the environment variables) put over it; None unsets."""
    merged = dict(environ)
    for name, value in (settings or {}).items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = setting_text(value)
    return merged


def gateway_share(worker_connections):
    """Gateway calls one worker takes at once: its connections but a fifth, kept for the other routes."""
    return max(1, worker_connections - math.ceil(worker_connections / 5))


def prune_interval(environ, name, retention_days):
    """Seconds between the deletions past a retention; 0 (also when the retention is 0:
    keep everything) turns them off."""
    return read_number(environ, name, 3600.0, float) if retention_days else 0


def load_config(environ):
    """Configuration from the environment (or the settings given to create_app), read once."""
    instance_path = os.path.abspath(environ.get("REGISTRY_INSTANCE_PATH") or os.path.join(HERE, "instance"))
    database_url = environ.get("DATABASE_URL") or f"sqlite:///{instance_path}/registry.db"
    audit_retention_days = read_number(environ, "REGISTRY_AUDIT_RETENTION_DAYS", 90.0, float)
    worker_connections = max(1, read_number(environ, "GUNICORN_WORKER_CONNECTIONS", DEFAULT_WORKER_CONNECTIONS))
    usage_retention_days = read_number(environ, "REGISTRY_USAGE_RETENTION_DAYS", 90.0, float)
    return {
        "INSTANCE_PATH": instance_path,
        "SQLALCHEMY_DATABASE_URI": database_url,
        "ADMIN_USERNAME": read_username(environ, "REGISTRY_ADMIN_USERNAME", "admin"),
        "ADMIN_PASSWORD": environ.get("REGISTRY_ADMIN_PASSWORD") or None,
        "ENCRYPTION_KEYS": read_list(environ, "REGISTRY_ENCRYPTION_KEYS"),
        "VERIFY_ON_CREATE": read_bool(environ, "REGISTRY_VERIFY_ON_CREATE", True),
        "UPSTREAM_TIMEOUT": read_number(environ, "REGISTRY_UPSTREAM_TIMEOUT", 10.0, float),
        "GATEWAY_TIMEOUT": read_number(environ, "REGISTRY_GATEWAY_TIMEOUT", 600.0, float),
        "DEFAULT_MAX_PARALLEL": max(1, read_number(environ, "REGISTRY_DEFAULT_MAX_PARALLEL", 32)),
        "GATEWAY_CALLS_PER_WORKER": gateway_share(worker_connections),
        "PROXY_HOPS": read_number(environ, "REGISTRY_PROXY_HOPS", 0),
        "GATEWAY_ATTEMPT_TIMEOUT": read_number(environ, "REGISTRY_GATEWAY_ATTEMPT_TIMEOUT", 120.0, float),
        "GATEWAY_COOLDOWN": read_number(environ, "REGISTRY_GATEWAY_COOLDOWN", 30.0, float),
        "GATEWAY_KEEPALIVE": read_number(environ, "REGISTRY_GATEWAY_KEEPALIVE", 15.0, float),
        "WATSONX_IAM_URL": environ.get("REGISTRY_WATSONX_IAM_URL") or "https://iam.cloud.ibm.com/identity/token",
        "PROBE_INTERVAL": read_number(environ, "REGISTRY_PROBE_INTERVAL", 60.0, float),
        "PROBE_FAILURES": max(1, read_number(environ, "REGISTRY_PROBE_FAILURES", 2)),
        "MANIFESTS": read_list(environ, "REGISTRY_MANIFESTS"),
        "SYNC_INTERVAL": read_number(environ, "REGISTRY_SYNC_INTERVAL", 300.0, float),
        "LOGIN_FAILURE_LIMIT": max(1, read_number(environ, "REGISTRY_LOGIN_FAILURES", 5)),
        "LOGIN_WINDOW": read_number(environ, "REGISTRY_LOGIN_WINDOW", 60.0, float),
        "METRICS": read_bool(environ, "REGISTRY_METRICS", True),
        "AUDIT_RETENTION_DAYS": audit_retention_days,
        "AUDIT_PRUNE_INTERVAL": prune_interval(environ, "REGISTRY_AUDIT_PRUNE_INTERVAL", audit_retention_days),
        "USAGE_RETENTION_DAYS": usage_retention_days,
        "USAGE_PRUNE_INTERVAL": prune_interval(environ, "REGISTRY_USAGE_PRUNE_INTERVAL", usage_retention_days),
        "UI_SESSION_HOURS": read_number(environ, "REGISTRY_UI_SESSION_HOURS", 12.0, float),
        "LOG_FORMAT": environ.get("LOG_FORMAT", "").strip().lower() or "text",
        "SQLITE_SYNCHRONOUS": read_choice(environ, "REGISTRY_SQLITE_SYNCHRONOUS", ("NORMAL", "FULL")),
        "MAX_CONTENT_LENGTH": MAX_BODY_BYTES,
        # A SQLite file drops no connection; a ping would cost a query on every request. The
        # most recently used connection goes out first, with the warmest page cache.
        "SQLALCHEMY_ENGINE_OPTIONS": {"pool_pre_ping": not database_url.startswith("sqlite"), "pool_use_lifo": True},
        "APIFAIRY_TITLE": "Model Provider Registry",
        "APIFAIRY_VERSION": "1.0.0",
        "APIFAIRY_APISPEC_PATH": None,  # api/docs.py serves it, under the mount path
        "APIFAIRY_UI": "swagger_ui",
        "APIFAIRY_UI_PATH": "/docs",
    }


@functools.cache  # the migrations ship with the code: read once per process
def schema_head():
    return ScriptDirectory(MIGRATIONS_DIRECTORY).get_current_head()


def register_jobs(scheduler):
    """The background work, run by whichever process holds the scheduler's lease."""
    scheduler.add_job("probe", "PROBE_INTERVAL", probe_all)
    # At start too, with any interval: a location dropped from REGISTRY_MANIFESTS loses its providers.
    scheduler.add_job("manifest-sync", "SYNC_INTERVAL", sync_on_schedule, at_start=True)
    scheduler.add_job("audit-prune", "AUDIT_PRUNE_INTERVAL", audit.prune_old_events)
    scheduler.add_job("usage-prune", "USAGE_PRUNE_INTERVAL", prune_old_usage)


class Registry(Flask):
    """Flask, asking once per function whether it is a coroutine function.

    Flask and flask-httpauth pass every hook, view and auth callback through ensure_sync on
    every request (about fourteen times), and inspect's check costs more than most hooks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._runnable_of = {}

    def ensure_sync(self, func):
        runnable = self._runnable_of.get(func)
        if runnable is None:
            runnable = super().ensure_sync(func)
            if len(self._runnable_of) < ENSURE_SYNC_MEMORY:
                self._runnable_of[func] = runnable
        return runnable


def create_app(settings=None, environ=None):
    """Build the registry from `settings`, named as the environment variables it reads
    (`{"DATABASE_URL": ..., "REGISTRY_PROBE_INTERVAL": 0}`), over `environ` (os.environ
    unless given; tests give their own, so the runner's environment does not leak in)."""
    environ = settings_over(os.environ if environ is None else environ, settings)
    config = load_config(environ)
    app = Registry(__name__, instance_path=config.pop("INSTANCE_PATH"))
    app.config.update(config, SCHEMA_HEAD=schema_head())
    app.json.sort_keys = False
    if app.config["PROXY_HOPS"]:
        # The client's address (login limits, audit, logs) from X-Forwarded-For, that many proxies back.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=app.config["PROXY_HOPS"], x_proto=0, x_host=0, x_prefix=0)
    app.wsgi_app = RequestIds(app.wsgi_app)
    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)

    db.init_app(app)
    # At a request's end while its id is there for the log; at the end of other app contexts
    # (commands, jobs) too. Either runs before Flask-SQLAlchemy's own, which finds nothing left.
    app.teardown_request(end_connections)
    app.teardown_appcontext(end_connections)
    migrate.init_app(app, db, directory=MIGRATIONS_DIRECTORY, render_as_batch=True)
    ma.init_app(app)
    apifairy.init_app(app)
    cipher.init_app(app)
    init_auth(app)
    init_limits(app)
    init_metrics(app)
    cap_gateway_connections(app.config["GATEWAY_CALLS_PER_WORKER"])
    init_usage(app)

    app.register_blueprint(errors_bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(docs_bp)
    app.register_blueprint(providers_bp, url_prefix="/api/v1")
    app.register_blueprint(configurations_bp, url_prefix="/api/v1")
    app.register_blueprint(openai_bp, url_prefix="/api/v1")
    app.register_blueprint(anthropic_bp, url_prefix="/api/v1")
    app.register_blueprint(registry_bp, url_prefix="/api/v1")
    app.register_blueprint(tokens_bp, url_prefix="/api/v1")
    app.register_blueprint(audit_bp, url_prefix="/api/v1")
    app.register_blueprint(usage_bp, url_prefix="/api/v1")
    app.register_blueprint(ui_bp)
    register_commands(app)
    app.extensions["manifest_variables"] = ManifestVariables(environ, is_registry_setting)
    app.extensions["scheduler"] = Scheduler(app)
    register_jobs(app.extensions["scheduler"])

    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            prepare_sqlite(db.engine, app.config["SQLITE_SYNCHRONOUS"])
        elif not app.config["ENCRYPTION_KEYS"]:
            key_file = os.path.join(app.instance_path, KEY_FILE_NAME)
            log.warning(
                "REGISTRY_ENCRYPTION_KEYS is unset: every instance on this database needs the key in %s", key_file
            )
    return app
