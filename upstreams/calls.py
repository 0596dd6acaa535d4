"""What every gateway call to an upstream shares: the request with its deadline, the failures
it can meet, the SSE events of a stream, and removing the provider's key from upstream text.

Each wire format's chat and embeddings live beside its listing (openai.py, watsonx.py).
"""

import json
import time
from contextlib import closing
from dataclasses import dataclass

import httpx

from upstreams import http_client

UPSTREAM_TEXT_LIMIT = 2000


@dataclass(frozen=True)
class Target:
    """One provider a call may go to, its key opened: no database or app context needed."""

    provider_id: str
    type: str
    base_url: str
    api_key: str
    upstream_model: str
    watsonx_project_id: str | None = None
    watsonx_space_id: str | None = None


class Deadline:
    """The time one gateway call may take in all (REGISTRY_GATEWAY_TIMEOUT), streaming included."""

    def __init__(self, total, connect):
        self.ends_at = time.monotonic() + total
        self.connect = connect

    def remaining(self):
        return self.ends_at - time.monotonic()

    def timeout(self):
        """httpx timeouts for the next request: no single wait may outlast the call."""
        remaining = self.remaining()
        if remaining <= 0:
            raise UpstreamTimeout("the call took longer than the gateway allows")
        return httpx.Timeout(remaining, connect=min(self.connect, remaining))


class UpstreamFailure(Exception):
    """This provider could not serve the call; the next provider of the model may."""

    def __init__(self, message, status=502, retry_after=None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class UpstreamTimeout(Exception):
    """The call's deadline passed: no provider is tried after it."""


class UpstreamRefusal(Exception):
    """The upstream's own 4xx about the request (a bad parameter, context too long): passed
    on to the client with its status and the upstream's words, the key removed."""

    def __init__(self, status, error):
        super().__init__(error["message"])
        self.status = status
        self.error = error


def redact(text, *secrets):
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def upstream_error(response, *secrets):
    """The upstream's error as OpenAI's {message, type, param, code}, whatever shape it used."""
    response.read()
    try:
        document = response.json()
    except ValueError:
        document = None
    error = {"message": response.text[:UPSTREAM_TEXT_LIMIT], "type": "upstream_error", "param": None, "code": None}
    if isinstance(document, dict):
        if isinstance(document.get("error"), dict):  # OpenAI and most compatible servers
            error.update({key: document["error"].get(key, error[key]) for key in error})
        elif isinstance(document.get("errors"), list) and document["errors"]:  # watsonx
            first = document["errors"][0]
            error.update(message=first.get("message", error["message"]), code=first.get("code"))
        elif isinstance(document.get("error"), str):
            error["message"] = document["error"]
    error["message"] = str(error["message"] or f"HTTP {response.status_code}")
    return {key: redact(value, *secrets) if isinstance(value, str) else value for key, value in error.items()}


def check_status(response, target, *secrets):
    """Return when the upstream accepted the call; otherwise raise what its answer means."""
    if response.status_code < 300:
        return
    if response.status_code == 429 or response.status_code >= 500:
        raise UpstreamFailure(
            f"provider {target.provider_id} answered HTTP {response.status_code}",
            status=response.status_code,
            retry_after=response.headers.get("Retry-After"),
        )
    if response.status_code in (401, 403):
        # The registry's key for this provider, not the client's token, was refused.
        raise UpstreamFailure(f"provider {target.provider_id} rejected the registry's API key")
    raise UpstreamRefusal(response.status_code, upstream_error(response, target.api_key, *secrets))


def open_response(target, method, url, deadline, *, headers=None, json_body=None, params=None, data=None, secrets=()):
    """The upstream's accepted response, streaming (the caller closes it), or the failure.

    Retries are ours (the failover to the next provider), never the HTTP client's.
    """
    client = http_client()
    request = client.build_request(
        method, url, headers=headers, json=json_body, params=params, data=data, timeout=deadline.timeout()
    )
    try:
        response = client.send(request, stream=True)
    except httpx.ConnectTimeout:
        raise UpstreamFailure(f"could not connect to provider {target.provider_id} in time") from None
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"provider {target.provider_id} did not answer in time") from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError):
        raise UpstreamFailure(f"could not reach provider {target.provider_id}") from None
    try:
        check_status(response, target, *secrets)
    except BaseException:
        response.close()
        raise
    return response


def read_json(response, target):
    """The accepted response's JSON body (and the response closed)."""
    with closing(response):
        try:
            response.read()
            return response.json()
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"provider {target.provider_id} did not answer in time") from None
        except httpx.HTTPError:
            raise UpstreamFailure(f"provider {target.provider_id} broke off its answer") from None
        except ValueError:
            raise UpstreamFailure(f"provider {target.provider_id} answered with something other than JSON") from None


def sse_events(response, target):
    """The data of each server-sent event, as each arrives; the stream's own errors raised as ours."""
    data_lines = []
    try:
        for line in response.iter_lines():
            if line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
            elif not line and data_lines:
                yield "\n".join(data_lines)
                data_lines = []
    except httpx.TimeoutException:
        raise UpstreamTimeout(f"provider {target.provider_id} stopped sending in time") from None
    except httpx.HTTPError:
        raise UpstreamFailure(f"provider {target.provider_id} broke off its stream") from None
    if data_lines:
        yield "\n".join(data_lines)


def has_finished(event):
    choices = event.get("choices") if isinstance(event, dict) else None
    return any(isinstance(choice, dict) and choice.get("finish_reason") for choice in choices or ())


def json_events(response, target, *secrets):
    """Each event of an SSE stream as a JSON document, until `[DONE]`; an error event raises,
    and so does a stream that ends before the model finished (a cut connection)."""
    finished = False
    for data in sse_events(response, target):
        if data.strip() == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise UpstreamFailure(f"provider {target.provider_id} sent an event that is not JSON") from None
        if isinstance(event, dict) and "error" in event and "choices" not in event:
            message = redact(json.dumps(event["error"]), target.api_key, *secrets)
            raise UpstreamFailure(f"provider {target.provider_id} failed mid-stream: {message[:UPSTREAM_TEXT_LIMIT]}")
        finished = finished or has_finished(event)
        yield event
    if not finished:
        raise UpstreamFailure(f"provider {target.provider_id} ended its stream before the model finished")
