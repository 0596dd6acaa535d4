"""The fake upstreams speak their real formats: the official clients, pointed at them
directly, parse what they answer."""

import anthropic
import pytest

from tests.fakes.model import USAGE

ANTHROPIC_KEY = "sk-ant-fake-key"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def claude(fake_upstream):
    """The anthropic client against an Anthropic fake serving claude-sonnet-4."""
    upstream = fake_upstream("anthropic", api_key=ANTHROPIC_KEY, models=["claude-sonnet-4"])
    with anthropic.Anthropic(base_url=upstream.root, api_key=ANTHROPIC_KEY, max_retries=0) as client:
        yield client


def ask(client, content="Hi", **options):
    messages = [{"role": "user", "content": content}]
    return client.messages.create(model="claude-sonnet-4", max_tokens=100, messages=messages, **options)


def test_the_anthropic_fake_answers_a_message(claude):
    message = ask(claude)
    assert message.id.startswith("msg_") and message.role == "assistant" and message.model == "claude-sonnet-4"
    assert [block.text for block in message.content] == ["Hello!"] and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
    )


def test_the_anthropic_fake_streams_its_events(claude):
    messages = [{"role": "user", "content": "Hi"}]
    with claude.messages.stream(model="claude-sonnet-4", max_tokens=100, messages=messages) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert message.content[0].text == "Hello!" and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == USAGE["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_the_anthropic_fake_calls_a_tool_then_answers_its_result(claude, stream):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    asked = {"model": "claude-sonnet-4", "max_tokens": 100, "tools": [WEATHER_TOOL]}
    if stream:
        with claude.messages.stream(messages=messages, **asked) as events:
            deltas = [event.delta for event in events if event.type == "content_block_delta"]
            message = events.get_final_message()
        assert len([delta for delta in deltas if delta.type == "input_json_delta"]) > 2  # the input in parts
    else:
        message = claude.messages.create(messages=messages, **asked)
    [call] = [block for block in message.content if block.type == "tool_use"]
    assert (call.name, call.input, message.stop_reason) == ("get_weather", {"city": "Paris"}, "tool_use")
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}
    messages += [{"role": "assistant", "content": message.content}, {"role": "user", "content": [result]}]
    answer = claude.messages.create(messages=messages, **asked)
    assert answer.stop_reason == "end_turn" and answer.content[0].text == "Hello!"


def test_the_anthropic_fake_stops_at_max_tokens_and_stop_sequences(claude):
    cut = claude.messages.create(model="claude-sonnet-4", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert (cut.content[0].text, cut.stop_reason) == ("Hello", "max_tokens")
    stopped = ask(claude, stop_sequences=["lo"])
    assert (stopped.content[0].text, stopped.stop_reason, stopped.stop_sequence) == ("Hel", "stop_sequence", "lo")


def test_the_anthropic_fake_refuses_in_anthropics_shape(claude):
    with pytest.raises(anthropic.NotFoundError) as raised:
        claude.messages.create(model="claude-unknown", max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        ask(claude.with_options(api_key="sk-ant-wrong"))
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="claude-sonnet-4", max_tokens=0, messages=[{"role": "user", "content": "Hi"}])
