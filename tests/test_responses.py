"""OpenAI's Responses API through the gateway: what reaches the upstream (in process: the real
app calling fake model servers over HTTP), and the real `openai` client and the OpenAI Agents
SDK's default model against gunicorn.

What the Responses route shares with every protocol (failover, the provider header, the key
kept out of errors, deadlines, size caps, metrics) is tested once per protocol in
tests/test_gateway.py.
"""

import asyncio
import json

import agents
import openai
import pytest

from tests.conftest import client_as
from tests.fakes.model import FREE_TEXT_ARGUMENTS, FREE_TEXT_INPUT, USAGE
from tests.protocols import sse_documents
from tests.test_gateway import (
    CALLER,
    MODEL_KEY,
    WATSONX_MODEL,
    call_model,
    openai_client,
    register,
    stream_of,
    watsonx_server,
)

MODEL = "openai:gpt-4o"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CHAT_WEATHER_TOOL = {
    "type": "function",
    "function": {name: WEATHER_TOOL[name] for name in ("name", "description", "parameters")},
}
# Codex's file editing tool, as it sends it: free text in a grammar of its own.
PATCH_GRAMMAR = 'start: "*** Begin Patch" LF hunk+ "*** End Patch" LF?\nhunk: /(.+\\n)+/'
APPLY_PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Use the `apply_patch` tool to edit files.",
    "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_GRAMMAR},
}


@pytest.fixture
def upstream(registry, fake_upstream):
    """An OpenAI-compatible provider of gpt-4o, registered."""
    server = fake_upstream(api_key=MODEL_KEY)
    register(registry, server)
    return server


def respond(registry, **fields):
    return call_model(registry, {"model": MODEL, "input": "Hi", **fields}, "responses")


def sent_upstream(upstream):
    """The body of the upstream's last model call."""
    return upstream.calls[-1][2]


# The request, as the upstream gets it ------------------------------------------------------


def test_a_string_input_is_a_user_message_and_instructions_a_system_message(registry, upstream):
    response = respond(registry, instructions="Answer briefly.")
    assert response.status_code == 200
    assert sent_upstream(upstream)["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
    ]


def test_developer_and_system_messages_reach_the_upstream_as_system_messages(registry, upstream):
    items = [
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Speak French."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": "there"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Bonjour"}]},
        {"role": "user", "content": "And?"},
    ]
    assert respond(registry, input=items).status_code == 200
    assert sent_upstream(upstream)["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "system", "content": "Speak French."},
        {"role": "user", "content": "Hi\n\nthere"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "And?"},
    ]


def test_an_image_is_passed_on_as_an_image_part(registry, upstream):
    image = "data:image/png;base64,iVBORw0KGgo="
    parts = [
        {"type": "input_text", "text": "What is it?"},
        {"type": "input_image", "image_url": image, "detail": "low"},
    ]
    assert respond(registry, input=[{"role": "user", "content": parts}]).status_code == 200
    assert sent_upstream(upstream)["messages"][0]["content"] == [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
    ]


def test_function_calls_and_their_outputs_become_the_assistants_tool_calls_and_tool_messages(registry, upstream):
    items = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Looking."}]},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "rainy"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
    ]
    assert respond(registry, input=items, tools=[WEATHER_TOOL]).status_code == 200
    messages = sent_upstream(upstream)["messages"]
    assert messages[1] == {
        "role": "assistant",
        "content": "Looking.",
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        ],
    }
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rainy"},
    ]


def test_options_are_passed_on_in_chats_words(registry, upstream):
    fields = {
        "temperature": 0.2,
        "top_p": 0.9,
        "max_output_tokens": 50,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
    }
    assert respond(registry, **fields).status_code == 200
    body = sent_upstream(upstream)
    assert body["tools"] == [CHAT_WEATHER_TOOL]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert (body["temperature"], body["top_p"], body["max_completion_tokens"]) == (0.2, 0.9, 50)
    assert body["parallel_tool_calls"] is False


def test_watsonx_gets_the_options_it_knows(registry, make_app, fake_upstream):
    upstream = watsonx_server(registry, fake_upstream)
    app = make_app(REGISTRY_WATSONX_IAM_URL=upstream.iam_url)
    body = {"model": WATSONX_MODEL, "input": "Hi", "max_output_tokens": 20, "tools": [WEATHER_TOOL]}
    response = call_model(app, {**body, "tool_choice": "required", "parallel_tool_calls": True}, "responses")
    assert response.status_code == 200
    sent = sent_upstream(upstream)
    assert (sent["max_tokens"], sent["tool_choice_option"], sent["tools"]) == (20, "required", [CHAT_WEATHER_TOOL])
    assert "parallel_tool_calls" not in sent and "max_completion_tokens" not in sent


@pytest.mark.parametrize(
    "text, response_format",
    [
        (
            {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True}},
        ),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        ({"format": {"type": "text"}, "verbosity": "low"}, None),
    ],
    ids=["json_schema", "json_object", "text"],
)
def test_text_format_reaches_the_upstream_as_response_format(registry, upstream, text, response_format):
    assert respond(registry, text=text).status_code == 200
    assert sent_upstream(upstream).get("response_format") == response_format


def test_built_in_tools_and_what_the_upstream_has_no_equivalent_for_are_left_out(registry, upstream):
    tools = [{"type": "web_search"}, WEATHER_TOOL, {"type": "file_search", "vector_store_ids": ["vs_1"]}]
    dropped = {
        "reasoning": {"effort": "high", "summary": "auto"},
        "include": ["reasoning.encrypted_content"],
        "store": False,
        "prompt_cache_key": "session-1",
        "metadata": {"run": "1"},
        "truncation": "auto",
        "vendor_option": {"a": 1},
    }
    response = respond(registry, tools=tools, **dropped)
    assert response.status_code == 200
    body = sent_upstream(upstream)
    assert body["tools"] == [CHAT_WEATHER_TOOL]
    assert not set(dropped) & set(body)
    assert response.get_json()["metadata"] == {"run": "1"}


def test_only_built_in_tools_make_a_call_without_tools(registry, upstream):
    assert respond(registry, tools=[{"type": "web_search"}], tool_choice={"type": "web_search"}).status_code == 200
    assert "tools" not in sent_upstream(upstream) and "tool_choice" not in sent_upstream(upstream)


@pytest.mark.parametrize("field", ["previous_response_id", "conversation"])
def test_stored_state_is_a_400_saying_to_send_the_whole_conversation(registry, upstream, field):
    response = respond(registry, **{field: "resp_123"})
    error = response.get_json()["error"]
    assert response.status_code == 400 and error["param"] == field
    assert "send the whole conversation" in error["message"]
    assert upstream.calls == []


def test_a_custom_tool_is_a_function_of_one_string_input_its_grammar_described(registry, upstream):
    free_text = {"type": "custom", "name": "note", "format": {"type": "text"}}
    choice = {"type": "custom", "name": "apply_patch"}
    assert respond(registry, tools=[APPLY_PATCH_TOOL, free_text], tool_choice=choice).status_code == 200
    body = sent_upstream(upstream)
    parameters = {
        "type": "object",
        "properties": {"input": {"type": "string", "description": "The tool's input, as free text in its format"}},
        "required": ["input"],
    }
    grammar = f"Its `input` follows this lark grammar:\n```lark\n{PATCH_GRAMMAR}\n```"
    description = f"Use the `apply_patch` tool to edit files.\n\n{grammar}"
    assert body["tools"] == [
        {"type": "function", "function": {"name": "apply_patch", "parameters": parameters, "description": description}},
        {"type": "function", "function": {"name": "note", "parameters": parameters}},
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "apply_patch"}}


def test_custom_tool_calls_and_their_outputs_become_tool_calls_and_tool_messages(registry, upstream):
    items = [
        {"role": "user", "content": "Add hello.txt"},
        {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch", "input": FREE_TEXT_INPUT},
        {"type": "custom_tool_call_output", "call_id": "call_p", "output": [{"type": "input_text", "text": "Done!"}]},
    ]
    assert respond(registry, input=items, tools=[APPLY_PATCH_TOOL]).status_code == 200
    assert sent_upstream(upstream)["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_p",
                    "type": "function",
                    "function": {"name": "apply_patch", "arguments": FREE_TEXT_ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_p", "content": "Done!"},
    ]


def test_a_custom_tool_call_missing_its_input_is_a_400_naming_it(registry, upstream):
    items = [{"role": "user", "content": "Hi"}, {"type": "custom_tool_call", "call_id": "c", "name": "apply_patch"}]
    response = respond(registry, input=items)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "input[1].input"


# The answer ----------------------------------------------------------------------------------


def test_the_answer_is_a_response_object_with_the_registry_model_id_and_usage(registry, upstream):
    response = respond(registry)
    answer = response.get_json()
    assert answer["id"].startswith("resp_") and answer["object"] == "response"
    assert (answer["status"], answer["model"]) == ("completed", MODEL)
    [message] = answer["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]
    assert answer["usage"] == {
        "input_tokens": USAGE["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": USAGE["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": USAGE["total_tokens"],
    }
    assert response.headers["X-Registry-Provider-Id"]


def test_a_tool_call_is_a_function_call_item(registry, upstream):
    answer = respond(registry, tools=[WEATHER_TOOL]).get_json()
    [call] = answer["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "get_weather", '{"city": "Paris"}')


def test_an_answer_cut_off_at_max_tokens_is_incomplete(registry, upstream):
    message = {"role": "assistant", "content": "Hel"}
    completion = {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "length"}]}
    upstream.answer_with(200, json.dumps(completion).encode())
    answer = respond(registry, max_output_tokens=1).get_json()
    assert answer["status"] == "incomplete" and answer["incomplete_details"] == {"reason": "max_output_tokens"}
    assert answer["output"][0]["content"][0]["text"] == "Hel" and answer["usage"] is None


@pytest.mark.parametrize(
    "message, finish_reason, output",
    [
        ({"content": [{"type": "text", "text": "Hel"}, {"text": "lo"}, 5]}, "stop", [("message", "Hello")]),
        ({"content": {"odd": 1}, "tool_calls": "x"}, ["length"], []),
        (
            {"tool_calls": [5, {"function": "f"}, {"id": 7, "function": {"name": 3, "arguments": {"a": 1}}}]},
            None,
            [("function_call", '{"a": 1}')],
        ),
        ("a message that is text", {"x": 1}, []),
    ],
    ids=["content-parts", "wrong-types", "odd-tool-calls", "message-not-an-object"],
)
def test_an_answer_of_odd_shape_is_read_as_far_as_it_goes(registry, upstream, message, finish_reason, output):
    choice = {"index": 0, "message": message, "finish_reason": finish_reason}
    upstream.answer_with(200, json.dumps({"object": "chat.completion", "choices": [choice]}).encode())
    response = respond(registry)
    assert response.status_code == 200
    items = response.get_json()["output"]
    texts = [item["content"][0]["text"] if item["type"] == "message" else item["arguments"] for item in items]
    assert [(item["type"], text) for item, text in zip(items, texts, strict=True)] == output
    assert all(item["type"] != "function_call" or item["call_id"].startswith("call_") for item in items)


@pytest.mark.parametrize(
    "delta, finish_reason",
    [
        ({"content": ["x"], "tool_calls": [7, {"index": [0], "function": {"arguments": 5}}]}, ["stop"]),
        ({"tool_calls": {"index": 0}}, {"x": 1}),
        ("not an object", "stop"),
    ],
)
def test_a_stream_of_odd_chunks_still_ends_as_a_response(registry, upstream, delta, finish_reason):
    choices = [{"index": 0, "delta": delta}], [{"index": 0, "delta": {}, "finish_reason": finish_reason}]
    chunks = ({"id": "c", "object": "chat.completion.chunk", "choices": choice} for choice in choices)
    upstream.script = stream_of(*(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks))
    events = sse_documents(respond(registry, stream=True).get_data(as_text=True))
    assert events[-1]["type"] == "response.completed"


def test_a_stream_is_the_responses_event_sequence(registry, upstream):
    upstream.pieces = ["Hel", "lo!"]
    response = respond(registry, stream=True)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    text = response.get_data(as_text=True)
    events = sse_documents(text)
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert [line.removeprefix("event: ") for line in text.split("\n") if line.startswith("event: ")] == [
        event["type"] for event in events
    ]
    completed = events[-1]["response"]
    assert completed["output"][0]["content"][0]["text"] == "Hello!" and completed["model"] == MODEL
    assert completed["usage"]["total_tokens"] == USAGE["total_tokens"]
    assert {event["response"]["id"] for event in events if "response" in event} == {completed["id"]}


def test_a_streamed_tool_call_is_a_function_call_item_with_its_arguments(registry, upstream):
    events = sse_documents(respond(registry, stream=True, tools=[WEATHER_TOOL]).get_data(as_text=True))
    kinds = [event["type"] for event in events]
    deltas = [event["delta"] for event in events if event["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(deltas) == '{"city": "Paris"}'  # relayed in the upstream's parts
    assert kinds[2:] == [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, done = events[2]["item"], events[-2]["item"]
    assert added["status"] == "in_progress" and added["arguments"] == ""
    assert done == {**added, "status": "completed", "arguments": '{"city": "Paris"}'}
    assert events[-1]["response"]["output"] == [done]


# Bad bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"input": None}, "input"),
        ({"input": 5}, "input"),
        ({"input": ["text"]}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": {"message": 1}, "role": "user", "content": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": ["x"]}]}, "input[0].content[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
        ),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": {"x": 1}}]}, "input[0].output"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"instructions": ["x"]}, "instructions"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": "get_weather"}, "tools"),
        ({"temperature": "warm"}, "temperature"),
        ({"top_p": 10**400}, "top_p"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 1.5}, "max_output_tokens"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": "json"}}, "text.format.type"),
        ({"stream": [True]}, "stream"),
        ({"model": 7}, "model"),
    ],
)
def test_a_bad_body_is_a_400_naming_the_field_in_openais_shape(registry, upstream, fields, param):
    response = respond(registry, **fields)
    assert response.status_code == 400
    assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}
    assert response.get_json()["error"]["param"] == param
    assert upstream.calls == []


def test_deeply_nested_or_non_finite_bodies_are_400s(registry, upstream):
    client_body = b'{"model": "openai:gpt-4o", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body in (client_body, b'{"model": "openai:gpt-4o", "input": "Hi", "temperature": -Infinity}'):
        response = client_as(registry, CALLER).post(
            "/api/v1/openai/responses", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400 and "error" in response.get_json()


# The real clients, through gunicorn ----------------------------------------------------------


def provider_of(flavor, registry, fake_upstream):
    """(upstream, registry model id) of a registered provider of that flavor."""
    if flavor == "watsonx":
        return watsonx_server(registry, fake_upstream), WATSONX_MODEL
    if flavor == "anthropic":
        upstream = fake_upstream("anthropic", api_key=MODEL_KEY, models=["claude-sonnet-4"])
        register(registry, upstream)
        return upstream, "anthropic:claude-sonnet-4"
    upstream = fake_upstream(api_key=MODEL_KEY)
    register(registry, upstream)
    return upstream, MODEL


FLAVORS = ["openai", "watsonx"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_openai_client_creates_responses_sync_async_and_streamed(registry, gateway, fake_upstream, flavor):
    upstream, model = provider_of(flavor, registry, fake_upstream)
    server = gateway(iam=upstream)
    client = openai_client(server)
    raw = client.responses.with_raw_response.create(model=model, input="Hi", instructions="Be brief.")
    response = raw.parse()
    assert response.output_text == "Hello!" and response.model == model and response.status == "completed"
    assert response.usage.total_tokens == USAGE["total_tokens"] and response.usage.input_tokens == 7
    assert raw.headers["X-Registry-Provider-Id"]

    with client.responses.stream(model=model, input="Hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello!" and final.output_text == "Hello!" and final.model == model

    async_client = openai_client(server, client_class=openai.AsyncOpenAI)

    async def create_and_stream():
        answer = await async_client.responses.create(model=model, input="Hi")
        events = [event async for event in await async_client.responses.create(model=model, input="Hi", stream=True)]
        return answer, events

    answer, events = asyncio.run(create_and_stream())
    assert answer.output_text == "Hello!"
    assert events[-1].type == "response.completed" and events[-1].response.output_text == "Hello!"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_function_tool_round_trip(registry, gateway, fake_upstream, flavor, stream):
    upstream, model = provider_of(flavor, registry, fake_upstream)
    client = openai_client(gateway(iam=upstream))

    def create(conversation):
        if not stream:
            return client.responses.create(model=model, input=conversation, tools=[WEATHER_TOOL])
        with client.responses.stream(model=model, input=conversation, tools=[WEATHER_TOOL]) as events:
            return events.get_final_response()

    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    [call] = create(conversation).output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    conversation += [
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    answer = create(conversation)
    assert answer.output_text == "Hello!"
    assert sent_upstream(upstream)["messages"][-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}


@pytest.mark.parametrize(
    "arguments, expected",
    [('{"input": "x"}', "x"), ('{"city": "Paris"}', '{"city": "Paris"}'), ("*** Begin Patch", "*** Begin Patch")],
    ids=["input", "other-json", "not-json"],
)
def test_a_custom_tool_call_is_a_custom_tool_call_item_with_its_input(registry, upstream, arguments, expected):
    call = {"id": "call_9", "type": "function", "function": {"name": "apply_patch", "arguments": arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
    upstream.answer_with(200, json.dumps({"object": "chat.completion", "choices": [choice]}).encode())
    answer = respond(registry, tools=[APPLY_PATCH_TOOL]).get_json()
    assert answer["tools"] == [APPLY_PATCH_TOOL]
    [item] = answer["output"]
    assert item["type"] == "custom_tool_call" and item["id"].startswith("ctc_") and item["status"] == "completed"
    assert (item["call_id"], item["name"], item["input"]) == ("call_9", "apply_patch", expected)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("flavor", [*FLAVORS, "anthropic"])
def test_a_custom_tool_round_trip(registry, gateway, fake_upstream, flavor, stream):
    """Codex's apply_patch: its call comes back as a custom_tool_call, its input streamed as it comes."""
    upstream, model = provider_of(flavor, registry, fake_upstream)
    client = openai_client(gateway(iam=upstream))
    streamed = {}  # the last stream's custom tool input events: type -> [delta or input]

    def create(conversation):
        tools = [APPLY_PATCH_TOOL, WEATHER_TOOL]
        if not stream:
            return client.responses.create(model=model, input=conversation, tools=tools)
        events = list(client.responses.create(model=model, input=conversation, tools=tools, stream=True))
        streamed.clear()
        for event in events:
            if event.type.startswith("response.custom_tool_call_input."):
                streamed.setdefault(event.type, []).append(getattr(event, "delta", None) or event.input)
        return events[-1].response

    conversation = [{"role": "user", "content": "Add hello.txt"}]
    call = create(conversation).output[-1]  # after what Claude says first
    assert call.type == "custom_tool_call" and call.name == "apply_patch" and call.input == FREE_TEXT_INPUT
    if stream:  # in parts, as the arguments came
        deltas = streamed["response.custom_tool_call_input.delta"]
        assert len(deltas) > 3 and "".join(deltas) == FREE_TEXT_INPUT
        assert streamed["response.custom_tool_call_input.done"] == [FREE_TEXT_INPUT]
    conversation += [
        call.model_dump(exclude_none=True),
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "Done!"},
    ]
    answer = create(conversation)
    assert answer.output_text == "Hello!"
    sent = sent_upstream(upstream)["messages"]
    if flavor == "anthropic":
        assert sent[-2]["content"][0]["input"] == {"input": FREE_TEXT_INPUT}
        assert sent[-1]["content"] == [{"type": "tool_result", "tool_use_id": call.call_id, "content": "Done!"}]
    else:
        assert sent[-2]["tool_calls"][0]["function"] == {"name": "apply_patch", "arguments": FREE_TEXT_ARGUMENTS}
        assert sent[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": "Done!"}


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_agents_sdks_default_model_runs_a_function_tool_through_the_registry(
    registry, gateway, fake_upstream, flavor
):
    upstream, model = provider_of(flavor, registry, fake_upstream)
    client = openai_client(gateway(iam=upstream), client_class=openai.AsyncOpenAI)
    cities = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return "sunny"

    agent = agents.Agent(
        name="forecaster",
        instructions="Answer with the weather.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=model, openai_client=client),
    )
    result = asyncio.run(
        agents.Runner.run(agent, "Weather in Paris?", run_config=agents.RunConfig(tracing_disabled=True))
    )
    assert result.final_output == "Hello!" and cities == ["Paris"]
    first, second = (body for path, _, body in upstream.calls if "chat" in path)
    assert first["messages"][0] == {"role": "system", "content": "Answer with the weather."}
    assert second["messages"][-1]["role"] == "tool" and second["messages"][-1]["content"] == "sunny"
