"""What crosses HTTP (and manifests): marshmallow schemas for loading and dumping."""

import json
import operator
from functools import cached_property, wraps

from apifairy import body
from flask import request
from flask_marshmallow import Marshmallow
from marshmallow import ValidationError, fields, validates_schema
from marshmallow.validate import Length, OneOf, Range
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from models import CAPABILITIES, PROVIDER_TYPES, STATES, normalize_base_url

ma = Marshmallow()

BASE_URL_MAX_LENGTH = 2083
API_KEY_MAX_LENGTH = 8192
WATSONX_ID_FIELDS = ("watsonx_project_id", "watsonx_space_id")


def read_body():
    """The body; one sent without Content-Length (chunked) that runs past the limit is a 413."""
    body = request.get_data(cache=True)
    if len(body) == request.max_content_length and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return body


def read_json_object():
    """The request body as a JSON object, or the 415 or 400 that says why it is not."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("Send the body as application/json.")
    try:
        document = json.loads(read_body())
    except (ValueError, RecursionError):
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise BadRequest("The body must be a JSON object.")
    return document


def json_body(schema_class):
    """apifairy's @body behind a gate that turns non-JSON bodies into 415 or 400, not 422."""

    def decorator(handler):
        validated = body(schema_class())(handler)

        @wraps(validated)
        def gated(*args, **kwargs):
            read_json_object()
            return validated(*args, **kwargs)

        return gated

    return decorator


class Timestamp(fields.DateTime):
    """RFC 3339 in UTC with a Z suffix; the database holds naive UTC."""

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else value.isoformat(timespec="microseconds") + "Z"


class BaseURL(fields.String):
    """An absolute http(s) URL, 1 to 2083 characters as sent, loaded in normalized form."""

    def __init__(self, metadata=None, **kwargs):
        limits = {
            "format": "uri",
            "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://",
            "minLength": 1,
            "maxLength": BASE_URL_MAX_LENGTH,
        }
        super().__init__(metadata={**limits, **(metadata or {})}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        url = super()._deserialize(value, attr, data, **kwargs)
        if not 1 <= len(url) <= BASE_URL_MAX_LENGTH:
            raise ValidationError(f"Length must be between 1 and {BASE_URL_MAX_LENGTH}.")
        try:
            return normalize_base_url(url)
        except ValueError as error:
            raise ValidationError(f"Not a valid URL: {error}") from None


def optional_text(max_length, description):
    return fields.String(allow_none=True, validate=Length(max=max_length), metadata={"description": description})


def watsonx_id(description):
    return fields.String(allow_none=True, validate=Length(min=1, max=1024), metadata={"description": description})


def watsonx_id_errors(provider_type, project_id, space_id):
    """The watsonx rule: exactly one of the two ids for watsonx, neither for other types."""
    if provider_type == "watsonx":
        if (project_id is None) == (space_id is None):
            return {"_schema": ["A watsonx provider needs exactly one of watsonx_project_id and watsonx_space_id."]}
        return {}
    return {
        field: [f"Only a watsonx provider takes {field}."]
        for field, value in zip(WATSONX_ID_FIELDS, (project_id, space_id), strict=True)
        if value is not None
    }


NOT_A_STRING = {"not": {"type": "string"}}
# The same rule for a create body as JSON schema, for the OpenAPI document (docs.py).
WATSONX_RULE_OF_CREATE = [
    {
        "description": "Any type but watsonx: no watsonx ids",
        "properties": {
            "type": {"not": {"enum": ["watsonx"]}},
            "watsonx_project_id": NOT_A_STRING,
            "watsonx_space_id": NOT_A_STRING,
        },
    },
    *(
        {
            "description": f"watsonx with {field}",
            "required": [field],
            "properties": {"type": {"enum": ["watsonx"]}, field: {"type": "string"}, other_field: NOT_A_STRING},
        }
        for field, other_field in (WATSONX_ID_FIELDS, WATSONX_ID_FIELDS[::-1])
    ),
]


class ProviderChangesSchema(ma.Schema):
    """PATCH body: any subset of the writable fields."""

    base_url = BaseURL(metadata={"description": "Base URL for the API (unique)"})
    api_key = fields.String(
        validate=Length(max=API_KEY_MAX_LENGTH),
        load_only=True,
        metadata={"description": "Write-only; may be empty for keyless local servers"},
    )
    name = optional_text(1024, "Human-readable name for the model provider")
    description = optional_text(4096, "Optional description of the provider")
    watsonx_project_id = watsonx_id("watsonx only: the project to bill")
    watsonx_space_id = watsonx_id("watsonx only: the deployment space")


class ProviderCreateSchema(ProviderChangesSchema):
    type = fields.String(
        required=True, validate=OneOf(PROVIDER_TYPES), metadata={"description": "Type of model provider"}
    )
    base_url = BaseURL(required=True, metadata={"description": "Base URL for the API (unique)"})
    api_key = fields.String(
        required=True,
        validate=Length(max=API_KEY_MAX_LENGTH),
        load_only=True,
        metadata={"description": "Write-only; may be empty for keyless local servers"},
    )

    @validates_schema
    def check_watsonx_ids(self, provider, **kwargs):
        errors = watsonx_id_errors(
            provider.get("type"), provider.get("watsonx_project_id"), provider.get("watsonx_space_id")
        )
        if errors:
            raise ValidationError(errors)


PLAIN_FIELDS = (fields.String, fields.Integer, fields.Boolean)


def is_plain(field):
    """A field whose value the models already hold in JSON form."""
    return type(field) in PLAIN_FIELDS or (type(field) is fields.List and is_plain(field.inner))


def field_reader(name, field):
    """A function of an object giving the field's dumped value."""
    read = operator.attrgetter(field.attribute or name)
    if is_plain(field):
        return read
    return lambda obj: field._serialize(read(obj), name, obj)


class DirectDumpSchema(ma.Schema):
    """Dumps objects reading each attribute directly, plain fields as they are.

    marshmallow's general path (dotted names, dicts, defaults for missing attributes) took
    half the time of a page of 50 providers; the objects dumped here have every attribute.
    """

    def _serialize(self, obj, *, many=False):
        if many and obj is not None:
            return [self._serialize(item) for item in obj]
        return {key: read(obj) for key, read in self._readers}

    @cached_property
    def _readers(self):
        return [(field.data_key or name, field_reader(name, field)) for name, field in self.dump_fields.items()]


class ProviderSchema(DirectDumpSchema):
    id = fields.String(required=True, metadata={"format": "uuid"})
    type = fields.String(
        required=True, validate=OneOf(PROVIDER_TYPES), metadata={"description": "Type of model provider"}
    )
    base_url = fields.String(required=True, metadata={"format": "uri", "description": "Base URL for the API (unique)"})
    capabilities = fields.List(fields.String(validate=OneOf(CAPABILITIES)), required=True)
    name = fields.String(allow_none=True, metadata={"description": "Human-readable name for the model provider"})
    description = fields.String(allow_none=True, metadata={"description": "Optional description of the provider"})
    created_at = Timestamp(required=True)
    registry = fields.String(
        attribute="manifest",
        allow_none=True,
        metadata={"format": "uri", "description": "Manifest this provider comes from"},
    )
    state = fields.String(required=True, validate=OneOf(STATES))
    watsonx_project_id = fields.String(allow_none=True)
    watsonx_space_id = fields.String(allow_none=True)
    updated_at = Timestamp(required=True)
    last_checked_at = Timestamp(allow_none=True, metadata={"description": "Last health probe"})
    last_error = fields.String(allow_none=True, metadata={"description": "Error of the last failed probe"})


class ProvidersQuerySchema(ma.Schema):
    type = fields.String(validate=OneOf(PROVIDER_TYPES))
    capability = fields.String(validate=OneOf(CAPABILITIES))
    state = fields.String(validate=OneOf(STATES))
    registry = fields.String(metadata={"description": "Manifest location the providers come from"})
    limit = fields.Integer(load_default=100, validate=Range(1, 1000))
    page_token = fields.String(metadata={"description": "Opaque token from the previous page"})


class ProvidersPageSchema(ma.Schema):
    items = fields.List(fields.Nested(ProviderSchema), required=True)
    total_count = fields.Integer(required=True)
    has_more = fields.Boolean(required=True)
    next_page_token = fields.String(allow_none=True, required=True)


class LocationHeaderSchema(ma.Schema):
    Location = fields.String(metadata={"description": "URL of the new resource"})


class StatusSchema(ma.Schema):
    status = fields.String(required=True)
