"""Every error envelope the service answers, built in one place: the RFC 9457 problem
document, OpenAI's error body (the gateway's /api/v1/openai/ routes) and Anthropic's (its
/api/v1/anthropic/ routes); and the handlers that map each exception the app raises to one
of them."""

import logging

from apifairy.exceptions import ValidationError as RequestValidationError
from flask import Blueprint, current_app, has_request_context, json, request
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from access.crypto import UnopenableApiKey
from observability.logs import request_id_for
from storage.connections import cause_of, is_disk_full, is_unavailable
from upstreams import UpstreamError

errors_bp = Blueprint("errors", __name__)
log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
# The gateway's routes answer errors in OpenAI's or Anthropic's shape, so that each protocol's
# clients raise their usual exceptions.
OPENAI_PATH_PREFIX = "/api/v1/openai/"
ANTHROPIC_PATH_PREFIX = "/api/v1/anthropic/"
OPENAI_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    504: "timeout",
}
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}
KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")
# How soon a client may try again when the database does not answer: a restarting PostgreSQL
# or a failover takes seconds.
DATABASE_RETRY_SECONDS = 5
RFC_9110_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}
# gunicorn refuses these before the app sees the request; its own message can quote the raw
# request line or a header, so the detail is a fixed sentence per status instead.
REFUSAL_DETAILS = {
    400: "The request is not valid HTTP/1.1.",
    414: "The request line (method, path and query) is over {limit_request_line} bytes.",
    431: "A request header is over {limit_request_field_size} bytes, or there are over {limit_request_fields}.",
    404: "The path is not under SCRIPT_NAME, the path this registry is served under.",
}
# gunicorn answers a path outside SCRIPT_NAME (a reverse proxy's path) with 500, its reason
# still "Bad Request": the one request error it counts so. For the client it is a 404.
OUTSIDE_SCRIPT_NAME = (500, "Bad Request")

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem document",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "object",
            "description": "Messages per field (dotted path; _schema for whole-body rules)",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
}
OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "description": "OpenAI's error shape, answered under /api/v1/openai/ so OpenAI clients raise their usual errors",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}


ANTHROPIC_ERROR_SCHEMA = {
    "type": "object",
    "description": "Anthropic's error shape, answered under /api/v1/anthropic/ so its clients raise their usual errors",
    "required": ["type", "error"],
    "properties": {
        "type": {"type": "string", "enum": ["error"]},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


class GatewayError(Exception):
    """A gateway call that cannot be answered with a model's answer, in OpenAI's terms."""

    def __init__(self, status, message, code=None, param=None, error_type=None, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.error_type = error_type
        self.headers = headers or {}


class LimitExceeded(GatewayError):
    """A gateway call refused by a limit before any provider was called: 429 for the caller's
    own limits, 503 when the worker has no room for another call; `limit` names the limit."""

    def __init__(self, status, message, limit, retry_after, error_type=None):
        code = "rate_limit_exceeded" if status == 429 else None
        super().__init__(status, message, code=code, error_type=error_type, headers={"Retry-After": str(retry_after)})
        self.limit = limit


class SyncInProgress(Exception):
    """Another process holds the manifest sync lease and did not finish in time."""


def problem_document(status, detail, errors=None):
    """RFC 9457: {"type", "title", "status", "detail"}, and "errors" per field when given."""
    document = {
        "type": "about:blank",
        "title": RFC_9110_TITLES.get(status) or HTTP_STATUS_CODES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        document["errors"] = errors
    return document


def openai_error_document(status, message, code=None, param=None, error_type=None):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    if error_type is None:
        error_type = OPENAI_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def anthropic_error_document(status, message):
    """Anthropic's error body: {"type": "error", "error": {"type", "message"}}."""
    error_type = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def json_answer(document, status, headers=None):
    return current_app.response_class(json.dumps(document), status=status, mimetype="application/json", headers=headers)


def openai_error(status, message, code=None, param=None, error_type=None, headers=None):
    return json_answer(openai_error_document(status, message, code, param, error_type), status, headers)


def anthropic_error(status, message, headers=None):
    return json_answer(anthropic_error_document(status, message), status, headers)


def first_field_error(detail, errors):
    """(the field, the detail naming it): a body that fails validation is a 400 about its
    first field, as OpenAI and Anthropic answer it."""
    field, messages = next(iter(errors.items()))
    return field, f"{detail} {field}: {' '.join(messages)}"


def openai_problem(status, detail, errors=None, headers=None):
    """A problem under /api/v1/openai/ in OpenAI's shape."""
    if errors:
        field, detail = first_field_error(detail, errors)
        return openai_error(400, detail, param=field, headers=headers)
    return openai_error(status, detail, headers=headers)


def anthropic_problem(status, detail, errors=None, headers=None):
    """A problem under /api/v1/anthropic/ in Anthropic's shape."""
    if errors:
        return anthropic_error(400, first_field_error(detail, errors)[1], headers=headers)
    return anthropic_error(status, detail, headers=headers)


# The gateway's prefixes, each answering problems in its protocol's shape.
GATEWAY_PROBLEMS = {OPENAI_PATH_PREFIX: openai_problem, ANTHROPIC_PATH_PREFIX: anthropic_problem}


def gateway_prefix():
    """The gateway prefix the request's path is under, or None."""
    if not has_request_context():
        return None
    return next((prefix for prefix in GATEWAY_PROBLEMS if request.path.startswith(prefix)), None)


def problem(status, detail, errors=None, headers=None):
    prefix = gateway_prefix()
    if prefix:
        return GATEWAY_PROBLEMS[prefix](status, detail, errors, headers)
    document = problem_document(status, detail, errors)
    return current_app.response_class(json.dumps(document), status=status, mimetype=PROBLEM_MEDIA_TYPE, headers=headers)


def refusal_answer(status, reason, limits):
    """The whole HTTP answer to a request gunicorn refused before the app saw it: a problem
    document, the connection closed. `limits` is gunicorn's configuration (its request limits)."""
    if (status, reason) == OUTSIDE_SCRIPT_NAME:
        status, reason = 404, "Not Found"
    detail = REFUSAL_DETAILS.get(status, "{reason}.").format(
        reason=reason,
        limit_request_line=limits.limit_request_line,
        limit_request_field_size=limits.limit_request_field_size,
        limit_request_fields=limits.limit_request_fields,
    )
    body = json.dumps(problem_document(status, detail))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: {PROBLEM_MEDIA_TYPE}\r\n"
        f"X-Request-ID: {request_id_for(None)}\r\n"  # the request was not read far enough for the client's
    )
    return f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode("latin-1")


def flatten_messages(messages, prefix=""):
    """marshmallow's nested messages as {"dotted.path": [message, ...]}."""
    if isinstance(messages, list):
        return {prefix or "_schema": [str(message) for message in messages]}
    flat = {}
    for key, value in messages.items():
        flat.update(flatten_messages(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def validation_problem(messages, detail):
    return problem(422, detail, errors=flatten_messages(messages))


@errors_bp.app_errorhandler(RequestValidationError)
def request_validation_error(error):
    # webargs keys messages by location: {"json": {...}} or {"query": {...}}
    location, messages = next(iter(error.messages.items()), ("json", {}))
    detail = "Request body is invalid." if location == "json" else "Query parameters are invalid."
    return validation_problem(messages, detail)


@errors_bp.app_errorhandler(ValidationError)
def domain_validation_error(error):
    return validation_problem(error.messages, "Request body is invalid.")


@errors_bp.app_errorhandler(HTTPException)
def http_error(error):
    kept = {name: value for name, value in error.get_headers() if name in KEPT_HEADERS}
    return problem(error.code, error.description, headers=kept)


@errors_bp.app_errorhandler(UpstreamError)
def upstream_error(error):
    return problem(502, f"Upstream provider failed: {error}")


@errors_bp.app_errorhandler(GatewayError)
def gateway_error(error):
    if gateway_prefix() == ANTHROPIC_PATH_PREFIX:
        return anthropic_error(error.status, str(error), error.headers)
    return openai_error(error.status, str(error), error.code, error.param, error.error_type, error.headers)


@errors_bp.app_errorhandler(SyncInProgress)
def sync_in_progress(error):
    return problem(409, str(error), headers={"Retry-After": "5"})


@errors_bp.app_errorhandler(IntegrityError)
def conflicting_write(error):
    return problem(409, "The change conflicts with another request's change; read the resource again and retry.")


@errors_bp.app_errorhandler(DBAPIError)
def database_error(error):
    """A full disk is a 507 (the write was refused, reads go on); a database that cannot be
    reached or used now, a 503 with Retry-After; any other database error is unexpected."""
    if is_disk_full(error):
        log.error("the database's disk is full: %s %s wrote nothing", request.method, request.path)
        return problem(507, "The database's disk is full; nothing was written.")
    if not is_unavailable(error):
        return unexpected_error(error)
    log.error("database error on %s %s: %s", request.method, request.path, cause_of(error))
    return problem(
        503,
        "The database is not available; try again shortly.",
        headers={"Retry-After": str(DATABASE_RETRY_SECONDS)},
    )


@errors_bp.app_errorhandler(PoolTimeout)
def no_free_connection(error):
    # A gevent worker takes many requests at once; past the pool's size they queue for a connection.
    log.error("no database connection came free in time on %s %s", request.method, request.path)
    return problem(
        503, "The service is too busy to reach its database; try again shortly.", headers={"Retry-After": "1"}
    )


@errors_bp.app_errorhandler(UnopenableApiKey)
def unopenable_api_key(error):
    log.error("%s on %s %s: restore the missing key to REGISTRY_ENCRYPTION_KEYS", error, request.method, request.path)
    return problem(
        503, "A stored API key cannot be opened with the configured encryption keys; the operator must restore the key."
    )


@errors_bp.app_errorhandler(Exception)
def unexpected_error(error):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return problem(500, "The server met an unexpected error; it has been logged.")
