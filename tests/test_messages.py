"""Anthropic's Messages API through the registry: the real `anthropic` client through gunicorn
against each upstream format (OpenAI-compatible, watsonx, Anthropic), and the protocol's
details driven in process (the real app, its real HTTP calls to the fake upstreams)."""

import base64
import json
import uuid

import anthropic
import httpx
import openai
import pytest
import sqlalchemy as sa

from models import USAGE_EVENTS, db
from tests.conftest import PASSWORDS, basic_auth, client_as, token_of
from tests.fakes.model import TOOL_ARGUMENTS, USAGE
from tests.fakes.server import sse_event
from tests.test_gateway import CALLER, MODEL_KEY, register, register_watsonx, set_state
from tests.test_metrics import delta, parse

MESSAGES = "/api/v1/anthropic/v1/messages"
MODELS = {"openai": "gpt-4o", "watsonx": "ibm/granite-3-8b-instruct", "anthropic": "claude-sonnet-4"}
FLAVORS = tuple(MODELS)
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
PIXEL_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n pixel").decode()


def provider_of(registry, fake_upstream, flavor):
    """(upstream, registry model id, provider id): a provider of the flavor, its models indexed.
    watsonx keys differ per test, as the process keeps its IAM tokens per key."""
    upstream = fake_upstream(flavor, api_key=f"{MODEL_KEY}-{uuid.uuid4().hex[:8]}", models=[MODELS[flavor]])
    provider_id = register_watsonx(registry, upstream) if flavor == "watsonx" else register(registry, upstream)
    return upstream, f"{flavor}:{MODELS[flavor]}", provider_id


def app_for(make_app, upstream):
    """The app that calls the upstream (watsonx's IAM is the fake's)."""
    return make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url)


def messages_body(model, **fields):
    return {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}], **fields}


def post_messages(app, body, headers=None, path=MESSAGES):
    return client_as(app, CALLER).post(path, json=body, headers=headers)


def events_of(response):
    """(name, document) of each SSE event of a streamed answer."""
    events = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if block:
            name_line, data_line = block.split("\n")
            events.append((name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return events


def streamed_message(events):
    """The message the events make, as the anthropic client accumulates it."""
    message, tool_inputs = None, {}
    for name, document in events:
        if name == "message_start":
            message = document["message"]
        elif name == "content_block_start":
            message["content"].append(dict(document["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][document["index"]], document["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                tool_inputs[document["index"]] = tool_inputs.get(document["index"], "") + delta["partial_json"]
        elif name == "message_delta":
            message.update(document["delta"])
            message["usage"] = {**message["usage"], **document["usage"]}
    for index, partial_json in tool_inputs.items():
        message["content"][index]["input"] = json.loads(partial_json)
    return message


def last_call(upstream):
    return upstream.calls[-1]


def claude_message(**fields):
    """A message as Anthropic answers it, or starts a stream with."""
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": MODELS["anthropic"], "content": []}
    return {
        **message,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 7, "output_tokens": 1},
        **fields,
    }


def answering_events(upstream, events):
    """The upstream answers every call with a stream of these events (documents)."""
    upstream.script = lambda handler, body: handler.stream(
        [sse_event(event, event.get("type")) for event in events], body
    )


def second_anthropic_provider(registry, fake_upstream, first):
    """The id of a second provider of the first's model, tried after it."""
    return register(registry, fake_upstream("anthropic", api_key=first.api_key, models=[MODELS["anthropic"]]))


# The anthropic client, through gunicorn ----------------------------------------------------


def anthropic_client(server, **options):
    """The anthropic client as Claude Code points it at the registry: the token as its auth token."""
    options.setdefault("auth_token", server.caller_token)
    return anthropic.Anthropic(base_url=f"{server.base_url}/api/v1/anthropic", max_retries=0, timeout=30, **options)


def tool_round_trip(client, model, **options):
    """A tool call, its result, then the answer, as the anthropic client makes them:
    (the message calling the tool, the answer)."""
    asked = client.messages.create(model=model, max_tokens=100, tools=[WEATHER_TOOL], messages=[QUESTION], **options)
    tool_use = next(block for block in asked.content if block.type == "tool_use")
    result = {"type": "tool_result", "tool_use_id": tool_use.id, "content": "Sunny, 21 C"}
    conversation = [QUESTION, {"role": "assistant", "content": asked.content}, {"role": "user", "content": [result]}]
    answer = client.messages.create(model=model, max_tokens=100, tools=[WEATHER_TOOL], messages=conversation)
    return asked, answer


def streamed_round_trip(client, model):
    with client.messages.stream(model=model, max_tokens=100, tools=[WEATHER_TOOL], messages=[QUESTION]) as stream:
        asked = stream.get_final_message()
    tool_use = next(block for block in asked.content if block.type == "tool_use")
    result = {"type": "tool_result", "tool_use_id": tool_use.id, "content": "Sunny, 21 C"}
    conversation = [QUESTION, {"role": "assistant", "content": asked.content}, {"role": "user", "content": [result]}]
    with client.messages.stream(model=model, max_tokens=100, tools=[WEATHER_TOOL], messages=conversation) as stream:
        text = "".join(stream.text_stream)
        answer = stream.get_final_message()
    return asked, answer, text


def assert_tool_round_trip(asked, answer, model):
    tool_use = next(block for block in asked.content if block.type == "tool_use")
    assert asked.model == answer.model == model
    assert asked.stop_reason == "tool_use" and tool_use.name == "get_weather"
    assert tool_use.input == json.loads(TOOL_ARGUMENTS)
    assert answer.stop_reason == "end_turn" and answer.content[-1].text == "Hello!"
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
    )


def tool_result_sent(upstream, flavor):
    """The tool's result as the last call carried it, in the upstream's own shape."""
    messages = last_call(upstream)[2]["messages"]
    if flavor == "anthropic":
        return messages[-1]["content"][0]["content"]
    tool_message = next(message for message in messages if message["role"] == "tool")
    return tool_message["content"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_anthropic_client_round_trips_a_tool_call(registry, gateway, fake_upstream, flavor):
    upstream, model, provider_id = provider_of(registry, fake_upstream, flavor)
    server = gateway(iam=upstream)
    before = parse(httpx.get(f"{server.base_url}/metrics").text)
    with anthropic_client(server) as client:
        raw = client.messages.with_raw_response.create(model=model, max_tokens=100, messages=[QUESTION])
        assert raw.headers["X-Registry-Provider-Id"] == provider_id and raw.parse().content[0].text == "Hello!"
        assert_tool_round_trip(*tool_round_trip(client, model), model)
        assert tool_result_sent(upstream, flavor) == "Sunny, 21 C"
        asked, answer, text = streamed_round_trip(client, model)
        assert_tool_round_trip(asked, answer, model)
        assert text == "Hello!"
    after = parse(httpx.get(f"{server.base_url}/metrics").text)
    labels = {"type": flavor, "model": model}
    assert delta(before, after, "registry_gateway_requests_total", **labels, outcome="ok") == 5
    completion_tokens = delta(before, after, "registry_gateway_tokens_total", **labels, kind="completion")
    assert completion_tokens == 5 * USAGE["completion_tokens"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_anthropic_client_gets_stop_reasons_and_sends_images(registry, gateway, fake_upstream, flavor):
    upstream, model, _ = provider_of(registry, fake_upstream, flavor)
    with anthropic_client(gateway(iam=upstream)) as client:
        cut = client.messages.create(model=model, max_tokens=1, messages=[QUESTION])
        assert cut.stop_reason == "max_tokens" and cut.content[0].text == "Hel"
        stopped = client.messages.create(model=model, max_tokens=100, messages=[QUESTION], stop_sequences=["lo"])
        assert stopped.content[0].text == "Hel"
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL_PNG}}
        looked = client.messages.create(
            model=model,
            max_tokens=100,
            messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
        )
        assert looked.content[0].text == "Hello!"
    sent = last_call(upstream)[2]["messages"][-1]["content"][0]
    if flavor == "anthropic":
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "lo"
        assert sent == image
    else:  # an OpenAI stop says not whether a sequence stopped it
        assert stopped.stop_reason == "end_turn" and upstream.calls[-2][2]["stop"] == ["lo"]
        assert sent == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL_PNG}"}}


def test_the_anthropic_client_raises_its_own_errors(registry, gateway, fake_upstream):
    upstream, model, _ = provider_of(registry, fake_upstream, "openai")
    server = gateway()
    with anthropic_client(server) as client:
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(model="openai:no-such-model", max_tokens=10, messages=[QUESTION])
        with pytest.raises(anthropic.BadRequestError):
            client.messages.create(model=model, max_tokens=10, messages=[])
        upstream.fail_with(503)
        with pytest.raises(anthropic.APIStatusError) as raised:
            client.messages.create(model=model, max_tokens=10, messages=[QUESTION])
        assert raised.value.status_code == 502 and raised.value.body["error"]["type"] == "api_error"
    for token, error in (
        ("mpr_not-a-token", anthropic.AuthenticationError),
        (token_of(registry, "reader"), anthropic.PermissionDeniedError),
    ):
        with anthropic_client(server, auth_token=token) as client, pytest.raises(error):
            client.messages.create(model=model, max_tokens=10, messages=[QUESTION])


def test_claude_codes_request_passes_with_its_beta_query_and_headers(registry, gateway, fake_upstream):
    """Claude Code posts to /v1/messages?beta=true with its beta headers and a Bearer token."""
    upstream, model, _ = provider_of(registry, fake_upstream, "anthropic")
    server = gateway()
    headers = {
        "Authorization": f"Bearer {server.caller_token}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    }
    body = messages_body(model, stream=True, thinking={"type": "enabled", "budget_tokens": 1024})
    response = httpx.post(f"{server.base_url}{MESSAGES}?beta=true", json=body, headers=headers, timeout=30)
    assert response.status_code == 200 and "event: message_stop" in response.text
    _, sent_headers, sent_body = last_call(upstream)
    assert sent_headers["anthropic-beta"] == headers["anthropic-beta"]
    assert sent_body["thinking"] == body["thinking"]


# The token, as x-api-key or Bearer ---------------------------------------------------------


def test_the_token_may_come_as_x_api_key_or_bearer(registry, fake_upstream):
    _, model, _ = provider_of(registry, fake_upstream, "openai")
    token = token_of(registry, "caller")
    anonymous = registry.test_client()
    for headers in ({"x-api-key": token}, {"Authorization": f"Bearer {token}"}):
        response = anonymous.post(MESSAGES, json=messages_body(model), headers=headers)
        assert response.status_code == 200, response.get_json()
    wrong = anonymous.post(MESSAGES, json=messages_body(model), headers={"x-api-key": "mpr_not-a-token"})
    assert wrong.status_code == 401 and wrong.get_json()["error"]["type"] == "authentication_error"


def test_x_api_key_is_not_a_token_outside_the_anthropic_prefix(registry, fake_upstream):
    token = token_of(registry, "caller")
    body = {"model": "openai:gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    response = registry.test_client().post("/api/v1/openai/chat/completions", json=body, headers={"x-api-key": token})
    assert response.status_code == 401
    assert registry.test_client().get("/api/v1/model_providers", headers={"x-api-key": token}).status_code == 401


def test_basic_credentials_may_call_too(registry, fake_upstream):
    _, model, _ = provider_of(registry, fake_upstream, "openai")
    headers = {"Authorization": basic_auth(CALLER, PASSWORDS[CALLER])}
    assert registry.test_client().post(MESSAGES, json=messages_body(model), headers=headers).status_code == 200


# Errors in Anthropic's shape ---------------------------------------------------------------


def assert_anthropic_error(response, status, error_type):
    assert response.status_code == status, response.get_data(as_text=True)
    document = response.get_json()
    assert document["type"] == "error" and document["error"]["type"] == error_type, document
    assert isinstance(document["error"]["message"], str) and document["error"]["message"]


def test_unknown_paths_under_the_prefix_are_404_in_anthropics_shape(registry):
    caller = client_as(registry, CALLER)
    for path in ("/api/v1/anthropic/v1/nothing", "/api/v1/anthropic/", "/api/v1/anthropic/v1/messages/batches"):
        assert_anthropic_error(caller.post(path, json={}), 404, "not_found_error")
    assert_anthropic_error(caller.get(MESSAGES), 405, "invalid_request_error")


def test_who_may_not_call_is_told_in_anthropics_shape(registry):
    response = registry.test_client().post(MESSAGES, json=messages_body("openai:gpt-4o"))
    assert_anthropic_error(response, 401, "authentication_error")
    assert response.headers.getlist("WWW-Authenticate")
    reader = {"Authorization": f"Bearer {token_of(registry, 'reader')}"}
    response = registry.test_client().post(MESSAGES, json=messages_body("openai:gpt-4o"), headers=reader)
    assert_anthropic_error(response, 403, "permission_error")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"max_tokens": 10, "messages": [QUESTION]}, "model"),
        ({"model": "openai:gpt-4o", "messages": [QUESTION]}, "max_tokens"),
        ({"model": "openai:gpt-4o", "max_tokens": 10, "messages": []}, "messages"),
        (messages_body("openai:gpt-4o", max_tokens="10"), "max_tokens"),
        (messages_body("openai:gpt-4o", max_tokens=0), "max_tokens"),
        (messages_body("openai:gpt-4o", max_tokens=10.5), "max_tokens"),
        (messages_body("openai:gpt-4o", messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
        (messages_body("openai:gpt-4o", messages=[{"role": "user", "content": 7}]), "messages.0.content"),
        (
            messages_body("openai:gpt-4o", messages=[{"role": "user", "content": [{"text": "x"}]}]),
            "messages.0.content.0",
        ),
        (
            messages_body("openai:gpt-4o", messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            "messages.0.content.0.text",
        ),
        (
            messages_body("openai:gpt-4o", messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
            "messages.0.content.0.source.type",
        ),
        (
            messages_body("openai:gpt-4o", messages=[{"role": "assistant", "content": [{"type": "tool_use"}]}]),
            "messages.0.content.0.id",
        ),
        (messages_body("openai:gpt-4o", system=[{"type": "image"}]), "system.0"),
        (messages_body("openai:gpt-4o", system={"text": "x"}), "system"),
        (messages_body("openai:gpt-4o", tools=[{"description": "no name"}]), "tools.0.name"),
        (messages_body("openai:gpt-4o", tool_choice={"type": "tool"}), "tool_choice.name"),
        (messages_body("openai:gpt-4o", tool_choice={"type": "sometimes"}), "tool_choice.type"),
        (messages_body("openai:gpt-4o", stop_sequences="END"), "stop_sequences"),
        (messages_body("openai:gpt-4o", temperature=1.5), "temperature"),
        (messages_body("openai:gpt-4o", stream="yes please"), "stream"),
    ],
)
def test_a_bad_body_is_400_naming_the_field(registry, body, field):
    response = post_messages(registry, body)
    assert_anthropic_error(response, 400, "invalid_request_error")
    assert f" {field}:" in response.get_json()["error"]["message"]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"model": "openai:gpt-4o", "max_tokens": 10, "messages": [], "temperature": NaN}',
        b'{"model": "openai:gpt-4o", "max_tokens": 1e999, "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "openai:gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "top_p": -Inf'
        + b"inity}",
        b'{"model": "openai:gpt-4o", "max_tokens": 10, "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"model": "openai:gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "top_k": 1e400}',
        b"[1, 2]",
        b"{",
    ],
)
def test_hostile_bodies_are_400_never_500(registry, fake_upstream, payload):
    provider_of(registry, fake_upstream, "openai")
    response = client_as(registry, CALLER).post(MESSAGES, data=payload, headers={"Content-Type": "application/json"})
    assert_anthropic_error(response, 400, "invalid_request_error")


def test_a_body_too_large_or_not_json_is_refused_in_anthropics_shape(registry):
    caller = client_as(registry, CALLER)
    response = caller.post(MESSAGES, data=b"x", headers={"Content-Type": "text/plain"})
    assert_anthropic_error(response, 415, "invalid_request_error")
    huge = {**messages_body("openai:gpt-4o"), "pad": "z" * (17 * 1024 * 1024)}
    assert_anthropic_error(caller.post(MESSAGES, json=huge), 413, "request_too_large")


def test_routing_errors_are_in_anthropics_shape(registry, fake_upstream):
    upstream, model, provider_id = provider_of(registry, fake_upstream, "openai")
    assert_anthropic_error(post_messages(registry, messages_body("openai:no-such-model")), 404, "not_found_error")
    assert_anthropic_error(post_messages(registry, messages_body("voyage:voyage-3")), 400, "invalid_request_error")
    upstream.fail_with(429, headers={"Retry-After": "7"})
    response = post_messages(registry, messages_body(model))
    assert_anthropic_error(response, 429, "rate_limit_error")
    assert response.headers["Retry-After"] == "7"
    upstream.fail_with(500)
    assert_anthropic_error(post_messages(registry, messages_body(model)), 502, "api_error")
    set_state(registry, provider_id, "offline")
    assert_anthropic_error(post_messages(registry, messages_body(model)), 503, "overloaded_error")


@pytest.mark.parametrize("flavor", ["openai", "anthropic"])
def test_an_upstream_4xx_is_passed_on_without_the_key(registry, fake_upstream, flavor):
    upstream, model, _ = provider_of(registry, fake_upstream, flavor)
    upstream.fail_with(400, f"prompt is too long for key {upstream.api_key}")
    response = post_messages(registry, messages_body(model))
    assert_anthropic_error(response, 400, "invalid_request_error")
    message = response.get_json()["error"]["message"]
    assert "prompt is too long" in message and upstream.api_key not in message


# What each upstream is sent ------------------------------------------------------------------


def test_an_anthropic_upstream_gets_the_body_as_sent_with_the_beta_header(registry, fake_upstream):
    upstream, model, provider_id = provider_of(registry, fake_upstream, "anthropic")
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    body = messages_body(
        model,
        system=system,
        thinking={"type": "enabled", "budget_tokens": 2048},
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
        metadata={"user_id": "someone"},
        vendor_extension={"a": [1, 2]},
        top_k=5,
    )
    response = post_messages(registry, body, headers={"anthropic-beta": "context-management-2025-06-27"})
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == provider_id
    path, headers, sent = last_call(upstream)
    assert path == "/v1/messages"
    assert headers["x-api-key"] == upstream.api_key and headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "context-management-2025-06-27" and "Authorization" not in headers
    assert sent == {**body, "model": MODELS["anthropic"], "stream": False}


@pytest.mark.parametrize("flavor, passed_on", [("openai", False), ("watsonx", False), ("anthropic", True)])
def test_top_k_reaches_only_anthropic_upstreams(registry, make_app, fake_upstream, flavor, passed_on):
    upstream, model, _ = provider_of(registry, fake_upstream, flavor)
    assert post_messages(app_for(make_app, upstream), messages_body(model, top_k=5)).status_code == 200
    sent = last_call(upstream)[2]
    assert ("top_k" in sent) is passed_on and sent.get("top_k", 5) == 5


def test_a_non_anthropic_upstream_gets_the_translation_without_what_it_has_no_equivalent_for(registry, fake_upstream):
    upstream, model, _ = provider_of(registry, fake_upstream, "openai")
    image_url = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    body = messages_body(
        model,
        system=[
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be kind."},
        ],
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look", "cache_control": {"type": "ephemeral"}}, image_url],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "A cat."},
                ],
            },
            {"role": "system", "content": "Answer in French from now on."},
            {"role": "user", "content": "And now?"},
        ],
        tools=[WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search"}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        thinking={"type": "enabled", "budget_tokens": 2048},
        metadata={"user_id": "someone"},
        stop_sequences=["END"],
        temperature=0.5,
        top_p=0.9,
        top_k=5,
    )
    assert post_messages(registry, body, headers={"anthropic-beta": "x"}).status_code == 200
    _, headers, sent = last_call(upstream)
    assert "anthropic-beta" not in headers
    assert sent == {
        "max_tokens": 100,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END"],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
            {"role": "system", "content": "Answer in French from now on."},
            {"role": "user", "content": "And now?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": WEATHER_TOOL["description"],
                    "parameters": WEATHER_TOOL["input_schema"],
                },
            }
        ],
        "model": MODELS["openai"],
    }


def test_tool_results_become_tool_messages_before_the_users_words(registry, fake_upstream):
    upstream, model, _ = provider_of(registry, fake_upstream, "openai")
    calls = [
        {"type": "tool_use", "id": f"toolu_{n}", "name": "get_weather", "input": {"city": city}}
        for n, city in ((1, "Paris"), (2, "Rome"))
    ]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL_PNG}}
    results = [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
        {
            "type": "tool_result",
            "tool_use_id": "toolu_2",
            "content": [{"type": "text", "text": "Rain"}, image],
            "is_error": False,
        },
        {"type": "text", "text": "Thanks"},
    ]
    body = messages_body(
        model, messages=[QUESTION, {"role": "assistant", "content": calls}, {"role": "user", "content": results}]
    )
    assert post_messages(registry, body).status_code == 200
    sent = last_call(upstream)[2]["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    }
    assert sent[2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Rain"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Thanks"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL_PNG}"}},
            ],
        },
    ]


@pytest.mark.parametrize(
    "tool_choice, expected",
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "get_weather"},
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        ),
    ],
)
def test_tool_choices_are_translated(registry, fake_upstream, tool_choice, expected):
    upstream, model, _ = provider_of(registry, fake_upstream, "openai")
    assert (
        post_messages(registry, messages_body(model, tools=[WEATHER_TOOL], tool_choice=tool_choice)).status_code == 200
    )
    sent = last_call(upstream)[2]
    assert {name: sent[name] for name in ("tool_choice", "parallel_tool_calls") if name in sent} == expected


def test_a_stop_sequence_named_by_the_upstream_is_the_stop_reason(registry, fake_upstream):
    """vLLM names the stop sequence that ended the answer in its choice's `stop_reason`."""
    upstream, model, _ = provider_of(registry, fake_upstream, "openai")
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "Hel"},
        "finish_reason": "stop",
        "stop_reason": "lo",
    }
    upstream.answer_with(200, {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]})
    message = post_messages(registry, messages_body(model, stop_sequences=["lo"])).get_json()
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "lo")
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0}  # the upstream reported none


# Counting tokens ---------------------------------------------------------------------------------

COUNT_TOKENS = f"{MESSAGES}/count_tokens"


def count_body(model, **fields):
    return {"model": model, "messages": [QUESTION], **fields}


def test_the_anthropic_client_counts_tokens_with_an_anthropic_provider(registry, gateway, fake_upstream):
    upstream, model, provider_id = provider_of(registry, fake_upstream, "anthropic")
    with anthropic_client(gateway()) as client:
        raw = client.beta.messages.with_raw_response.count_tokens(
            model=model,
            system="Be brief.",
            messages=[QUESTION],
            tools=[WEATHER_TOOL],
            thinking={"type": "enabled", "budget_tokens": 1024},
            betas=["context-management-2025-06-27"],
        )
    assert raw.headers["X-Registry-Provider-Id"] == provider_id
    assert raw.parse().input_tokens == 8  # the fake's count: the words of the system text and the question
    path, headers, sent = last_call(upstream)
    assert path == "/v1/messages/count_tokens"
    assert headers["x-api-key"] == upstream.api_key and headers["anthropic-version"] == "2023-06-01"
    assert "context-management-2025-06-27" in headers["anthropic-beta"].split(",")  # as the client sent it
    assert sent == {
        "model": MODELS["anthropic"],
        "system": "Be brief.",
        "messages": [QUESTION],
        "tools": [WEATHER_TOOL],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }


@pytest.mark.parametrize("flavor", ["openai", "watsonx"])
def test_models_of_providers_without_a_counting_endpoint_cannot_count_tokens(registry, gateway, fake_upstream, flavor):
    upstream, model, _ = provider_of(registry, fake_upstream, flavor)
    with anthropic_client(gateway(iam=upstream)) as client, pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.count_tokens(model=model, messages=[QUESTION])
    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert "token counts" in raised.value.body["error"]["message"]
    assert not upstream.calls  # no estimate from a model call either


def test_a_token_count_is_no_model_call_yet_a_counted_request(registry, fake_upstream):
    _, model, _ = provider_of(registry, fake_upstream, "anthropic")
    before = parse(registry.test_client().get("/metrics").get_data(as_text=True))
    response = post_messages(registry, count_body(model), path=COUNT_TOKENS)
    assert response.status_code == 200 and response.get_json() == {"input_tokens": len(QUESTION["content"].split())}
    after = parse(registry.test_client().get("/metrics").get_data(as_text=True))
    route = {"method": "POST", "route": "/api/v1/anthropic/v1/messages/count_tokens"}
    assert delta(before, after, "registry_http_requests_total", **route, status="200") == 1
    labels = {"type": "anthropic", "model": model}
    assert delta(before, after, "registry_gateway_requests_started_total", **labels) == 0
    assert delta(before, after, "registry_gateway_requests_total", **labels, outcome="ok") == 0
    assert registry.extensions["usage"].flush()
    with registry.app_context():
        assert db.session.execute(sa.select(sa.func.count()).select_from(USAGE_EVENTS)).scalar() == 0


def test_a_token_count_fails_over_like_a_message(registry, fake_upstream):
    first, model, _ = provider_of(registry, fake_upstream, "anthropic")
    second_id = second_anthropic_provider(registry, fake_upstream, first)
    first.fail_with(529, "overloaded")
    response = post_messages(registry, count_body(model), path=COUNT_TOKENS)
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == second_id


@pytest.mark.parametrize(
    "body, status, error_type",
    [
        ({"model": "anthropic:claude-sonnet-4"}, 400, "invalid_request_error"),
        (
            count_body("anthropic:claude-sonnet-4", messages=[{"role": "tool", "content": "x"}]),
            400,
            "invalid_request_error",
        ),
        (count_body("anthropic:no-such-model"), 404, "not_found_error"),
    ],
)
def test_a_bad_token_count_is_refused_in_anthropics_shape(registry, fake_upstream, body, status, error_type):
    provider_of(registry, fake_upstream, "anthropic")
    assert_anthropic_error(post_messages(registry, body, path=COUNT_TOKENS), status, error_type)


def test_a_count_of_the_wrong_shape_fails_the_provider(registry, fake_upstream):
    upstream, model, provider_id = provider_of(registry, fake_upstream, "anthropic")
    upstream.answer_with(200, {"input_tokens": 2**60})
    response = post_messages(registry, count_body(model), path=COUNT_TOKENS)
    assert_anthropic_error(response, 502, "api_error")
    assert provider_id in response.get_json()["error"]["message"]


# Streams ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_stream_is_anthropics_event_sequence(registry, make_app, fake_upstream, flavor):
    upstream, model, provider_id = provider_of(registry, fake_upstream, flavor)
    response = post_messages(app_for(make_app, upstream), messages_body(model, tools=[WEATHER_TOOL], stream=True))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Registry-Provider-Id"] == provider_id
    events = events_of(response)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"] and "ping" in names
    assert [name for name, _ in events if name.startswith("content_block_")][-1] == "content_block_stop"
    assert all(document["type"] == name for name, document in events)
    message = streamed_message(events)
    assert message["model"] == model and message["stop_reason"] == "tool_use"
    tool_use = message["content"][-1]
    assert (tool_use["type"], tool_use["name"], tool_use["input"]) == ("tool_use", "get_weather", {"city": "Paris"})
    assert message["usage"]["output_tokens"] == USAGE["completion_tokens"]
    assert message["usage"]["input_tokens"] == USAGE["prompt_tokens"]
    assert sum(name == "content_block_delta" for name in names) > 2  # the arguments in parts, as they came


def test_an_anthropic_stream_is_relayed_as_it_came_with_the_registry_model_id(registry, fake_upstream):
    upstream, model, _ = provider_of(registry, fake_upstream, "anthropic")
    start = claude_message(usage={"input_tokens": 7, "output_tokens": 1, "cache_read_input_tokens": 3})
    upstream_events = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hm."}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "ping"},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 4},
        },
        {"type": "message_stop"},
    ]
    answering_events(upstream, upstream_events)
    events = events_of(post_messages(registry, messages_body(model, stream=True)))
    expected = [{**upstream_events[0], "message": {**start, "model": model}}, *upstream_events[1:]]
    assert [document for _, document in events] == expected


def test_an_anthropic_message_is_relayed_as_it_came_with_the_registry_model_id(registry, fake_upstream):
    upstream, model, _ = provider_of(registry, fake_upstream, "anthropic")
    answer = claude_message(
        content=[{"type": "thinking", "thinking": "Hm.", "signature": "sig"}, {"type": "text", "text": "Hi"}],
        stop_reason="end_turn",
        usage={"input_tokens": 7, "output_tokens": 4, "cache_read_input_tokens": 3},
    )
    upstream.answer_with(200, answer)
    assert post_messages(registry, messages_body(model)).get_json() == {**answer, "model": model}


@pytest.mark.parametrize("flavor", ["openai", "anthropic"])
def test_a_failure_after_the_first_event_is_an_error_event(registry, fake_upstream, flavor):
    upstream, model, _ = provider_of(registry, fake_upstream, flavor)
    upstream.break_after_chunks = 3
    events = events_of(post_messages(registry, messages_body(model, stream=True)))
    assert events[0][0] == "message_start"
    name, document = events[-1]
    assert name == "error" and document["type"] == "error" and document["error"]["type"] == "api_error"
    assert "message_stop" not in [name for name, _ in events]


# Chat completions to an Anthropic upstream ------------------------------------------------------


def chat_completion(app, **fields):
    body = {"model": "anthropic:claude-sonnet-4", "messages": [{"role": "user", "content": "Hi"}], **fields}
    return client_as(app, CALLER).post("/api/v1/openai/chat/completions", json=body)


def test_a_chat_completion_reaches_anthropic_in_its_own_format(registry, fake_upstream):
    upstream, _, _ = provider_of(registry, fake_upstream, "anthropic")
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL_PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "Rain"}]},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_TOOL["input_schema"]}}]
    response = chat_completion(
        registry,
        messages=messages,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        stop="END",
        temperature=0.3,
        max_completion_tokens=50,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        user="someone",
        logprobs=True,
    )
    assert response.status_code == 200, response.get_json()
    path, headers, sent = last_call(upstream)
    assert path == "/v1/messages" and headers["x-api-key"] == upstream.api_key and "Authorization" not in headers
    assert sent == {
        "max_tokens": 50,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL_PNG}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "Rain"}]},
                ],
            },
        ],
        "system": "Be brief.\n\nBe kind.",
        "tools": [{"name": "get_weather", "input_schema": WEATHER_TOOL["input_schema"]}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.3,
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
        "metadata": {"user_id": "someone"},
        "model": MODELS["anthropic"],
        "stream": False,
    }


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, {"type": "json_schema", "json_schema": "x"}])
def test_a_response_format_without_a_schema_has_no_equivalent(registry, fake_upstream, response_format):
    upstream, _, _ = provider_of(registry, fake_upstream, "anthropic")
    assert chat_completion(registry, response_format=response_format).status_code == 200
    assert "output_config" not in last_call(upstream)[2]


def test_anthropic_requires_max_tokens_so_a_chat_without_one_gets_the_default(registry, fake_upstream):
    upstream, _, _ = provider_of(registry, fake_upstream, "anthropic")
    assert chat_completion(registry).status_code == 200
    assert last_call(upstream)[2]["max_tokens"] == 4096


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "function", "content": "x"}]},
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "not json"}}]}
            ]
        },
        {"messages": [{"role": "assistant", "tool_calls": "all of them"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
        {"tools": [{"type": "function", "function": "get_weather"}]},
        {"tools": "all of them"},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": {"name": 5}}},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": [1]}},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": 5},
    ],
)
def test_a_chat_anthropic_cannot_take_is_400_before_it_is_sent(registry, fake_upstream, fields):
    upstream, _, _ = provider_of(registry, fake_upstream, "anthropic")
    response = chat_completion(registry, **fields)
    assert response.status_code == 400 and response.get_json()["error"]["type"] == "invalid_request_error"
    assert upstream.calls == []


@pytest.mark.parametrize(
    "answer",
    [
        {"content": "text", "usage": {"input_tokens": 1, "output_tokens": 1}},
        {"content": [{"type": "text", "text": 5}], "usage": {"input_tokens": 1, "output_tokens": 1}},
        {"content": [{"type": "tool_use", "name": "f", "input": {}}], "usage": {"input_tokens": 1, "output_tokens": 1}},
        {"content": [], "usage": {"input_tokens": "1", "output_tokens": 1}},
        {"content": [], "usage": {"input_tokens": 1, "output_tokens": -1}},
        {"content": []},
        [],
    ],
)
def test_a_message_of_the_wrong_shape_fails_the_provider_for_the_next(registry, fake_upstream, answer):
    first, _, _ = provider_of(registry, fake_upstream, "anthropic")
    second_id = second_anthropic_provider(registry, fake_upstream, first)
    first.answer_with(200, answer)
    response = chat_completion(registry)
    assert response.status_code == 200 and response.headers["X-Registry-Provider-Id"] == second_id
    assert last_call(first)[0] == "/v1/messages"


@pytest.mark.parametrize(
    "bad_event",
    [
        {"type": "message_start", "message": "started"},
        {"type": "message_start", "message": {"usage": {"input_tokens": 1.5}}},
        {"type": "content_block_start", "index": -1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": None}},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {"kind": "no type"},
    ],
)
def test_a_stream_failing_before_its_first_chunk_goes_to_the_next_provider(registry, fake_upstream, bad_event):
    first, _, _ = provider_of(registry, fake_upstream, "anthropic")
    second_id = second_anthropic_provider(registry, fake_upstream, first)
    answering_events(first, [bad_event])
    response = chat_completion(registry, stream=True)
    assert response.headers["X-Registry-Provider-Id"] == second_id and last_call(first)[0] == "/v1/messages"
    assert response.get_data(as_text=True).endswith("data: [DONE]\n\n")


def test_an_anthropic_error_event_mid_stream_is_relayed_without_the_key(registry, fake_upstream):
    upstream, _, _ = provider_of(registry, fake_upstream, "anthropic")
    error = {"type": "error", "error": {"type": "overloaded_error", "message": f"Overloaded for {upstream.api_key}"}}
    answering_events(upstream, [{"type": "message_start", "message": claude_message()}, error])
    text = chat_completion(registry, stream=True).get_data(as_text=True)
    assert "Overloaded for" in text and upstream.api_key not in text
    assert text.endswith("data: [DONE]\n\n")


def test_a_chat_stream_from_anthropic_has_openais_chunks_and_usage(registry, fake_upstream):
    upstream, _, _ = provider_of(registry, fake_upstream, "anthropic")
    response = chat_completion(registry, stream=True, stream_options={"include_usage": True})
    assert last_call(upstream)[0] == "/v1/messages"
    chunks = [json.loads(event.removeprefix("data: ")) for event in response.get_data(as_text=True).split("\n\n")[:-2]]
    assert {chunk["model"] for chunk in chunks} == {"anthropic:claude-sonnet-4"}
    assert (
        "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]) == "Hello!"
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE


def test_embeddings_of_an_anthropic_model_are_400_saying_it_has_none(registry):
    body = {"model": "anthropic:claude-sonnet-4", "input": "a text"}
    response = client_as(registry, CALLER).post("/api/v1/openai/embeddings", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"]["message"] == "anthropic models do not serve embeddings."


# The OpenAI client's chat completions against an Anthropic upstream, through gunicorn -----------


def test_the_openai_client_round_trips_a_tool_call_with_an_anthropic_model(registry, gateway, fake_upstream):
    upstream, model, _ = provider_of(registry, fake_upstream, "anthropic")
    server = gateway()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_TOOL["input_schema"]}}]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    with openai.OpenAI(
        base_url=f"{server.base_url}/api/v1/openai", api_key=server.caller_token, max_retries=0
    ) as client:
        asked = client.chat.completions.create(model=model, messages=[question], tools=tools)
        tool_call = asked.choices[0].message.tool_calls[0]
        assert asked.choices[0].finish_reason == "tool_calls" and json.loads(tool_call.function.arguments) == {
            "city": "Paris"
        }
        result = {"role": "tool", "tool_call_id": tool_call.id, "content": "Sunny"}
        conversation = [question, asked.choices[0].message.model_dump(exclude_none=True), result]
        answer = client.chat.completions.create(model=model, messages=conversation, tools=tools)
        assert answer.choices[0].message.content == "Hello!" and answer.usage.total_tokens == USAGE["total_tokens"]
        assert last_call(upstream)[2]["messages"][-1]["content"][0]["tool_use_id"] == tool_call.id
        chunks = list(client.chat.completions.create(model=model, messages=[question], tools=tools, stream=True))
        parts = [
            chunk.choices[0].delta.tool_calls for chunk in chunks if chunk.choices and chunk.choices[0].delta.tool_calls
        ]
        assert parts[0][0].function.name == "get_weather" and parts[0][0].id == tool_call.id
        assert "".join(part[0].function.arguments or "" for part in parts) == TOOL_ARGUMENTS
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        streamed = client.chat.completions.create(model=model, messages=conversation, tools=tools, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == "Hello!"
