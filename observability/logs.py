"""Request ids and log lines: every line escaped, as text (the default) or one JSON object.

A request's id is chosen by the WSGI middleware RequestIds before Flask sees the request
and kept in the WSGI environ, where the app's log lines (RequestFields) and gunicorn's
access line (AccessLogger) both find it, as they find the authenticated user's name.
"""

import json
import logging
import re
import secrets
from datetime import UTC, datetime

from flask import has_request_context, request
from gunicorn import glogging

REQUEST_ID_KEY = "registry.request_id"
USER_KEY = "registry.user"
TOKEN_ID_KEY = "registry.token_id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
LOG_FORMATS = ("text", "json")

# Control characters (C0, DEL, C1), the Unicode line and paragraph separators, and the
# backslash that starts an escape, so a logged "\x0a" cannot pass for an escaped newline.
UNSAFE_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]")


def escape_character(match):
    character = match.group()
    if character == "\\":
        return "\\\\"
    return f"\\x{ord(character):02x}" if ord(character) < 0x100 else f"\\u{ord(character):04x}"


def escape(text):
    """`text` on one line, without characters a terminal or a log reader would act on."""
    return UNSAFE_CHARACTERS.sub(escape_character, text)


def request_id_for(sent):
    """The client's X-Request-ID when it is sane, else a new one: 128 random bits in 32 hex digits."""
    return sent if sent is not None and SANE_REQUEST_ID.fullmatch(sent) else secrets.token_hex(16)


class RequestIds:
    """WSGI middleware: every request gets an id, and every response carries it as X-Request-ID."""

    def __init__(self, wsgi_app):
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        request_id = environ[REQUEST_ID_KEY] = request_id_for(environ.get("HTTP_X_REQUEST_ID"))

        def start_with_request_id(status, headers, exc_info=None):
            headers[:] = [(name, value) for name, value in headers if name.lower() != "x-request-id"]
            headers.append(("X-Request-ID", request_id))
            return start_response(status, headers, exc_info)

        return self.wsgi_app(environ, start_with_request_id)


def remember_user(username, token_id=None):
    """Name the authenticated user (and the API token used) in the request's log lines and audit events."""
    environ = request.environ  # read once: each access through Flask's proxy costs about a microsecond
    environ[USER_KEY] = username
    environ[TOKEN_ID_KEY] = token_id


class RequestFields(logging.Filter):
    """Adds `request_id` and `user` to every record: the request's when one is being served."""

    def filter(self, record):
        if not hasattr(record, "request_id"):
            environ = request.environ if has_request_context() else {}
            record.request_id = environ.get(REQUEST_ID_KEY, "-")
            record.user = environ.get(USER_KEY, "-")
        return True


def path_as_sent(environ):
    """The path decoded as UTF-8 where it is (WSGI hands it over as Latin-1)."""
    path = environ.get("PATH_INFO", "")
    try:
        return path.encode("latin-1").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path


class AccessLogger(glogging.Logger):
    """gunicorn's logger; its access records are escaped and carry the request's fields.

    Every text value of the access line (path, headers, ...) is escaped before gunicorn
    quotes it, so the line stays one line whatever the access_log_format; `fields` holds
    the same values by name for JSON lines.
    """

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        atoms.update(
            U=path_as_sent(environ), request_id=environ.get(REQUEST_ID_KEY, "-"), user=environ.get(USER_KEY, "-")
        )
        atoms = {name: escape(value) if isinstance(value, str) else value for name, value in atoms.items()}
        atoms["fields"] = {
            "request_id": atoms["request_id"],
            "method": atoms["m"],
            "path": atoms["U"],
            "status": int(atoms["s"]) if str(atoms["s"]).isdigit() else atoms["s"],
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "user": atoms["user"],
            "remote_address": atoms["h"],
            "bytes": atoms["B"],
        }
        return atoms


ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms request_id=%(request_id)s user=%(user)s'


class TextFormatter(logging.Formatter):
    """gunicorn's line with the request id; the message escaped, a traceback indented under it."""

    def __init__(self):
        super().__init__(
            "%(asctime)s [%(process)d] [%(levelname)s] [%(request_id)s] %(message)s", "[%Y-%m-%d %H:%M:%S %z]"
        )

    def formatMessage(self, record):
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, exc_info):
        # Every line of a traceback starts with spaces, so none can pass for a record of its own.
        lines = super().formatException(exc_info).splitlines()
        return "\n".join(f"    {escape(line)}" for line in lines)

    def formatStack(self, stack_info):
        return "\n".join(f"    {escape(line)}" for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record (JSON's escaping keeps it on one line)."""

    def format(self, record):
        line = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(record.getMessage()),
            "process": record.process,
        }
        if record.name == "gunicorn.access" and isinstance(record.args, dict):
            line.update(record.args["fields"])
        else:
            line.update(request_id=getattr(record, "request_id", "-"), user=getattr(record, "user", "-"))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def logging_config(log_format):
    """gunicorn's logconfig_dict (and the flask command's): records on stderr, access lines on stdout."""
    if log_format not in LOG_FORMATS:
        raise RuntimeError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}.")
    json_lines = log_format == "json"
    formatters = {
        "records": {"()": JsonFormatter if json_lines else TextFormatter},
        # The access line's values are escaped by AccessLogger, before gunicorn quotes them.
        "access": {"()": JsonFormatter} if json_lines else {"format": "%(message)s"},
    }
    handlers = {
        "error_console": {
            "class": "logging.StreamHandler",
            "formatter": "records",
            "filters": ["request_fields"],
            "stream": "ext://sys.stderr",
        },
        "console": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stdout"},
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_fields": {"()": RequestFields}},
        "formatters": formatters,
        "handlers": handlers,
        "root": {"level": "INFO", "handlers": ["error_console"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
            # Its plugin registrations at import, on every worker start, say nothing to an operator.
            "alembic": {"level": "WARNING"},
            # Its INFO line quotes each URL it requests: a manifest URL's query may be a presigned signature.
            "httpx": {"level": "WARNING"},
        },
    }


def command_logging_config(log_format):
    """logging_config for the `flask` command, which also tells the migrations it applies."""
    config = logging_config(log_format)
    config["loggers"]["alembic.runtime.migration"] = {"level": "INFO"}
    return config
