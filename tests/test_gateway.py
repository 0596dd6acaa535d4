"""The gateway: the real `openai` client, sync and async, calling models through gunicorn.

Upstreams are faked by tests/fakes/, which speak the real wire formats.
"""

import asyncio
import base64
import contextlib
import json
import logging
import re
import struct
import threading
import time
import uuid
from urllib.parse import unquote

import httpx
import httpx2
import openai
import pytest
import sqlalchemy as sa

from models import ModelProvider, db
from tests.conftest import PASSWORDS, basic_auth, client_as, provider_body, token_of, wait_for
from tests.fakes.model import USAGE
from tests.protocols import PROTOCOLS, keepalives, sse_documents
from tests.test_metrics import delta, parse, scrape

PROVIDERS = "/api/v1/model_providers"
MODEL_KEY = "sk-model-key-SECRET-4242"
WATSONX_KEY = "watsonx-api-key-SECRET-77"
# Basic credentials of a user whose role may call models (tokens of role caller are made below).
CALLER = "service"


def register(registry, server, provider_type=None, **fields):
    body = provider_body(
        type=provider_type or server.flavor, base_url=server.base_url, api_key=server.api_key, **fields
    )
    response = client_as(registry, "admin").post(PROVIDERS, json=body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def register_watsonx(registry, server):
    return register(registry, server, watsonx_project_id="project-1")


def set_state(registry, provider_id, state):
    with registry.app_context():
        db.session.execute(sa.update(ModelProvider).where(ModelProvider.id == provider_id).values(state=state))
        db.session.commit()


def openai_client(server, api_key=None, client_class=openai.OpenAI):
    """The OpenAI client as an agent points it at the registry: an API token as its key."""
    client = client_class(
        base_url=f"{server.base_url}/api/v1/openai", api_key=api_key or server.caller_token, max_retries=0, timeout=30
    )
    return client


def chat(client, model="openai:gpt-4o", **options):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], **options)


def raw_chat(client, model="openai:gpt-4o", **options):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], **options
    )


def streamed(client, model="openai:gpt-4o", **options):
    return list(chat(client, model, stream=True, **options))


def streamed_text(chunks):
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def streamed_tool_call(chunks):
    """(name, arguments) of the tool call a stream carries, its arguments joined from their parts."""
    calls = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    name = next(call.function.name for call in calls if call.function.name)
    return name, json.loads("".join(call.function.arguments or "" for call in calls))


# Each type's chat ------------------------------------------------------------------------


def test_openai_chat_answers_with_the_registry_model_id_and_the_serving_provider(registry, gateway, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    provider_id = register(registry, upstream)
    raw = raw_chat(openai_client(gateway()))
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello!"
    assert completion.model == "openai:gpt-4o"
    assert completion.usage.total_tokens == USAGE["total_tokens"]
    assert raw.headers["X-Registry-Provider-Id"] == provider_id
    path, headers, body = upstream.calls[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {MODEL_KEY}"
    assert body["model"] == "gpt-4o"


def test_fields_the_registry_does_not_know_reach_an_openai_compatible_upstream(registry, gateway, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    chat(openai_client(gateway()), temperature=0.2, extra_body={"top_k": 5, "vendor_option": {"a": [1]}})
    body = upstream.calls[-1][2]
    assert body["top_k"] == 5 and body["vendor_option"] == {"a": [1]} and body["temperature"] == 0.2


def test_openai_stream_relays_chunks_with_the_registry_model_id_and_ends_with_done(registry, gateway, fake_upstream):
    provider_id = register(registry, fake_upstream(api_key=MODEL_KEY))
    server = gateway()
    chunks = streamed(openai_client(server))
    assert streamed_text(chunks) == "Hello!"
    assert {chunk.model for chunk in chunks} == {"openai:gpt-4o"}
    assert all(chunk.usage is None for chunk in chunks)  # not asked for
    body = json.dumps({"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": True})
    with server.client(CALLER) as client:
        response = client.post(
            "/api/v1/openai/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["X-Registry-Provider-Id"] == provider_id
    assert response.text.endswith("data: [DONE]\n\n")


def test_include_usage_gives_a_last_chunk_without_choices(registry, gateway, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    chunks = streamed(openai_client(gateway()), stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == USAGE["total_tokens"]
    assert chunks[-1].model == "openai:gpt-4o"
    assert streamed_text(chunks) == "Hello!"


def test_rits_is_called_with_its_header_besides_bearer(registry, gateway, fake_upstream):
    upstream = fake_upstream("rits", api_key=MODEL_KEY, models=["ibm/granite-3-8b"])
    register(registry, upstream)
    client = openai_client(gateway())
    assert chat(client, "rits:ibm/granite-3-8b").choices[0].message.content == "Hello!"
    assert streamed_text(streamed(client, "rits:ibm/granite-3-8b")) == "Hello!"
    headers = upstream.calls[-1][1]
    assert headers["RITS_API_KEY"] == MODEL_KEY and headers["Authorization"] == f"Bearer {MODEL_KEY}"


def test_watsonx_chat_is_translated_both_ways(registry, gateway, fake_upstream):
    upstream = fake_upstream("watsonx", api_key=WATSONX_KEY, models=["ibm/granite-3-8b-instruct"])
    register_watsonx(registry, upstream)
    completion = chat(openai_client(gateway(iam=upstream)), "watsonx:ibm/granite-3-8b-instruct", max_tokens=20)
    assert completion.object == "chat.completion"
    assert completion.model == "watsonx:ibm/granite-3-8b-instruct"
    assert completion.choices[0].message.content == "Hello!" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == USAGE["total_tokens"]
    path, headers, body = upstream.calls[-1]
    assert path == "/ml/v1/text/chat"
    assert body["model_id"] == "ibm/granite-3-8b-instruct" and body["project_id"] == "project-1"
    assert body["max_tokens"] == 20 and "model" not in body
    assert headers["Authorization"] == "Bearer iam-token-1"


def test_watsonx_stream_is_translated_with_usage(registry, gateway, fake_upstream):
    upstream = fake_upstream("watsonx", api_key=WATSONX_KEY, models=["ibm/granite-3-8b-instruct"])
    register_watsonx(registry, upstream)
    client = openai_client(gateway(iam=upstream))
    chunks = streamed(client, "watsonx:ibm/granite-3-8b-instruct", stream_options={"include_usage": True})
    assert upstream.calls[-1][0] == "/ml/v1/text/chat_stream"
    assert streamed_text(chunks) == "Hello!"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert {chunk.model for chunk in chunks} == {"watsonx:ibm/granite-3-8b-instruct"}
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == USAGE["total_tokens"]
    plain = streamed(client, "watsonx:ibm/granite-3-8b-instruct")
    assert all(chunk.choices for chunk in plain)  # no usage chunk unless asked for


def test_watsonx_token_is_exchanged_once_and_reused(registry, gateway, fake_upstream):
    upstream = fake_upstream("watsonx", api_key=WATSONX_KEY, models=["ibm/granite-3-8b-instruct"])
    register_watsonx(registry, upstream)
    client = openai_client(gateway(iam=upstream), client_class=openai.AsyncOpenAI)

    async def calls_at_once():
        model = "watsonx:ibm/granite-3-8b-instruct"
        messages = [{"role": "user", "content": "Hi"}]
        return await asyncio.gather(*(client.chat.completions.create(model=model, messages=messages) for _ in range(4)))

    completions = asyncio.run(calls_at_once())
    assert [completion.choices[0].message.content for completion in completions] == ["Hello!"] * 4
    assert upstream.iam_exchanges == 1


def test_watsonx_token_is_exchanged_anew_before_it_expires(registry, gateway, fake_upstream):
    upstream = fake_upstream("watsonx", api_key=WATSONX_KEY, models=["ibm/granite-3-8b-instruct"])
    upstream.token_lifetime = 60  # within the renewal margin: every call exchanges anew
    register_watsonx(registry, upstream)
    client = openai_client(gateway(iam=upstream))
    chat(client, "watsonx:ibm/granite-3-8b-instruct")
    chat(client, "watsonx:ibm/granite-3-8b-instruct")
    assert upstream.iam_exchanges == 2


# Embeddings --------------------------------------------------------------------------------


def test_embeddings_in_the_clients_default_base64_come_back_as_the_upstreams_floats(registry, gateway, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    client = openai_client(gateway())
    answer = client.embeddings.create(model="openai:text-embedding-3-small", input=["a", "bcd"])
    assert upstream.calls[-1][2].get("encoding_format") is None  # asked as floats
    assert answer.model == "openai:text-embedding-3-small"
    assert [item.embedding for item in answer.data] == [[0.5, -0.25, 1.0], [0.5, -0.25, 3.0]]
    assert answer.usage.total_tokens == 2


def test_embeddings_answer_base64_of_little_endian_float32_when_asked(registry, gateway, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    server = gateway()
    body = {"model": "openai:text-embedding-3-small", "input": "abcd", "encoding_format": "base64"}
    with server.client(CALLER) as client:
        answer = client.post("/api/v1/openai/embeddings", json=body).json()
    encoded = answer["data"][0]["embedding"]
    assert struct.unpack("<3f", base64.b64decode(encoded)) == (0.5, -0.25, 4.0)
    with server.client(CALLER) as client:
        floats = client.post("/api/v1/openai/embeddings", json={**body, "encoding_format": "float"}).json()
    assert floats["data"][0]["embedding"] == [0.5, -0.25, 4.0]


def test_watsonx_embeddings_are_translated(registry, gateway, fake_upstream):
    upstream = fake_upstream("watsonx", api_key=WATSONX_KEY, models=["ibm/slate-125m-english-rtrvr"])
    register_watsonx(registry, upstream)
    client = openai_client(gateway(iam=upstream))
    answer = client.embeddings.create(model="watsonx:ibm/slate-125m-english-rtrvr", input=["a", "bc"])
    assert [item.embedding for item in answer.data] == [[0.5, -0.25, 1.0], [0.5, -0.25, 2.0]]
    assert [item.index for item in answer.data] == [0, 1]
    assert answer.model == "watsonx:ibm/slate-125m-english-rtrvr" and answer.usage.prompt_tokens == 2
    path, _, body = upstream.calls[-1]
    assert path == "/ml/v1/text/embeddings" and body["inputs"] == ["a", "bc"] and body["project_id"] == "project-1"


# Tools and JSON mode -----------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize("flavor, model", [("openai", "gpt-4o"), ("watsonx", "ibm/granite-3-8b-instruct")])
def test_tools_are_passed_through_and_tool_calls_come_back(registry, gateway, fake_upstream, flavor, model):
    upstream = fake_upstream(flavor, api_key=WATSONX_KEY if flavor == "watsonx" else MODEL_KEY, models=[model])
    register(registry, upstream, watsonx_project_id="project-1" if flavor == "watsonx" else None)
    client = openai_client(gateway(iam=upstream))
    completion = chat(client, f"{flavor}:{model}", tools=[WEATHER_TOOL], tool_choice="auto")
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    body = upstream.calls[-1][2]
    assert body["tools"] == [WEATHER_TOOL]
    assert body.get("tool_choice", body.get("tool_choice_option")) == "auto"
    chunks = streamed(client, f"{flavor}:{model}", tools=[WEATHER_TOOL])
    assert all(chunk.model == f"{flavor}:{model}" for chunk in chunks)
    assert streamed_tool_call(chunks) == ("get_weather", {"city": "Paris"})
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"


@pytest.mark.parametrize("flavor, model", [("openai", "gpt-4o"), ("watsonx", "ibm/granite-3-8b-instruct")])
def test_json_mode_is_passed_through(registry, gateway, fake_upstream, flavor, model):
    upstream = fake_upstream(flavor, api_key=WATSONX_KEY if flavor == "watsonx" else MODEL_KEY, models=[model])
    register(registry, upstream, watsonx_project_id="project-1" if flavor == "watsonx" else None)
    completion = chat(
        openai_client(gateway(iam=upstream)), f"{flavor}:{model}", response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content) == {"answer": "Hello!"}
    assert upstream.calls[-1][2]["response_format"] == {"type": "json_object"}


# Routing and failover ----------------------------------------------------------------------


def test_oldest_online_provider_serves_first(registry, fake_upstream, protocol):
    first, second = fake_upstream(api_key=MODEL_KEY), fake_upstream(api_key=MODEL_KEY)
    first_id = register(registry, first)
    register(registry, second)
    response = ask(registry, protocol)
    assert response.headers["X-Registry-Provider-Id"] == first_id
    assert len(first.calls) == 1 and second.calls == []


@pytest.mark.parametrize("failure", ["500", "503", "429", "unreachable"])
def test_a_failing_provider_hands_the_call_to_the_next(registry, fake_upstream, protocol, failure):
    first, _, second_id = two_providers(registry, fake_upstream)
    if failure == "unreachable":
        first.down()
    else:
        first.fail_with(int(failure))
    response = ask(registry, protocol)
    assert protocol.text(response.get_json()) == "Hello!"
    assert response.headers["X-Registry-Provider-Id"] == second_id
    streamed_response = ask(registry, protocol, stream=True)
    assert streamed_response.headers["X-Registry-Provider-Id"] == second_id
    assert protocol.stream_text(stream_documents(streamed_response)) == "Hello!"


def test_every_provider_failing_is_502(registry, fake_upstream, protocol):
    first, second, _ = two_providers(registry, fake_upstream)
    first.fail_with(500)
    second.fail_with(502)
    response = ask(registry, protocol)
    assert response.status_code == 502
    assert "Every provider of the model failed" in protocol.error_message(response.get_json())


def test_every_provider_rate_limiting_is_429_with_retry_after(registry, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.fail_with(429, "slow down", headers={"Retry-After": "7"})
    response = ask(registry, protocol)
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"


def test_every_provider_offline_is_503(registry, fake_upstream, protocol):
    provider_id = register(registry, fake_upstream(api_key=MODEL_KEY))
    set_state(registry, provider_id, "offline")
    response = ask(registry, protocol)
    assert response.status_code == 503 and "offline" in protocol.error_message(response.get_json())


def test_unknown_model_is_404_model_not_found(registry, fake_upstream, protocol):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    for model in ("openai:gpt-5-unknown", "nosuchtype:gpt-4o", "gpt-4o"):
        response = ask(registry, protocol, model)
        assert response.status_code == 404
        assert protocol.error_code(response.get_json()) == protocol.model_not_found


def test_an_unknown_embeddings_model_is_404_model_not_found(registry, gateway, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client(gateway()).embeddings.create(model="openai:nope", input="a")
    assert raised.value.code == "model_not_found"


def test_bad_bodies_are_400_in_openais_shape(registry, gateway):
    server = gateway()
    with server.client(CALLER) as client:
        no_model = client.post("/api/v1/openai/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        not_json = client.post(
            "/api/v1/openai/chat/completions", content=b"{", headers={"Content-Type": "application/json"}
        )
        no_input = client.post("/api/v1/openai/embeddings", json={"model": "openai:x"})
    for response in (no_model, not_json, no_input):
        assert response.status_code == 400
        assert response.headers["Content-Type"].startswith("application/json")
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert no_model.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        openai_client(server).chat.completions.create(model="openai:gpt-4o", messages=[])


def test_a_chat_with_an_embedding_only_type_is_400(gateway):
    with pytest.raises(openai.BadRequestError):
        chat(openai_client(gateway()), "voyage:voyage-3.5")


# Who may call ------------------------------------------------------------------------------


def test_roles_below_the_gateways_are_refused_403(registry, gateway, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    client = openai_client(gateway(), api_key=token_of(registry, "reader"))
    with pytest.raises(openai.PermissionDeniedError):
        chat(client)
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="openai:text-embedding-3-small", input="a")
    assert upstream.calls == []


def test_unknown_or_revoked_tokens_and_wrong_passwords_are_401(registry, gateway):
    server = gateway()
    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(server, api_key="mpr_not-a-token-of-this-registry"))
    revoked = token_of(registry, "caller")
    token_id = client_as(registry, "service").get("/api/v1/tokens").get_json()["items"][0]["id"]
    assert client_as(registry, "service").delete(f"/api/v1/tokens/{token_id}").status_code == 204
    with pytest.raises(openai.AuthenticationError):
        chat(openai_client(server, api_key=revoked))
    wrong_password = {"Authorization": basic_auth(CALLER, "wrong")}
    response = httpx.post(f"{server.base_url}/api/v1/openai/chat/completions", json={}, headers=wrong_password)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{server.base_url}/api/v1/openai/embeddings", json={}).status_code == 401


def test_basic_credentials_of_a_caller_or_above_may_call_too(registry, gateway, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    server = gateway()
    body = {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"Authorization": basic_auth(CALLER, PASSWORDS[CALLER])}
    response = httpx.post(f"{server.base_url}/api/v1/openai/chat/completions", json=body, headers=headers)
    assert response.status_code == 200 and response.json()["model"] == "openai:gpt-4o"


# Upstream errors ---------------------------------------------------------------------------


def upstream_400_quoting_the_key(upstream):
    error = {
        "message": f"context too long for key {MODEL_KEY}",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
        "param": "messages",
    }
    upstream.answer_with(400, {"error": error})


def test_an_upstream_400_quoting_the_key_reaches_the_client_without_it(registry, fake_upstream, protocol, caplog):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream_400_quoting_the_key(upstream)
    for stream in (False, True):
        response = ask(registry, protocol, stream=stream)
        assert response.status_code == 400
        assert "context too long" in protocol.error_message(response.get_json())
        assert MODEL_KEY not in response.get_data(as_text=True)
    assert MODEL_KEY not in caplog.text


def test_an_upstream_400s_code_and_param_reach_openai_clients(registry, gateway, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream_400_quoting_the_key(upstream)
    client = openai_client(gateway())
    for call in (lambda: chat(client), lambda: client.responses.create(model="openai:gpt-4o", input="Hi")):
        with pytest.raises(openai.BadRequestError) as raised:
            call()
        assert raised.value.code == "context_length_exceeded" and raised.value.param == "messages"


def test_a_watsonx_error_quoting_its_token_reaches_the_client_without_it(registry, gateway, fake_upstream):
    upstream = fake_upstream("watsonx", api_key=WATSONX_KEY, models=["ibm/granite-3-8b-instruct"])
    register_watsonx(registry, upstream)
    server = gateway(iam=upstream)
    client = openai_client(server)
    chat(client, "watsonx:ibm/granite-3-8b-instruct")  # the token is iam-token-1 from here on
    message = f"token iam-token-1 for key {WATSONX_KEY} may not use this model"
    upstream.answer_with(400, {"errors": [{"code": "model_not_supported", "message": message}]})
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, "watsonx:ibm/granite-3-8b-instruct")
    assert raised.value.code == "model_not_supported" and "may not use this model" in raised.value.message
    assert "iam-token-1" not in raised.value.response.text and WATSONX_KEY not in raised.value.response.text
    assert WATSONX_KEY not in server.log()


def test_a_rejected_provider_key_is_a_502_not_the_clients_401(registry, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    provider_id = register(registry, upstream)
    upstream.api_key = "sk-rotated"
    response = ask(registry, protocol)
    assert response.status_code == 502 and provider_id in protocol.error_message(response.get_json())
    assert MODEL_KEY not in response.get_data(as_text=True)


def test_streams_one_after_another_reuse_the_upstreams_connection(registry, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    assert protocol.ends_properly(ask(registry, protocol, stream=True).get_data(as_text=True))
    connections = upstream.connections
    for _ in range(3):
        assert protocol.ends_properly(ask(registry, protocol, stream=True).get_data(as_text=True))
    assert upstream.connections == connections


def test_a_failure_after_the_first_chunk_is_the_protocols_error_event(registry, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.break_after_chunks = 2
    text = ask(registry, protocol, stream=True).get_data(as_text=True)
    assert protocol.stream_error(sse_documents(text)).startswith("The provider failed mid-stream")
    assert protocol.ends_properly(text)


@pytest.mark.slow
def test_a_call_over_the_gateway_timeout_is_504(registry, make_app, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.delay = 5
    started = time.monotonic()
    assert ask(make_app(REGISTRY_GATEWAY_TIMEOUT="1"), protocol).status_code == 504
    assert time.monotonic() - started < 4  # the gateway's 1 s, not the model's 5


# Streams and clients ------------------------------------------------------------------------


@pytest.mark.parametrize("keepalive", ["15", "0"], ids=["read-beside", "read-here"])
def test_a_client_that_goes_away_ends_the_upstream_stream(registry, gateway, fake_upstream, protocol, keepalive):
    upstream = fake_upstream(api_key=MODEL_KEY)
    upstream.pieces = ["tick "] * 200
    upstream.chunk_interval = 0.05
    register(registry, upstream)
    with (
        gateway(REGISTRY_GATEWAY_KEEPALIVE=keepalive).client(CALLER) as client,
        stream_from(client, protocol) as response,
    ):
        assert next(line for line in response.iter_lines() if line.startswith("data:"))
    deadline = time.monotonic() + 5
    while upstream.streams_cut_by_client == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.streams_cut_by_client == 1


class Watched(httpx2.SyncByteStream):
    """An answer's stream, each part of it shown to `watch` as the client reads it."""

    def __init__(self, stream, watch):
        self.stream, self.watch = stream, watch

    def __iter__(self):
        for part in self.stream:
            self.watch(part)
            yield part

    def close(self):
        self.stream.close()


class WatchingTransport(httpx2.HTTPTransport):
    """An official client's transport (their HTTP library is httpx2) that keeps the text of
    the answers it reads (`text`), and calls `then()` once `reached(text)` is true."""

    def __init__(self, reached, then):
        super().__init__()
        self.text, self.reached, self.then = "", reached, then

    def handle_request(self, request):
        response = super().handle_request(request)
        response.stream = Watched(response.stream, self.watch)
        return response

    def watch(self, part):
        self.text += part.decode()
        if self.reached(self.text):
            self.then()


def silent_after_first_chunk(resumed):
    """A script: a stream's first chunk, then silence until `resumed` is set (or 5 s), then the rest."""

    def script(handler, body):
        handler.start_stream()
        handler.send_events([openai_chunk({"role": "assistant", "content": "Hel"})], 0)
        resumed.wait(timeout=5)
        handler.send_events([openai_chunk({"content": "lo!"}), openai_chunk({}, "stop"), b"data: [DONE]\n\n"], 0)

    return script


def test_a_silent_model_keeps_the_stream_alive_and_the_official_clients_read_on(
    registry, gateway, fake_upstream, protocol
):
    upstream = fake_upstream(api_key=MODEL_KEY)
    resumed = threading.Event()
    upstream.script = silent_after_first_chunk(resumed)
    register(registry, upstream)
    server = gateway(REGISTRY_GATEWAY_KEEPALIVE="0.05")
    # The model goes on once the client has seen two keep-alives come while it was silent.
    transport = WatchingTransport(lambda text: keepalives(protocol, text) >= 2, resumed.set)
    with httpx2.Client(transport=transport, timeout=30) as http_client:
        text = protocol.client_stream_text(server.base_url, server.caller_token, http_client, "openai:gpt-4o")
    assert text == "Hello!" and resumed.is_set()
    assert keepalives(protocol, transport.text) >= 2


def test_a_client_gone_while_the_model_is_silent_ends_the_upstream_call_at_once(
    registry, fake_upstream, start_gunicorn
):
    """Under gunicorn's gevent worker: the keep-alive finds the client gone, and the stream's
    reader is interrupted where it waits for the silent upstream."""
    upstream = fake_upstream(api_key=MODEL_KEY)
    hung_up = threading.Event()

    def script(handler, body):
        handler.start_stream()
        handler.send_events([openai_chunk({"role": "assistant", "content": "Hel"})], 0)
        handler.connection.settimeout(30)
        with contextlib.suppress(ConnectionError):  # a reset is a hang-up too
            if handler.connection.recv(1):
                return
        hung_up.set()

    upstream.script = script
    register(registry, upstream)
    server = start_gunicorn(workers=1, REGISTRY_GATEWAY_KEEPALIVE="0.1")
    protocol = PROTOCOLS[-1]  # Anthropic's Messages, as Claude Code streams them
    with server.client(CALLER) as client, stream_from(client, protocol) as response:
        text = ""
        for part in response.iter_text():
            text += part
            if keepalives(protocol, text) >= 2:
                break
    assert wait_for(hung_up.is_set, timeout=10)


@pytest.mark.slow
def test_keep_alives_end_with_the_stream_at_the_gateway_timeout(registry, make_app, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    upstream.script = silent_after_first_chunk(threading.Event())
    register(registry, upstream)
    app = make_app(REGISTRY_GATEWAY_TIMEOUT="1", REGISTRY_GATEWAY_KEEPALIVE="0.2")
    started = time.monotonic()
    text = ask(app, protocol, stream=True).get_data(as_text=True)
    assert time.monotonic() - started < 4  # the gateway's 1 s, not the model's 5 s of silence
    assert keepalives(protocol, text) >= 2
    assert protocol.stream_error(sse_documents(text)).startswith("The model did not answer in time")
    assert protocol.ends_properly(text)


@pytest.mark.slow
def test_chunks_are_relayed_as_they_arrive(registry, gateway, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    upstream.pieces = ["a", "b", "c"]
    upstream.chunk_interval = 0.5
    register(registry, upstream)
    with gateway().client(CALLER) as client, stream_from(client, protocol) as response:
        arrivals = [time.monotonic() for line in response.iter_lines() if line.startswith("data:")]
    # Buffered, every chunk would arrive at the end at once; relayed, they keep the upstream's pace.
    assert arrivals[-1] - arrivals[0] >= 1.0


def test_the_async_client_chats_and_streams(registry, gateway, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    client = openai_client(gateway(), client_class=openai.AsyncOpenAI)

    async def chat_and_stream():
        messages = [{"role": "user", "content": "Hi"}]
        completion = await client.chat.completions.create(model="openai:gpt-4o", messages=messages)
        stream = await client.chat.completions.create(model="openai:gpt-4o", messages=messages, stream=True)
        return completion, [chunk async for chunk in stream]

    completion, chunks = asyncio.run(chat_and_stream())
    assert completion.choices[0].message.content == "Hello!" and streamed_text(chunks) == "Hello!"


@pytest.mark.slow
def test_no_database_connection_is_held_while_waiting_on_the_model(registry, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.delay = 1.0
    answers = []
    caller = threading.Thread(target=lambda: answers.append(ask(registry, protocol)))
    caller.start()
    deadline = time.monotonic() + 5
    while not upstream.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    with registry.app_context():
        held = db.engine.pool.checkedout()
    caller.join()
    assert answers[0].status_code == 200
    assert held == 0


def test_prompts_may_outgrow_the_registrys_own_64_kib_bodies_up_to_16_mib(registry, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    long_prompt = "word " * 40_000  # 200 KB
    assert ask(registry, protocol, prompt=long_prompt).status_code == 200
    assert upstream.calls[-1][2]["messages"][-1]["content"] == long_prompt
    response = ask(registry, protocol, prompt="w" * (16 * 1024 * 1024))
    assert response.status_code == 413 and protocol.error_message(response.get_json())
    assert len(upstream.calls) == 1


def test_each_call_is_counted_in_the_metrics(registry, fake_upstream, protocol):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    scrape = registry.test_client().get
    before = parse(scrape("/metrics").get_data(as_text=True))
    ask(registry, protocol, stream=True).get_data()
    assert ask(registry, protocol, "openai:no-such-model").status_code == 404
    after = parse(scrape("/metrics").get_data(as_text=True))
    labels = {"type": "openai", "model": "openai:gpt-4o"}
    assert delta(before, after, "registry_gateway_requests_total", **labels, outcome="ok") == 1
    completion_tokens = delta(before, after, "registry_gateway_tokens_total", **labels, kind="completion")
    assert completion_tokens == USAGE["completion_tokens"]
    assert delta(before, after, "registry_gateway_time_to_first_chunk_seconds_count", **labels) == 1
    unknown = {"type": "openai", "model": "unknown", "outcome": "not_found"}
    assert delta(before, after, "registry_gateway_requests_total", **unknown) == 1


# Hostile upstreams (driven in process: the real app, its real HTTP calls to fake upstreams) ---

DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


def chat_body(model="openai:gpt-4o", **fields):
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], **fields}


def embeddings_body(model="openai:text-embedding-3-small", **fields):
    return {"model": model, "input": ["a text"], **fields}


def call_model(app, body, path="chat/completions", headers=None):
    return client_as(app, CALLER).post(f"/api/v1/openai/{path}", json=body, headers=headers)


def ask(app, protocol, model="openai:gpt-4o", headers=None, **fields):
    """Ask the model for an answer to a prompt through the protocol's route, in process."""
    body = protocol.body(model, **fields)
    return client_as(app, CALLER).post(protocol.path, json=body, headers={**protocol.headers, **(headers or {})})


def stream_from(client, protocol, model="openai:gpt-4o"):
    """An httpx client's streamed answer from the protocol's route."""
    body = protocol.body(model, stream=True)
    return client.stream("POST", protocol.path, json=body, headers=protocol.headers)


def stream_documents(response):
    return sse_documents(response.get_data(as_text=True))


def events_of(response):
    """The data of each SSE event of a streamed answer."""
    return [event.removeprefix("data: ") for event in response.get_data(as_text=True).split("\n\n") if event]


def openai_chunk(delta, finish_reason=None):
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    document = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [choice],
    }
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def stream_of(*events, interval=0.0):
    """A script answering a stream of these SSE events (bytes), `interval` seconds apart."""

    def script(handler, body):
        handler.start_stream()
        handler.send_events(events, interval)

    return script


def two_providers(registry, fake_upstream):
    """(first, second, second's id): two providers of the same models, the first tried first."""
    first, second = fake_upstream(api_key=MODEL_KEY), fake_upstream(api_key=MODEL_KEY)
    register(registry, first)
    return first, second, register(registry, second)


def watsonx_server(registry, fake_upstream):
    """A watsonx provider with a key of its own (the IAM tokens of this process are cached per key)."""
    upstream = fake_upstream(
        "watsonx", api_key=f"{WATSONX_KEY}-{uuid.uuid4().hex}", models=["ibm/granite-3-8b-instruct"]
    )
    register_watsonx(registry, upstream)
    return upstream


WATSONX_MODEL = "watsonx:ibm/granite-3-8b-instruct"


@pytest.mark.slow
def test_an_answer_trickled_past_the_gateway_timeout_is_504(registry, make_app, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    completion = {"id": "c", "object": "chat.completion", "created": 1, "choices": [{"index": 0, "message": {}}]}
    upstream.script = lambda handler, body: handler.trickle(json.dumps(completion).encode(), 10, 0.3)
    app = make_app(REGISTRY_GATEWAY_TIMEOUT="1")
    started = time.monotonic()
    response = ask(app, protocol)
    assert response.status_code == 504  # each read came within any per-read timeout
    assert time.monotonic() - started < 4  # the gateway's 1 s, not the 3 s of the trickle


@pytest.mark.slow
def test_a_stream_kept_alive_by_comments_ends_at_the_gateway_timeout(registry, make_app, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.script = stream_of(openai_chunk({"content": "a"}), *[b": ping\n\n"] * 50, interval=0.2)
    app = make_app(REGISTRY_GATEWAY_TIMEOUT="1")
    started = time.monotonic()
    text = ask(app, protocol, stream=True).get_data(as_text=True)
    assert time.monotonic() - started < 5  # not the 10 s of pings
    documents = sse_documents(text)
    assert protocol.stream_text(documents) == "a"
    assert protocol.stream_error(documents).startswith("The model did not answer in time")
    assert protocol.ends_properly(text)


@pytest.mark.slow
def test_a_trickling_iam_exchange_is_bounded_by_the_gateway_timeout(registry, make_app, fake_upstream):
    upstream = watsonx_server(registry, fake_upstream)
    token = json.dumps({"access_token": "iam-token-x", "expires_in": 3600}).encode()
    upstream.iam_script = lambda handler: handler.trickle(token, 2, 0.3)  # 8 s in all
    app = make_app(REGISTRY_GATEWAY_TIMEOUT="1", REGISTRY_WATSONX_IAM_URL=upstream.iam_url)
    started = time.monotonic()
    assert call_model(app, chat_body(WATSONX_MODEL)).status_code == 504
    assert time.monotonic() - started < 4


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-closed"])
def test_an_answer_over_16_mib_fails_the_provider_for_the_next(registry, fake_upstream, protocol, declared):
    first, second, second_id = two_providers(registry, fake_upstream)
    big = b'{"object": "chat.completion", "choices": [], "pad": "' + b"z" * (17 * 1024 * 1024) + b'"}'

    def answer_too_much(upstream):
        if declared:
            upstream.answer_with(200, big)
        else:
            upstream.script = lambda handler, body: handler.trickle(big, 1024 * 1024, 0)

    answer_too_much(first)
    response = ask(registry, protocol)
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == second_id
    answer_too_much(second)
    response = ask(registry, protocol)
    assert response.status_code == 502 and "over 16 MiB" in protocol.error_message(response.get_json())


def test_a_stream_line_without_end_fails_the_provider_for_the_next(registry, fake_upstream, protocol):
    first, second, second_id = two_providers(registry, fake_upstream)
    first.script = stream_of(b"data: ", *[b"x" * 65536] * 40)  # 2.5 MiB and no line end
    response = ask(registry, protocol, stream=True)
    assert response.headers["X-Registry-Provider-Id"] == second_id
    assert protocol.stream_text(stream_documents(response)) == "Hello!"


def test_a_stream_line_without_end_after_the_first_chunk_is_an_error_event(registry, fake_upstream, protocol):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.script = stream_of(openai_chunk({"content": "a"}), b"data: ", *[b"x" * 65536] * 40)
    text = ask(registry, protocol, stream=True).get_data(as_text=True)
    documents = sse_documents(text)
    assert protocol.stream_text(documents) == "a" and "over 1048576 bytes" in protocol.stream_error(documents)
    assert protocol.ends_properly(text)


KEY_AS_BASE64 = base64.b64encode(f"Bearer {MODEL_KEY}".encode()).decode()
KEY_RUN = 12  # this many characters of the key in a row must never reach a client
# The key after 40 bytes, in base64 wrapped at 76 characters as MIME wraps it: the key straddles a line break.
KEY_IN_WRAPPED_BASE64 = base64.encodebytes(b"Authorization: Basic x" * 2 + f"Bearer {MODEL_KEY}".encode()).decode()


def base64_texts(text):
    """What each long run of base64 characters in `text` decodes to, at each of its 4 alignments."""
    decoded = []
    for run in re.findall(r"[A-Za-z0-9+/_-]{16,}", re.sub(r"\s|\\+[nrt]", "", text)):
        for offset in range(4):
            piece = run[offset:][: (len(run) - offset) // 4 * 4].replace("-", "+").replace("_", "/")
            decoded.append(base64.b64decode(piece).decode("latin-1"))
    return decoded


def key_shows_in(text):
    """Whether KEY_RUN characters of the key in a row show in the text: as sent, JSON-escaped,
    URL-encoded or in base64 (line breaks ignored), case ignored."""
    unescaped = re.sub(r"\\+u([0-9a-fA-F]{4})", lambda escape: chr(int(escape[1], 16)), text)
    forms = [text, unquote(text), unquote(unescaped), *base64_texts(text)]
    runs = [MODEL_KEY[start : start + KEY_RUN].lower() for start in range(len(MODEL_KEY) - KEY_RUN + 1)]
    return any(run in form.lower() for form in forms for run in runs)


@pytest.mark.parametrize(
    "error_body",
    [
        b"x" * 1990 + MODEL_KEY.encode(),
        json.dumps({"error": {"message": "bad", "param": {"k": MODEL_KEY}, "code": [MODEL_KEY]}}).encode(),
        json.dumps({"error": {"message": "Bearer%20" + MODEL_KEY.replace("-", "%2D")}}).encode(),
        json.dumps(
            {"error": {"message": "sent key=" + "".join(f"%{byte:02x}" for byte in MODEL_KEY.encode())}}
        ).encode(),
        json.dumps({"error": {"message": f"Authorization: Basic {KEY_AS_BASE64}"}}).encode(),
        json.dumps({"error": {"message": "y" * 5_000_000 + MODEL_KEY}}).encode(),
        json.dumps({"error": {"message": {"echo": MODEL_KEY}, "type": f"t {MODEL_KEY}"}}).encode(),
        ('{"detail": "invalid key ' + "".join(f"\\u{ord(character):04x}" for character in MODEL_KEY) + '"}').encode(),
        json.dumps({"detail": f"request headers: {KEY_IN_WRAPPED_BASE64}"}).encode(),
        json.dumps({"error": {"message": f"Incorrect API key provided: {MODEL_KEY[:-4]}****"}}).encode(),
        json.dumps({"error": {"message": f"bad key {MODEL_KEY[:12]}", "type": MODEL_KEY[12:]}}).encode(),
    ],
    ids=[
        "text-cut-at-the-key",
        "param-and-code-objects",
        "url-encoded",
        "percent-encoded",
        "base64",
        "5-mb",
        "objects",
        "json-escaped-detail",
        "base64-wrapped-at-76",
        "last-4-masked",
        "split-across-message-and-type",
    ],
)
def test_an_upstream_4xx_reaches_the_client_without_the_key_in_any_form(registry, fake_upstream, protocol, error_body):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.answer_with(400, error_body)
    response = ask(registry, protocol)
    assert response.status_code == 400
    text = response.get_data(as_text=True)
    assert not key_shows_in(text)
    assert len(protocol.error_message(response.get_json())) <= 2000
    assert all(isinstance(value, str | None) for value in response.get_json()["error"].values())


REFLECTED = f"You sent Authorization: Bearer {MODEL_KEY}."


@pytest.mark.parametrize("padding", [0, 15 * 1024 * 1024], ids=["short", "15-mib"])
def test_an_answer_reflecting_the_key_reaches_the_client_without_it(registry, fake_upstream, padding):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.pieces = ["y" * padding, REFLECTED]
    response = call_model(registry, chat_body())
    assert response.status_code == 200
    content = response.get_json()["choices"][0]["message"]["content"]
    assert content.endswith("You sent Authorization: Bearer [redacted].") and not key_shows_in(content[-1000:])


def test_a_stream_chunk_reflecting_the_key_is_relayed_without_it(registry, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.pieces = ["Hel", REFLECTED, f"and as JSON: {json.dumps({'key': MODEL_KEY})}"]
    response = call_model(registry, chat_body(stream=True))
    text = "".join(json.loads(event)["choices"][0]["delta"].get("content", "") for event in events_of(response)[:-1])
    assert text.startswith("HelYou sent Authorization: Bearer [redacted].") and not key_shows_in(
        response.get_data(as_text=True)
    )


def test_a_watsonx_answer_reflecting_its_token_reaches_the_client_without_it(registry, make_app, fake_upstream):
    upstream = watsonx_server(registry, fake_upstream)
    upstream.pieces = ["Your token: ", "iam-token-1"]
    response = call_model(make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url), chat_body(WATSONX_MODEL))
    assert response.status_code == 200
    assert response.get_json()["choices"][0]["message"]["content"] == "Your token: [redacted]"


def test_a_watsonx_stream_error_quoting_its_token_is_relayed_without_it(registry, make_app, fake_upstream):
    upstream = watsonx_server(registry, fake_upstream)
    chunk = {"id": "c", "model_id": "ibm/granite-3-8b-instruct", "choices": [{"index": 0, "delta": {"content": "a"}}]}
    upstream.script = stream_of(
        b"event: message\ndata: " + json.dumps(chunk).encode() + b"\n\n",
        b'event: error\ndata: {"error": "token iam-token-1 expired"}\n\n',
    )
    app = make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url)
    response = call_model(app, chat_body(WATSONX_MODEL, stream=True))
    events = events_of(response)
    assert "token [redacted] expired" in json.loads(events[1])["error"]["message"]
    assert "iam-token-1" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "path, body, answer",
    [
        ("chat/completions", chat_body(), json.dumps({"error": {"message": f"invalid key {MODEL_KEY}"}}).encode()),
        ("chat/completions", chat_body(), b"{}"),
        ("chat/completions", chat_body(), b"[]"),
        ("chat/completions", chat_body(), b'{"choices": [], "usage": "x"}'),
        ("chat/completions", chat_body(), b'{"choices": ["x"]}'),
        ("chat/completions", chat_body(), b'{"choices": [], "temperature": NaN}'),
        ("chat/completions", chat_body(), DEEP_JSON),
        ("embeddings", embeddings_body(), b'{"data": ["x"]}'),
        ("embeddings", embeddings_body(encoding_format="base64"), b'{"data": [{"embedding": ["a"]}]}'),
        ("embeddings", embeddings_body(encoding_format="base64"), b'{"data": [{"embedding": [1e300]}]}'),
        ("embeddings", embeddings_body(), b'{"data": [{"embedding": "not base64!"}]}'),
        ("embeddings", embeddings_body(), b'{"data": [{"embedding": [0.5]}], "usage": {"total_tokens": "x"}}'),
        ("chat/completions", chat_body(), b'{"choices": [], "usage": {"prompt_tokens": 1' + b"0" * 400 + b"}}"),
        ("chat/completions", chat_body(), b'{"choices": [], "usage": {"completion_tokens": 9007199254740993}}'),
        ("embeddings", embeddings_body(), b'{"data": [], "usage": {"prompt_tokens": 1' + b"0" * 308 + b"}}"),
    ],
)
def test_an_answer_of_the_wrong_shape_fails_the_provider_for_the_next(registry, fake_upstream, path, body, answer):
    first, second, second_id = two_providers(registry, fake_upstream)
    first.answer_with(200, answer)
    response = call_model(registry, body, path)
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == second_id
    second.answer_with(200, answer)
    response = call_model(registry, body, path)
    assert response.status_code == 502 and "SECRET" not in response.get_data(as_text=True)


@pytest.mark.parametrize("retry_after", ["9" * 5000, "\u00b2", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_retry_after_the_registry_cannot_pass_on_is_left_out(registry, fake_upstream, retry_after):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.answer_with(429, b"{}", {"Retry-After": retry_after})
    response = call_model(registry, chat_body())
    assert response.status_code == 429 and "Retry-After" not in response.headers


def test_an_upstream_400_nested_too_deep_is_passed_on_as_its_text(registry, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.answer_with(400, DEEP_JSON)
    response = call_model(registry, chat_body())
    assert response.status_code == 400 and response.get_json()["error"]["message"] == "[" * 2000


@pytest.mark.parametrize(
    "path, body, status, answer, expected",
    [
        ("chat/completions", chat_body(WATSONX_MODEL), 400, {"errors": ["bad token iam-token-1"]}, 400),
        ("chat/completions", chat_body(WATSONX_MODEL), 200, {"choices": ["x"]}, 502),
        ("chat/completions", chat_body(WATSONX_MODEL), 302, {}, 502),
        ("embeddings", embeddings_body("watsonx:ibm/granite-3-8b-instruct"), 200, {"results": ["x"]}, 502),
        ("embeddings", embeddings_body("watsonx:ibm/granite-3-8b-instruct"), 200, {"results": [{}]}, 502),
        (
            "embeddings",
            embeddings_body("watsonx:ibm/granite-3-8b-instruct"),
            200,
            {"results": [{"embedding": [0.5]}], "input_token_count": 2**53 + 1},
            502,
        ),
    ],
)
def test_watsonx_answers_of_the_wrong_shape(registry, make_app, fake_upstream, path, body, status, answer, expected):
    upstream = watsonx_server(registry, fake_upstream)
    upstream.answer_with(status, json.dumps(answer).encode(), {"Location": "http://127.0.0.1:1/"})
    response = call_model(make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url), body, path)
    assert response.status_code == expected and "iam-token-1" not in response.get_data(as_text=True)


@pytest.mark.parametrize("token_answer", [{"access_token": "t", "expires_in": "soon"}, {"access_token": ["t"]}, []])
def test_an_iam_answer_without_a_usable_token_is_502(registry, make_app, fake_upstream, token_answer):
    upstream = watsonx_server(registry, fake_upstream)
    upstream.iam_script = lambda handler: handler.answer(200, token_answer)
    response = call_model(make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url), chat_body(WATSONX_MODEL))
    assert response.status_code == 502


def test_iam_refusing_the_key_is_a_502_not_the_clients_400(registry, make_app, fake_upstream):
    upstream = watsonx_server(registry, fake_upstream)
    upstream.api_key = "another-key"  # IAM answers 400: "Provided API key could not be found."
    response = call_model(make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url), chat_body(WATSONX_MODEL))
    assert response.status_code == 502 and "IAM refused the key" in response.get_json()["error"]["message"]


def test_a_watsonx_token_refused_is_exchanged_anew_on_the_next_call(registry, make_app, fake_upstream):
    upstream = watsonx_server(registry, fake_upstream)
    app = make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url)
    assert call_model(app, chat_body(WATSONX_MODEL)).status_code == 200
    upstream.tokens.clear()  # watsonx no longer takes the token (revoked): 401
    assert call_model(app, chat_body(WATSONX_MODEL)).status_code == 502
    assert call_model(app, chat_body(WATSONX_MODEL)).status_code == 200
    assert upstream.iam_exchanges == 2


def test_iam_expires_in_is_preferred_to_its_expiration(registry, make_app, fake_upstream):
    upstream = watsonx_server(registry, fake_upstream)

    def token_with_a_clock_behind(handler):
        upstream.iam_exchanges += 1
        upstream.tokens.add("iam-token-skewed")
        answer = {"access_token": "iam-token-skewed", "expires_in": 3600, "expiration": int(time.time()) - 600}
        handler.answer(200, answer)

    upstream.iam_script = token_with_a_clock_behind
    app = make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url)
    assert [call_model(app, chat_body(WATSONX_MODEL)).status_code for _ in range(2)] == [200, 200]
    assert upstream.iam_exchanges == 1


def test_a_stream_failing_before_its_first_chunk_goes_to_the_next_provider(registry, fake_upstream, protocol):
    first, second, second_id = two_providers(registry, fake_upstream)
    first.script = stream_of(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    response = ask(registry, protocol, stream=True)
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == second_id
    documents = stream_documents(response)
    assert protocol.stream_text(documents) == "Hello!" and protocol.stream_error(documents) is None


@pytest.mark.parametrize("chunks_first", [0, 1])
def test_an_upstream_error_ending_a_sentence_gets_no_second_full_stop(registry, fake_upstream, chunks_first):
    """Before the first chunk every provider failed (a 502); after it, an error event."""
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    error_event = b'data: {"error": "Overloaded, try again."}\n\n'
    upstream.script = stream_of(*[openai_chunk({"content": "a"})] * chunks_first, error_event)
    response = call_model(registry, chat_body(stream=True))
    if chunks_first:
        message = json.loads(events_of(response)[-2])["error"]["message"]
    else:
        assert response.status_code == 502
        message = response.get_json()["error"]["message"]
    assert message.endswith(": Overloaded, try again.")


def test_an_upstream_redirect_fails_the_provider_for_the_next(registry, fake_upstream):
    first, second, second_id = two_providers(registry, fake_upstream)
    redirect = {"Location": f"{second.base_url}/chat/completions"}
    first.answer_with(302, b"{}", redirect)
    response = call_model(registry, chat_body())
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == second_id
    second.answer_with(302, b"{}", redirect)
    assert call_model(registry, chat_body()).status_code == 502


def test_the_log_line_of_a_stream_carries_its_request_id_and_user(registry, fake_upstream, protocol, caplog):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    with caplog.at_level(logging.INFO, logger="gateway"):
        ask(registry, protocol, stream=True, headers={"X-Request-ID": "stream-request-1"}).get_data()
    [line] = [record for record in caplog.records if record.getMessage().startswith(f"gateway {protocol.kind} stream")]
    assert (line.request_id, line.user) == ("stream-request-1", CALLER)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize(
    "path, body",
    [
        (
            "chat/completions",
            '{"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "temperature": %s}',
        ),
        (
            "chat/completions",
            '{"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi", "weight": [%s]}]}',
        ),
        ("embeddings", '{"model": "openai:text-embedding-3-small", "input": ["a"], "dimensions": %s}'),
    ],
    ids=["temperature", "nested", "embeddings"],
)
def test_a_number_json_cannot_carry_is_a_400_before_any_upstream(registry, fake_upstream, path, body, number):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    response = client_as(registry, CALLER).post(
        f"/api/v1/openai/{path}", data=body % number, content_type="application/json"
    )
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and number.lstrip("-") in error["message"]
    assert upstream.calls == []


def test_a_stream_whose_usage_is_out_of_range_ends_in_an_error_yet_is_logged_and_counted(
    registry, fake_upstream, caplog
):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    huge = b'{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [], '
    huge += b'"usage": {"prompt_tokens": 1' + b"0" * 400 + b', "completion_tokens": 3, "total_tokens": 3}}'
    done = openai_chunk({}, "stop")
    upstream.script = stream_of(openai_chunk({"content": "a"}), done, b"data: " + huge + b"\n\n", b"data: [DONE]\n\n")
    before = parse(scrape(client_as(registry, "reader")))
    with caplog.at_level(logging.INFO, logger="gateway"):
        response = call_model(registry, chat_body(stream=True, stream_options={"include_usage": True}))
        events = events_of(response)
    assert events[-1] == "[DONE]" and "usage" in json.loads(events[-2])["error"]["message"]
    [line] = [record.getMessage() for record in caplog.records if record.getMessage().startswith("gateway chat stream")]
    assert "outcome=upstream_error" in line
    after = parse(scrape(client_as(registry, "reader")))
    labels = {"type": "openai", "model": "openai:gpt-4o"}
    assert delta(before, after, "registry_gateway_requests_total", **labels, outcome="upstream_error") == 1
    assert delta(before, after, "registry_gateway_tokens_total", **labels, kind="prompt") == 0


def test_a_model_id_not_found_is_said_in_one_sentence(registry, fake_upstream):
    register(registry, fake_upstream(api_key=MODEL_KEY))
    response = call_model(registry, chat_body("gpt-4o"))
    assert response.status_code == 404 and not response.get_json()["error"]["message"].endswith("..")


def test_a_provider_key_that_cannot_be_opened_fails_only_that_provider(registry, fake_upstream):
    first, second = fake_upstream(api_key=MODEL_KEY), fake_upstream(api_key=MODEL_KEY)
    first_id = register(registry, first)
    second_id = register(registry, second)
    with registry.app_context():
        unopenable = sa.update(ModelProvider).where(ModelProvider.id == first_id).values(sealed_api_key="not-fernet")
        db.session.execute(unopenable)
        db.session.commit()
    response = call_model(registry, chat_body())
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == second_id


def test_an_empty_model_is_400(registry):
    response = call_model(registry, chat_body(""))
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "model"


def test_a_cookie_an_upstream_sets_is_not_sent_with_later_calls(registry, fake_upstream):
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    upstream.fail_with(400, headers={"Set-Cookie": "affinity=the-first-caller; Path=/"})
    for _ in range(2):
        assert call_model(registry, chat_body()).status_code == 400
    assert [headers.get("Cookie") for _, headers, _ in upstream.calls] == [None, None]
