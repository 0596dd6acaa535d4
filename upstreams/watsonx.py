"""IBM watsonx.ai: the foundation model specs, without withdrawn models; chat and embeddings
translated to and from OpenAI's shapes, with the IAM token exchange its API keys need."""

import hashlib
import math
import threading
import time
from contextlib import closing
from datetime import date

from upstreams.errors import UpstreamFailure, UpstreamRefusal, UpstreamTimeout
from upstreams.http import (
    checked_completion,
    checked_embeddings,
    is_count,
    is_list_of_objects,
    json_events,
    open_response,
    read_json,
    started,
)
from upstreams.listing import get_json, model_entries, upstream_model, usable_models
from upstreams.wire import WireFormat

WATSONX_API_VERSION = "2024-05-01"


def is_withdrawn(spec, today):
    """Whether a lifecycle stage "withdrawn" has begun; a lifecycle that is not a list fails the listing."""
    lifecycle = spec.get("lifecycle") or []
    if not isinstance(lifecycle, list):
        raise UpstreamFailure("unexpected response from the upstream: a model lifecycle that is not a list")
    return any(
        stage.get("id") == "withdrawn" and str(stage.get("start_date") or "0000") <= today.isoformat()
        for stage in lifecycle
        if isinstance(stage, dict)
    )


def spec_model(spec):
    return upstream_model(spec.get("model_id"), None, spec.get("provider") or "ibm", spec.get("label"))


IAM_GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
# A token is exchanged anew this long before it expires, so none expires during a call's start.
TOKEN_RENEWAL_MARGIN = 300
# OpenAI chat options watsonx takes under the same name; others it does not know are left out.
CHAT_OPTIONS = (
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "temperature",
    "top_p",
)


class IamTokens:
    """Bearer tokens per watsonx API key, reused until shortly before they expire.

    Keyed by a digest of the key, and exchanged one at a time per key: callers that find
    no fresh token wait for the exchange already under way instead of starting their own.
    """

    def __init__(self):
        self._tokens = {}  # key_digest -> (token, renew_at)
        self._exchanges = {}  # key digest -> lock held while its token is exchanged
        self._lock = threading.Lock()

    def _fresh(self, digest):
        token, renew_at = self._tokens.get(digest, (None, 0))
        return token if renew_at > time.time() else None

    def token(self, target, deadline):
        digest = key_digest(target)
        token = self._fresh(digest)
        if token:
            return token
        with self._lock:
            exchange_lock = self._exchanges.setdefault(digest, threading.Lock())
        if not exchange_lock.acquire(timeout=max(deadline.remaining(), 0)):
            raise UpstreamTimeout(f"the watsonx IAM token exchange for provider {target.provider_id} took too long")
        try:
            token = self._fresh(digest)
            if token:
                return token
            token, expires_at = exchange_key(target, deadline)
            self._tokens[digest] = (token, expires_at - TOKEN_RENEWAL_MARGIN)
            return token
        finally:
            exchange_lock.release()

    def forget(self, target, token):
        """Drop the key's token (watsonx refused it): the next call exchanges the key again."""
        digest = key_digest(target)
        if self._tokens.get(digest, (None, 0))[0] == token:
            self._tokens.pop(digest, None)


def key_digest(target):
    """What a token is kept under: the key and the IAM service that exchanged it (a token of
    one IAM is worth nothing at another, as when two registries with different IAM URLs share
    a process)."""
    return hashlib.sha256(f"{target.watsonx_iam_url}\0{target.api_key}".encode()).digest()


iam_tokens = IamTokens()


def is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def exchange_key(target, deadline):
    """(token, when it expires in Unix seconds): IAM's `expires_in` (relative, so a clock
    that is off does not matter) preferred to its `expiration`. IAM refusing the key, or
    answering without a usable token, fails the provider."""
    form = {"grant_type": IAM_GRANT_TYPE, "apikey": target.api_key}
    failed = f"watsonx IAM token exchange failed for provider {target.provider_id}"
    try:
        response = open_response(
            target, "POST", target.watsonx_iam_url, deadline, data=form, headers={"Accept": "application/json"}
        )
    except UpstreamFailure as failure:
        raise UpstreamFailure(f"{failed}: {failure}") from None
    except UpstreamRefusal as refusal:
        raise UpstreamFailure(f"{failed}: IAM refused the key (HTTP {refusal.status})") from None
    document = read_json(response, target)
    token = document.get("access_token") if isinstance(document, dict) else None
    if not isinstance(token, str) or not token:
        raise UpstreamFailure(f"watsonx IAM answered provider {target.provider_id} without a token")
    if is_number(document.get("expires_in")):
        return token, time.time() + document["expires_in"]
    if is_number(document.get("expiration")):
        return token, document["expiration"]
    raise UpstreamFailure(f"watsonx IAM answered provider {target.provider_id} without a usable expiry")


def post(target, path, model, body, deadline):
    """(the accepted response, the IAM token it was asked with: a secret like the key)."""
    token = iam_tokens.token(target, deadline)
    scope = (
        {"project_id": target.watsonx_project_id}
        if target.watsonx_project_id
        else {"space_id": target.watsonx_space_id}
    )
    try:
        response = open_response(
            target,
            "POST",
            f"{target.base_url}{path}",
            deadline,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            params={"version": WATSONX_API_VERSION},
            json_body={**body, "model_id": model, **scope},
            secrets=(token,),
        )
    except UpstreamFailure as failure:
        if failure.status in (401, 403):
            iam_tokens.forget(target, token)
        raise
    return response, token


def chat_body(request):
    """The canonical chat request in watsonx's words."""
    options = request.options
    translated = {"messages": request.messages, **{name: options[name] for name in CHAT_OPTIONS if name in options}}
    if request.tools is not None:
        translated["tools"] = request.tools
    if "max_completion_tokens" in options:
        translated["max_tokens"] = options["max_completion_tokens"]
    tool_choice = options.get("tool_choice")
    if isinstance(tool_choice, str):
        translated["tool_choice_option"] = tool_choice
    elif tool_choice is not None:
        translated["tool_choice"] = tool_choice
    return translated


def openai_choices(choices, part):
    """watsonx's choices as OpenAI's: `part` is "message" or, in a stream, "delta"."""
    return [
        {
            "index": choice.get("index", index),
            part: choice.get(part) or {},
            "logprobs": choice.get("logprobs"),
            "finish_reason": choice.get("finish_reason"),
        }
        for index, choice in enumerate(choices or [])
    ]


def openai_completion(answer, kind, part):
    completion = {
        "id": answer.get("id", ""),
        "object": kind,
        "created": answer.get("created") or int(time.time()),
        "model": answer.get("model_id", ""),
        "choices": openai_choices(answer.get("choices"), part),
    }
    if answer.get("usage"):
        completion["usage"] = answer["usage"]
    return completion


def embedding_inputs(request):
    inputs = request.input
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        message = "watsonx models embed text: `input` must be a string or a list of strings."
        raise UpstreamRefusal(
            400, {"message": message, "type": "invalid_request_error", "param": "input", "code": None}
        )
    return inputs


class Watsonx(WireFormat):
    """watsonx.ai's own API: its listing needs no key; its calls exchange the key for IAM tokens."""

    name = "watsonx"

    def list_models(self, target, observe):
        params = {"version": WATSONX_API_VERSION, "limit": 200}
        document = get_json(target, f"{target.base_url}/ml/v1/foundation_model_specs", observe, params=params)
        today = date.today()
        specs = [
            spec
            for spec in model_entries(document, "resources")
            if not (isinstance(spec, dict) and is_withdrawn(spec, today))
        ]
        return usable_models(target, specs, spec_model)

    def chat(self, target, model, request, deadline):
        response, token = post(target, "/ml/v1/text/chat", model, chat_body(request), deadline)
        answer = checked_completion(read_json(response, target, token), target)
        return openai_completion(answer, "chat.completion", "message")

    def open_chat_stream(self, target, model, request, deadline):
        response, token = post(target, "/ml/v1/text/chat_stream", model, chat_body(request), deadline)

        def chunks():
            with closing(response):
                for answer in json_events(response, target, token):
                    yield openai_completion(answer, "chat.completion.chunk", "delta")

        return started(chunks(), target)

    def embed(self, target, model, request, deadline):
        response, token = post(target, "/ml/v1/text/embeddings", model, {"inputs": embedding_inputs(request)}, deadline)
        answer = read_json(response, target, token)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not is_list_of_objects(results) or not is_count(answer.get("input_token_count") or 0):
            raise UpstreamFailure(f"provider {target.provider_id} answered embeddings of an unexpected shape")
        tokens = answer.get("input_token_count") or 0
        embeddings = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": result.get("embedding")}
                for index, result in enumerate(results)
            ],
            "model": answer.get("model_id", ""),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return checked_embeddings(embeddings, target)
