"""Every error the service answers, as an RFC 9457 problem document, in one place."""

import logging

from apifairy.exceptions import ValidationError as RequestValidationError
from flask import Blueprint, current_app, has_request_context, json, request
from marshmallow import ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from access.crypto import UnopenableApiKey
from upstreams import UpstreamError

errors_bp = Blueprint("errors", __name__)
log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
# The gateway's routes answer errors in OpenAI's shape, so OpenAI clients raise their usual exceptions.
OPENAI_PATH_PREFIX = "/api/v1/openai/"
OPENAI_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    504: "timeout",
}
KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")
RFC_9110_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


class GatewayError(Exception):
    """A gateway call that cannot be answered with a model's answer, in OpenAI's terms."""

    def __init__(self, status, message, code=None, param=None, error_type=None, headers=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.error_type = error_type
        self.headers = headers or {}


class SyncInProgress(Exception):
    """Another process holds the manifest sync lease and did not finish in time."""


def openai_error(status, message, code=None, param=None, error_type=None, headers=None):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    if error_type is None:
        error_type = OPENAI_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    document = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return current_app.response_class(json.dumps(document), status=status, mimetype="application/json", headers=headers)


def openai_problem(status, detail, errors=None, headers=None):
    """A problem under /api/v1/openai/ in OpenAI's shape; a body that fails validation is a 400
    naming the first field, as OpenAI answers it."""
    if errors:
        field, messages = next(iter(errors.items()))
        detail = f"{detail} {field}: {' '.join(messages)}"
        return openai_error(400, detail, param=field, headers=headers)
    return openai_error(status, detail, headers=headers)


def problem(status, detail, errors=None, headers=None):
    if has_request_context() and request.path.startswith(OPENAI_PATH_PREFIX):
        return openai_problem(status, detail, errors, headers)
    document = {
        "type": "about:blank",
        "title": RFC_9110_TITLES.get(status) or HTTP_STATUS_CODES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        document["errors"] = errors
    return current_app.response_class(json.dumps(document), status=status, mimetype=PROBLEM_MEDIA_TYPE, headers=headers)


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
    return openai_error(error.status, str(error), error.code, error.param, error.error_type, error.headers)


@errors_bp.app_errorhandler(SyncInProgress)
def sync_in_progress(error):
    return problem(409, str(error), headers={"Retry-After": "5"})


@errors_bp.app_errorhandler(IntegrityError)
def conflicting_write(error):
    return problem(409, "The change conflicts with another request's change; read the resource again and retry.")


@errors_bp.app_errorhandler(OperationalError)
def database_unavailable(error):
    log.error("database error on %s %s: %s", request.method, request.path, error.orig)
    return problem(503, "The database is not available; try again shortly.")


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
