"""What crosses HTTP (and manifests): marshmallow schemas for loading and dumping."""

import json
import math
import operator
from collections.abc import Mapping
from datetime import UTC
from functools import cached_property, partial

from apifairy.decorators import parser as request_parser
from flask import request
from flask_marshmallow import Marshmallow
from marshmallow import INCLUDE, ValidationError, fields, post_load, validates_schema
from marshmallow.validate import Length, OneOf, Range
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from models import (
    CAPABILITIES,
    PROVIDER_TYPES,
    ROLES,
    STATES,
    ModelRef,
    is_printable,
    is_storable_text,
    normalize_base_url,
)

ma = Marshmallow()

BASE_URL_MAX_LENGTH = 2083
API_KEY_MAX_LENGTH = 8192
WATSONX_ID_FIELDS = ("watsonx_project_id", "watsonx_space_id")
MAX_TOKEN_DAYS = 3650
MAX_LIMIT = 2**31 - 1  # the columns are 32-bit integers


def read_body():
    """The body; one sent without Content-Length (chunked) that runs past the limit is a 413."""
    body = request.get_data(cache=True)
    if len(body) == request.max_content_length and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return body


class NotAFiniteNumber(ValueError):
    """NaN, Infinity, -Infinity or a number past a double's range (1e999): Python's json reads
    them, but no JSON encoder writes them back (an upstream call would fail on them)."""


def refuse_number(text):
    raise NotAFiniteNumber(f"The body is not valid JSON: {text} is not a finite number.")


def finite_float(text):
    number = float(text)
    return number if math.isfinite(number) else refuse_number(text)


def read_json_object():
    """The request body as a JSON object, or the 415 or 400 that says why it is not."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("Send the body as application/json.")
    try:
        document = json.loads(read_body(), parse_constant=refuse_number, parse_float=finite_float)
    except NotAFiniteNumber as error:
        raise BadRequest(str(error)) from None
    except (ValueError, RecursionError):
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise BadRequest("The body must be a JSON object.")
    return document


@request_parser.location_loader("json")
def load_json_body(req, schema):
    """What apifairy's @body validates: parsed once, and a body that is not a JSON object
    is a 415 or 400 before the schema could call it a 422."""
    return read_json_object()


class Timestamp(fields.DateTime):
    """RFC 3339 in UTC with a Z suffix; the database holds naive UTC."""

    @staticmethod
    def text_of(value):
        return None if value is None else value.isoformat(timespec="microseconds") + "Z"

    def _serialize(self, value, attr, obj, **kwargs):
        return self.text_of(value)


class UtcTimestamp(fields.AwareDateTime):
    """An RFC 3339 time (UTC when it names no offset), loaded as the naive UTC the database holds."""

    def __init__(self, **kwargs):
        super().__init__(default_timezone=UTC, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the first representable UTC time
            raise ValidationError("Not a representable time in UTC.") from None


def collection(item_schema, paged=False):
    """The schema of a list answer, `{items, total_count}`, with `has_more` and
    `next_page_token` when `paged`; named after its items (ProviderPage, ModelList)."""
    envelope = {
        "items": fields.List(fields.Nested(item_schema), required=True),
        "total_count": fields.Integer(required=True),
    }
    if paged:
        envelope["has_more"] = fields.Boolean(required=True)
        envelope["next_page_token"] = fields.String(allow_none=True, required=True)
    item_name = item_schema.__name__.removesuffix("Schema")
    return ma.Schema.from_dict(envelope, name=f"{item_name}{'Page' if paged else 'List'}Schema")


class Text(fields.String):
    """A string the database can store; a NUL character is a 422 here, not a 500 there."""

    pattern = "^[^\\u0000]*$"

    def __init__(self, metadata=None, **kwargs):
        super().__init__(metadata={"pattern": self.pattern, **(metadata or {})}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if not is_storable_text(text):
            raise ValidationError("Must be text without NUL characters or unpaired surrogates.")
        return text


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
            normalized = normalize_base_url(url)
        except ValueError as error:
            raise ValidationError(f"Not a valid URL: {error}") from None
        if len(normalized) > BASE_URL_MAX_LENGTH:  # a short IPv4 form grows: 1.1 is 1.0.0.1
            raise ValidationError(f"Normalized, it is {len(normalized)} characters, over {BASE_URL_MAX_LENGTH}.")
        return normalized


def optional_text(max_length, description):
    return Text(allow_none=True, validate=Length(max=max_length), metadata={"description": description})


def watsonx_id(description):
    return Text(allow_none=True, validate=Length(min=1, max=1024), metadata={"description": description})


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
    api_key = Text(
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
    api_key = Text(
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
    """A field whose value the objects dumped already hold in JSON form."""
    return type(field) in PLAIN_FIELDS or (type(field) is fields.List and is_plain(field.inner))


def field_reader(name, field, getter):
    """A function of an object giving the field's dumped value; `getter` makes the raw reader."""
    read = getter(field.attribute or name)
    if type(field) is Timestamp:
        return lambda obj: Timestamp.text_of(read(obj))
    if is_plain(field):
        return read
    return partial(field.serialize, name)


class DirectDumpSchema(ma.Schema):
    """Dumps objects (such as models.Provider) or mappings that hold every value by reading
    each one directly, plain fields as they are.

    marshmallow's general path (dotted names, defaults for missing values, hooks) took half
    the time of a page of 50 providers. So `dump`, the public method apifairy calls,
    reads the fields itself; a schema built on this declares no pre- or post-dump hooks.
    """

    def dump(self, obj, *, many=None):
        if self.many if many is None else many:
            return [self.dump(item, many=False) for item in obj]
        readers = self._item_readers if isinstance(obj, Mapping) else self._attribute_readers
        return {key: read(obj) for key, read in readers}

    def _readers(self, getter):
        return [(field.data_key or name, field_reader(name, field, getter)) for name, field in self.dump_fields.items()]

    @cached_property
    def _attribute_readers(self):
        return self._readers(operator.attrgetter)

    @cached_property
    def _item_readers(self):
        return self._readers(operator.itemgetter)


class ProviderSchema(DirectDumpSchema):
    id = fields.String(required=True, metadata={"format": "uuid"})
    type = fields.String(
        required=True, validate=OneOf(PROVIDER_TYPES), metadata={"description": "Type of model provider"}
    )
    base_url = fields.String(required=True, metadata={"format": "uri", "description": "Base URL for the API (unique)"})
    capabilities = fields.List(
        fields.String(validate=OneOf(CAPABILITIES)),
        required=True,
        dump_only=True,
        metadata={"description": "Decided by the type"},
    )
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


class PageQuerySchema(ma.Schema):
    """What every paged list takes besides its filters."""

    limit = fields.Integer(load_default=100, validate=Range(1, 1000))
    page_token = fields.String(metadata={"description": "Opaque token from the previous page"})


class ProvidersQuerySchema(PageQuerySchema):
    type = fields.String(validate=OneOf(PROVIDER_TYPES))
    capability = fields.String(validate=OneOf(CAPABILITIES))
    state = fields.String(validate=OneOf(STATES))
    registry = Text(metadata={"description": "Manifest location the providers come from"})


class AuditEventSchema(DirectDumpSchema):
    id = fields.String(required=True, metadata={"format": "uuid"})
    time = Timestamp(attribute="created_at", required=True)
    user = fields.String(
        attribute="actor",
        required=True,
        metadata={"description": "Who made the change: a user name, cli:<operating system user>, or system"},
    )
    token_id = fields.String(allow_none=True, metadata={"description": "The API token used, if any"})
    client_address = fields.String(allow_none=True)
    request_id = fields.String(allow_none=True, metadata={"description": "X-Request-ID of the request that made it"})
    action = fields.String(required=True, metadata={"description": "For example provider.update"})
    target_id = fields.String(
        allow_none=True, metadata={"description": "Provider id, user name, manifest location or configuration id"}
    )
    changed_fields = fields.List(
        fields.String(), required=True, metadata={"description": "Names of the fields changed, never their values"}
    )
    detail = fields.String(allow_none=True)


class AuditQuerySchema(PageQuerySchema):
    action = Text()
    user = Text()
    target_id = Text()
    since = UtcTimestamp(metadata={"description": "Only events at or after this time (RFC 3339)"})


class ProviderHeadersSchema(ma.Schema):
    etag = fields.String(
        data_key="ETag",
        required=True,
        metadata={"description": "Changes with every change of the provider as shown; send it back in If-Match"},
    )


class CreatedProviderHeadersSchema(ProviderHeadersSchema):
    location = fields.String(data_key="Location", required=True, metadata={"description": "URL of the new resource"})


class PreconditionsSchema(ma.Schema):
    if_match = fields.String(
        data_key="If-Match",
        metadata={"description": 'ETags of the provider as last read, or "*" for any; 412 when none is current'},
    )


class StatusSchema(ma.Schema):
    status = fields.String(required=True)


class ModelRefField(Text):
    """A model as "{type}:{upstream model id}", e.g. "openai:gpt-4o", loaded as a ModelRef."""

    pattern = f"^({'|'.join(PROVIDER_TYPES)}):[^\\u0000]+$"
    max_length = 2048

    def __init__(self, metadata=None, **kwargs):
        super().__init__(metadata={"maxLength": self.max_length, **(metadata or {})}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > self.max_length:
            raise ValidationError(f"Longer than maximum length {self.max_length}.")
        try:
            return ModelRef.parse(text)
        except ValueError as error:
            raise ValidationError(str(error)) from None

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else str(value)


class VerifyQuerySchema(ma.Schema):
    verify = fields.Boolean(
        load_default=True,
        metadata={"description": "List the upstream's models with the key before storing (unless disabled)"},
    )


class ProviderRefSchema(ma.Schema):
    id = fields.String(required=True, metadata={"format": "uuid"})
    type = fields.String(required=True, validate=OneOf(PROVIDER_TYPES))
    capabilities = fields.List(fields.String(validate=OneOf(CAPABILITIES)), required=True)


class ModelSchema(ma.Schema):
    id = fields.String(required=True, metadata={"description": '"{type}:{upstream model id}"'})
    object = fields.String(required=True, validate=OneOf(["model"]))
    created = fields.Integer(required=True, metadata={"description": "Unix seconds (0 when the upstream tells none)"})
    owned_by = fields.String(required=True)
    display_name = fields.String(allow_none=True)
    provider = fields.Nested(ProviderRefSchema, required=True)


class ModelsQuerySchema(ma.Schema):
    refresh = fields.Boolean(
        load_default=False,
        metadata={"description": "Admin only: list the upstream now and store its answer before answering"},
    )


class ModelsPageSchema(ma.Schema):
    items = fields.List(fields.Nested(ModelSchema), required=True)
    total_count = fields.Integer(required=True)
    listed_at = Timestamp(
        allow_none=True, required=True, metadata={"description": "When the list was stored; null before the first"}
    )


class OpenAIModelListSchema(ma.Schema):
    object = fields.String(required=True, validate=OneOf(["list"]))
    data = fields.List(fields.Nested(ModelSchema), required=True)


class MatchRequestSchema(ma.Schema):
    capability = fields.String(required=True, validate=OneOf(CAPABILITIES))
    suggested_models = fields.List(
        fields.String(validate=Length(max=256)),
        allow_none=True,
        load_default=None,
        validate=Length(max=100),
        metadata={"description": "At most 100 model names of at most 256 characters; null or absent: none"},
    )
    score_cutoff = fields.Float(load_default=0.4, validate=Range(0, 1))

    @post_load
    def no_suggestions_for_null(self, request_fields, **kwargs):
        return {**request_fields, "suggested_models": request_fields["suggested_models"] or []}


class MatchResultSchema(ma.Schema):
    model_id = fields.String(required=True)
    score = fields.Float(required=True)


class ResolveRequestSchema(ma.Schema):
    model = ModelRefField(required=True)


class ResolvedProviderSchema(ma.Schema):
    provider_id = fields.String(required=True, metadata={"format": "uuid"})
    type = fields.String(required=True)
    base_url = fields.String(required=True)
    model = fields.String(required=True, metadata={"description": "The upstream's own model id"})
    api_key = fields.String(required=True)
    watsonx_project_id = fields.String(allow_none=True)
    watsonx_space_id = fields.String(allow_none=True)


def model_ref_field(capability):
    return ModelRefField(
        allow_none=True,
        load_default=None,
        metadata={"description": f"Default {capability} model; null or absent clears it"},
    )


class SystemConfigurationChangesSchema(ma.Schema):
    default_llm_model = model_ref_field("LLM")
    default_embedding_model = model_ref_field("embedding")


class SystemConfigurationSchema(SystemConfigurationChangesSchema):
    id = fields.String(required=True, metadata={"format": "uuid"})
    updated_at = Timestamp(required=True, allow_none=True, metadata={"description": "null before the first PUT"})
    created_by = fields.String(allow_none=True, metadata={"description": "User who last changed it"})


class ResolveHeadersSchema(ma.Schema):
    cache_control = fields.String(data_key="Cache-Control", metadata={"description": "no-store"})


class ManifestSchema(ma.Schema):
    """A manifest document: providers declared in a file or at a URL, each entry a create body."""

    model_providers = fields.List(fields.Nested(ProviderCreateSchema), required=True)

    @validates_schema
    def check_unique_base_urls(self, manifest, **kwargs):
        first_entry_of = {}
        errors = {}
        for index, provider in enumerate(manifest["model_providers"]):
            first = first_entry_of.setdefault(provider["base_url"], index)
            if first != index:
                errors[index] = {"base_url": [f"Same base_url as model_providers.{first}."]}
        if errors:
            raise ValidationError({"model_providers": errors})


class ManifestSyncResultSchema(ma.Schema):
    location = fields.String(required=True, metadata={"format": "uri", "description": "Manifest location"})
    added = fields.Integer(required=True)
    updated = fields.Integer(required=True)
    removed = fields.Integer(required=True)
    unchanged = fields.Integer(required=True)
    error = fields.String(
        allow_none=True, required=True, metadata={"description": "Why the manifest changed nothing; null on success"}
    )


class ManifestStatusSchema(ma.Schema):
    location = fields.String(required=True, metadata={"format": "uri", "description": "Manifest location"})
    last_synced_at = Timestamp(allow_none=True, required=True, metadata={"description": "null before the first sync"})
    outcome = fields.String(allow_none=True, required=True, validate=OneOf(("ok", "error")))
    error = fields.String(allow_none=True, required=True, metadata={"description": "Error of the last sync"})
    provider_count = fields.Integer(required=True)


class GatewayRequestSchema(ma.Schema):
    """An OpenAI request body: the fields the registry reads are checked, every other field is
    kept and passed on to OpenAI-compatible upstreams as sent."""

    class Meta:
        unknown = INCLUDE

    model = fields.String(required=True, metadata={"description": 'A registry model id, "{type}:{upstream model id}"'})


class ChatCompletionRequestSchema(GatewayRequestSchema):
    messages = fields.List(fields.Dict(), required=True, validate=Length(min=1))
    stream = fields.Boolean(load_default=False, metadata={"description": "Answer as an SSE stream of chunks"})
    stream_options = fields.Dict(
        allow_none=True, metadata={"description": "`include_usage`: a last chunk with `choices: []` and `usage`"}
    )


class ResponsesInput(fields.Raw):
    """A Responses API `input`: a string, or a list of input items."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
            return value
        raise ValidationError("Must be a string or a list of input items (objects).")


def refuse_stored_state(value):
    if value is not None:
        raise ValidationError(
            "The registry stores no responses or conversations: send the whole conversation as `input`."
        )


class ResponsesRequestSchema(GatewayRequestSchema):
    """An OpenAI Responses API body: the fields the registry reads are checked; the others
    (reasoning, include, store, prompt_cache_key, ...) are accepted and left out of the call."""

    input = ResponsesInput(
        required=True,
        metadata={
            "description": "A string, or a list of items: messages, function_call and function_call_output, "
            "custom_tool_call and custom_tool_call_output"
        },
    )
    instructions = fields.String(allow_none=True, metadata={"description": "Given to the model as a system message"})
    tools = fields.List(
        fields.Dict(),
        allow_none=True,
        metadata={
            "description": "Tools of type function, and custom (free text, as a function of one string, `input`); "
            "other types are left out"
        },
    )
    tool_choice = fields.Raw(allow_none=True, metadata={"description": "auto, none, required or a function"})
    parallel_tool_calls = fields.Boolean(allow_none=True)
    temperature = fields.Float(allow_none=True)
    top_p = fields.Float(allow_none=True)
    max_output_tokens = fields.Integer(allow_none=True, strict=True, validate=Range(min=1))
    text = fields.Dict(allow_none=True, metadata={"description": "`format`: text, json_schema or json_object"})
    metadata = fields.Dict(allow_none=True)
    stream = fields.Boolean(load_default=False, metadata={"description": "Answer as an SSE stream of Responses events"})
    previous_response_id = fields.Raw(
        allow_none=True, validate=refuse_stored_state, metadata={"description": "Refused: no response is stored"}
    )
    conversation = fields.Raw(
        allow_none=True, validate=refuse_stored_state, metadata={"description": "Refused: no conversation is stored"}
    )


class EmbeddingsRequestSchema(GatewayRequestSchema):
    input = fields.Raw(required=True, metadata={"description": "A string, a list of strings (or of token ids)"})
    encoding_format = fields.String(
        load_default="float",
        validate=OneOf(["float", "base64"]),
        metadata={"description": "base64: little-endian float32 values, as OpenAI's client asks by default"},
    )


class OpenAIAnswerSchema(ma.Schema):
    """What the upstream answered, in OpenAI's shape; `model` is the registry model id."""

    class Meta:
        unknown = INCLUDE

    object = fields.String(required=True)
    model = fields.String(required=True)


class ChatCompletionSchema(OpenAIAnswerSchema):
    id = fields.String()
    created = fields.Integer()
    choices = fields.List(fields.Dict(), required=True)
    usage = fields.Dict(allow_none=True)


class ResponseSchema(OpenAIAnswerSchema):
    id = fields.String(metadata={"description": "resp_..."})
    created_at = fields.Integer()
    status = fields.String(metadata={"description": "completed, incomplete (cut off) or failed"})
    output = fields.List(
        fields.Dict(), required=True, metadata={"description": "message, function_call and custom_tool_call items"}
    )
    usage = fields.Dict(allow_none=True, metadata={"description": "input_tokens, output_tokens, total_tokens"})


class EmbeddingsSchema(OpenAIAnswerSchema):
    data = fields.List(fields.Dict(), required=True)
    usage = fields.Dict(allow_none=True)


class ContentBlockSchema(ma.Schema):
    """An Anthropic content block: the fields the registry reads are checked, others kept."""

    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True)


class TextBlockSchema(ContentBlockSchema):
    text = fields.String(required=True)


class ImageSourceSchema(ma.Schema):
    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True, validate=OneOf(["base64", "url"]))
    media_type = fields.String()
    data = fields.String()
    url = fields.String()

    @validates_schema
    def check_source_fields(self, source, **kwargs):
        needed = ("media_type", "data") if source["type"] == "base64" else ("url",)
        missing = [name for name in needed if name not in source]
        if missing:
            raise ValidationError({name: ["Missing data for required field."] for name in missing})


class ImageBlockSchema(ContentBlockSchema):
    source = fields.Nested(ImageSourceSchema, required=True)


class ToolUseBlockSchema(ContentBlockSchema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    input = fields.Dict(required=True)


class BlockContent(fields.Field):
    """A string, or a list of content blocks, each checked by the schema of its type in
    `schemas` (a block of another type is kept as sent, or refused with `only_known`)."""

    def __init__(self, schemas, only_known=False, metadata=None, **kwargs):
        block = {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string", "enum": list(schemas)}},
        }
        if not only_known:
            block["properties"]["type"].pop("enum")
        content = {"oneOf": [{"type": "string"}, {"type": "array", "items": block}]}
        super().__init__(metadata={**content, **(metadata or {})}, **kwargs)
        self.schemas = schemas
        self.only_known = only_known

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValidationError("Must be a string or a list of content blocks.")
        blocks, errors = [], {}
        for index, block in enumerate(value):
            try:
                blocks.append(self.block(block))
            except ValidationError as error:
                errors[index] = error.messages
        if errors:
            raise ValidationError(errors)
        return blocks

    def block(self, block):
        if not (isinstance(block, dict) and isinstance(block.get("type"), str)):
            raise ValidationError("Must be a content block: an object with a `type`.")
        schema = self.schemas.get(block["type"])
        if schema is None and self.only_known:
            raise ValidationError(f"Must be a block of type {' or '.join(self.schemas)}.")
        return schema().load(block) if schema else block


# The blocks of a tool's result, and of a system prompt: none nests further.
RESULT_BLOCKS = {"text": TextBlockSchema, "image": ImageBlockSchema}


class ToolResultBlockSchema(ContentBlockSchema):
    tool_use_id = fields.String(required=True)
    content = BlockContent(RESULT_BLOCKS)
    is_error = fields.Boolean()


MESSAGE_BLOCKS = {**RESULT_BLOCKS, "tool_use": ToolUseBlockSchema, "tool_result": ToolResultBlockSchema}


class AnthropicMessageSchema(ma.Schema):
    class Meta:
        unknown = INCLUDE

    role = fields.String(
        required=True,
        validate=OneOf(["user", "assistant", "system"]),
        metadata={"description": "A system message is taken as system text at that point of the conversation"},
    )
    content = BlockContent(
        MESSAGE_BLOCKS,
        required=True,
        metadata={"description": "A string, or text, image, tool_use, tool_result blocks"},
    )


class AnthropicToolSchema(ma.Schema):
    class Meta:
        unknown = INCLUDE

    name = fields.String(required=True)
    description = fields.String()
    input_schema = fields.Dict()
    type = fields.String(metadata={"description": "Anthropic's server tools reach only Anthropic upstreams"})


class AnthropicToolChoiceSchema(ma.Schema):
    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True, validate=OneOf(["auto", "any", "tool", "none"]))
    name = fields.String()
    disable_parallel_tool_use = fields.Boolean()

    @validates_schema
    def check_tool_name(self, choice, **kwargs):
        if choice["type"] == "tool" and "name" not in choice:
            raise ValidationError({"name": ["A tool choice of type tool names the tool."]})


class TokenCountRequestSchema(GatewayRequestSchema):
    """What Anthropic counts the input tokens of: a Messages body's conversation and tools. The
    fields the registry reads are checked; every other field (thinking, ...) reaches Anthropic
    upstreams as sent."""

    messages = fields.List(fields.Nested(AnthropicMessageSchema), required=True, validate=Length(min=1))
    system = BlockContent(
        {"text": TextBlockSchema}, only_known=True, metadata={"description": "A string or text blocks"}
    )
    tools = fields.List(fields.Nested(AnthropicToolSchema))
    tool_choice = fields.Nested(AnthropicToolChoiceSchema)


class TokenCountSchema(ma.Schema):
    """Anthropic's count of a body's input tokens, as the provider answered it."""

    class Meta:
        unknown = INCLUDE

    input_tokens = fields.Integer(required=True)


class MessagesRequestSchema(TokenCountRequestSchema):
    """Anthropic's Messages body: the fields the registry reads are checked; every other field
    (cache_control, thinking, context_management, ...) reaches Anthropic upstreams as sent."""

    max_tokens = fields.Integer(required=True, strict=True, validate=Range(min=1))
    stop_sequences = fields.List(fields.String())
    temperature = fields.Float(validate=Range(min=0, max=1))
    top_p = fields.Float(validate=Range(min=0, max=1))
    top_k = fields.Integer(strict=True, validate=Range(min=0))
    stream = fields.Boolean(load_default=False, metadata={"description": "Answer as Anthropic's SSE events"})
    metadata = fields.Dict()


class MessageSchema(ma.Schema):
    """Anthropic's message; `model` is the registry model id."""

    class Meta:
        unknown = INCLUDE

    id = fields.String(required=True)
    type = fields.String(required=True)
    role = fields.String(required=True)
    model = fields.String(required=True)
    content = fields.List(fields.Dict(), required=True)
    stop_reason = fields.String(allow_none=True)
    stop_sequence = fields.String(allow_none=True)
    usage = fields.Dict(required=True)


def printable(text):
    if not is_printable(text):
        raise ValidationError("Must not hold control or format characters, or line breaks.")


LIMIT_DESCRIPTIONS = {
    "requests_per_minute": "Calls admitted in any 60 seconds",
    "tokens_per_minute": "Calls admitted while the tokens (input + output) of the last 60 seconds are below this",
    "tokens_per_day": "Calls admitted while the tokens (input + output) of the last 24 hours are below this",
    "max_parallel": "Calls in flight at once (none: REGISTRY_DEFAULT_MAX_PARALLEL per worker)",
}


def limit_field(name):
    return fields.Integer(
        allow_none=True, validate=Range(1, MAX_LIMIT), strict=True, metadata={"description": LIMIT_DESCRIPTIONS[name]}
    )


class TokenLimitsSchema(ma.Schema):
    """A token's gateway limits, each null (or absent) for none."""

    requests_per_minute = limit_field("requests_per_minute")
    tokens_per_minute = limit_field("tokens_per_minute")
    tokens_per_day = limit_field("tokens_per_day")
    max_parallel = limit_field("max_parallel")


class TokenCreateSchema(ma.Schema):
    name = Text(required=True, validate=[Length(1, 255), printable], metadata={"description": "What the token is for"})
    role = fields.String(
        validate=OneOf(ROLES), metadata={"description": "At most the owner's role; default: the owner's role"}
    )
    expires_in_days = fields.Integer(
        validate=Range(1, MAX_TOKEN_DAYS), metadata={"description": "Days until it expires; absent: never"}
    )
    user = Text(
        validate=Length(1, 255), metadata={"description": "Owner's user name (admin only); default: the caller"}
    )
    limits = fields.Nested(
        TokenLimitsSchema,
        metadata={"description": "Its gateway limits; made with a token: none looser than that token's (default: its)"},
    )


class TokenChangesSchema(ma.Schema):
    limits = fields.Nested(
        TokenLimitsSchema,
        required=True,
        metadata={"description": "The limits to change: a limit given is set (null: none), one left out is kept"},
    )


class TokenSchema(DirectDumpSchema):
    id = fields.String(required=True, metadata={"format": "uuid"})
    name = fields.String(required=True)
    user = fields.String(required=True, metadata={"description": "The owner's user name"})
    role = fields.String(required=True, validate=OneOf(ROLES))
    created_at = Timestamp(required=True)
    expires_at = Timestamp(allow_none=True, required=True, metadata={"description": "null: never expires"})
    last_used_at = Timestamp(
        allow_none=True, required=True, metadata={"description": "Last use, to within a minute; null before the first"}
    )
    limits = fields.Nested(TokenLimitsSchema, required=True)


class NewTokenSchema(TokenSchema):
    token = fields.String(
        required=True, metadata={"description": "The secret (Authorization: Bearer ...), shown in this answer only"}
    )


class TokensQuerySchema(PageQuerySchema):
    user = Text(metadata={"description": "Only this user's tokens (admin; others see only their own)"})


USAGE_GROUP_KEYS = ("day", "model", "provider", "token", "user")


class GroupKeys(fields.String):
    """Group keys separated by commas ("day,model"), loaded as a list without repeats."""

    def __init__(self, metadata=None, **kwargs):
        one_key = f" *({'|'.join(USAGE_GROUP_KEYS)}) *"
        super().__init__(metadata={"pattern": f"^{one_key}(,{one_key})*$", **(metadata or {})}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        keys = [key.strip() for key in super()._deserialize(value, attr, data, **kwargs).split(",")]
        if not all(key in USAGE_GROUP_KEYS for key in keys):
            raise ValidationError(f"Must be one or more of {', '.join(USAGE_GROUP_KEYS)}, separated by commas.")
        return list(dict.fromkeys(keys))


class UsageQuerySchema(ma.Schema):
    group_by = GroupKeys(
        load_default=lambda: ["day"],
        metadata={
            "description": f"One or more of {', '.join(USAGE_GROUP_KEYS)}, separated by commas; default day. "
            "Rows are ordered by these keys, in this order"
        },
    )
    since = UtcTimestamp(metadata={"description": "Calls that ended at or after this; default: 30 days before until"})
    until = UtcTimestamp(metadata={"description": "Calls that ended before this time; default: no end"})
    model = Text(metadata={"description": "Only this registry model id"})
    provider_id = Text(metadata={"description": "Only this provider's calls"})
    token_id = Text(metadata={"description": "Only this API token's calls"})
    user = Text(metadata={"description": "Only this user's calls, by name (admin; others see only their own)"})


class UsageRowSchema(ma.Schema):
    """One group: its keys (those asked for) and its sums."""

    day = fields.Date(metadata={"description": "YYYY-MM-DD in UTC"})
    model = fields.String(allow_none=True, metadata={"description": "null: a model the registry does not know"})
    provider_id = fields.String(allow_none=True, metadata={"description": "null: no provider was tried"})
    token_id = fields.String(allow_none=True, metadata={"description": "null: calls with HTTP Basic credentials"})
    user = fields.String(metadata={"description": "The caller's user name (a token's owner)"})
    requests = fields.Integer(required=True)
    errors = fields.Integer(required=True, metadata={"description": "Calls whose outcome was not ok"})
    input_tokens = fields.Integer(required=True, metadata={"description": "As the upstreams reported them"})
    output_tokens = fields.Integer(required=True, metadata={"description": "As the upstreams reported them"})


class UsageReportSchema(ma.Schema):
    items = fields.List(fields.Nested(UsageRowSchema), required=True)
