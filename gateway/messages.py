"""Anthropic's Messages API, inbound: the body as the canonical ChatRequest, and the canonical
completion or chunks back as Anthropic's message or stream events.

The ChatRequest also carries the body as sent (a NativeBody): the Anthropic adapter sends
that instead of its translation, and hands back Anthropic's own message and events beside
the canonical ones, which are then relayed as they came (thinking blocks, cache counts and
all), `model` the registry's id. Every other upstream gets the translation, without the
fields it has no equivalent for (cache_control, thinking, server tools, ...).
"""

import json
import uuid
from functools import partial

from api.errors import anthropic_error_document
from gateway.call import ChatRequest, GatewayCall, NativeBody, call_finished
from gateway.routing import served_answer
from gateway.stream import Encoder, sse
from upstreams.anthropic import EMPTY_INPUT_SCHEMA, NATIVE, NATIVE_PROTOCOL

STOP_REASONS = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
# Passed on under the same name; stop_sequences as `stop`. `top_k` is Anthropic's alone: OpenAI's
# API refuses fields it does not know (an Anthropic upstream gets it in the body as sent).
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p")
NATIVE_HEADERS = ("anthropic-beta",)


# The Messages body as the canonical request ---------------------------------------------------


def text_of(content):
    """A string, or the text of its text blocks, a blank line apart."""
    if isinstance(content, str):
        return content
    return "\n\n".join(block["text"] for block in content or () if block["type"] == "text")


def image_part(block):
    source = block["source"]
    url = source["url"] if source["type"] == "url" else f"data:{source['media_type']};base64,{source['data']}"
    return {"type": "image_url", "image_url": {"url": url}}


def openai_content(blocks):
    """Text and image blocks as OpenAI's content: plain text when there is no image, which
    every OpenAI-compatible server takes, else parts."""
    if not any(block["type"] == "image" for block in blocks):
        return text_of(blocks)
    return [
        {"type": "text", "text": block["text"]} if block["type"] == "text" else image_part(block)
        for block in blocks
        if block["type"] in ("text", "image")
    ]


def tool_message(block):
    """A tool_result block as OpenAI's tool message (its text; its images go to the user's turn)."""
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text_of(block.get("content"))}


def result_images(result):
    content = result.get("content")
    return [block for block in content if block["type"] == "image"] if isinstance(content, list) else []


def user_messages(content):
    """A user turn as OpenAI's messages: its tool results first, each a tool message, then
    the rest (with the tool results' images) as one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results = [block for block in content if block["type"] == "tool_result"]
    shown = [block for block in content if block["type"] in ("text", "image")]
    shown += [image for result in results for image in result_images(result)]
    messages = [tool_message(block) for block in results]
    if shown or not results:
        messages.append({"role": "user", "content": openai_content(shown)})
    return messages


def assistant_message(content):
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    text = text_of(content)
    tool_calls = [
        {
            "id": block["id"],
            "type": "function",
            "function": {"name": block["name"], "arguments": json.dumps(block["input"])},
        }
        for block in content
        if block["type"] == "tool_use"
    ]
    message = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def openai_messages(body):
    """The system prompt and the turns as OpenAI's messages; a system message among the turns
    stays where it is."""
    messages = [{"role": "system", "content": text_of(body["system"])}] if body.get("system") else []
    for message in body["messages"]:
        content = message["content"]
        if message["role"] == "system":
            messages.append({"role": "system", "content": text_of(content)})
        elif message["role"] == "user":
            messages.extend(user_messages(content))
        else:
            messages.append(assistant_message(content))
    return messages


def openai_tools(tools):
    """Custom tools as OpenAI's function tools; Anthropic's server tools are left out."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool["name"],
                **({"description": tool["description"]} if "description" in tool else {}),
                "parameters": tool.get("input_schema") or EMPTY_INPUT_SCHEMA,
            },
        }
        for tool in tools
        if tool.get("type", "custom") == "custom"
    ]


def tool_options(tool_choice):
    if tool_choice is None:
        return {}
    options = {}
    if tool_choice["type"] == "tool":
        options["tool_choice"] = {"type": "function", "function": {"name": tool_choice["name"]}}
    else:
        options["tool_choice"] = TOOL_CHOICES[tool_choice["type"]]
    if tool_choice.get("disable_parallel_tool_use"):
        options["parallel_tool_calls"] = False
    return options


def native_body(body, headers):
    """The body as sent, with the request's headers that go with it, for Anthropic upstreams."""
    native_headers = {name: headers[name] for name in NATIVE_HEADERS if headers.get(name)}
    return NativeBody(NATIVE_PROTOCOL, body, native_headers)


def chat_request_of(body, headers):
    """A Messages body (as the schema loaded it) and the request's headers as the gateway's
    ChatRequest, which carries the body as sent for Anthropic upstreams."""
    options = {name: body[name] for name in SAMPLING_FIELDS if name in body}
    if body.get("stop_sequences"):
        options["stop"] = body["stop_sequences"]
    tools = openai_tools(body["tools"]) if body.get("tools") else None
    if tools:
        options.update(tool_options(body.get("tool_choice")))
    return ChatRequest(
        model=body["model"],
        messages=openai_messages(body),
        tools=tools or None,
        options=options,
        stream=body["stream"],
        native=native_body(body, headers),
    )


# Counting a body's input tokens ---------------------------------------------------------------


def ask_count(native, adapter, target, model, deadline):
    return adapter.count_tokens(target, model, native, deadline)


def count_tokens(body, headers, settings):
    """(target, the provider's count of the body's input tokens): routed and failed over as a
    model call is, but asking no model, so neither counted as one nor recorded as usage. Only
    a wire format with a counting endpoint counts (Anthropic's); the others refuse, as the
    registry never estimates a count."""
    call = GatewayCall(body["model"], "count_tokens", asks_model=False)
    target, count, _ = served_answer(call, "llm", partial(ask_count, native_body(body, headers)), settings)
    call_finished(call)
    return target, count


# The canonical answer as a message ----------------------------------------------------------


def message_id():
    return f"msg_{uuid.uuid4().hex}"


def object_in(document, key):
    value = document.get(key) if isinstance(document, dict) else None
    return value if isinstance(value, dict) else {}


def tool_input(arguments):
    """A tool call's arguments as a tool_use block's input: an object, else empty."""
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except (ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def tool_use_block(tool_call):
    function = object_in(tool_call, "function")
    return {
        "type": "tool_use",
        "id": str(tool_call.get("id") or f"toolu_{uuid.uuid4().hex}"),
        "name": str(function.get("name") or ""),
        "input": tool_input(function.get("arguments")),
    }


def stop_of(choice, stop_sequences):
    """(stop_reason, stop_sequence) of a choice: a finish by `stop` is a stop sequence's only
    when the upstream names which one (as vLLM's `stop_reason` does)."""
    finish_reason = choice.get("finish_reason")
    if isinstance(finish_reason, str) and finish_reason in STOP_REASONS:
        return STOP_REASONS[finish_reason], None
    matched = choice.get("stop_reason")
    if isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def anthropic_usage(usage):
    usage = usage if isinstance(usage, dict) else {}
    return {"input_tokens": usage.get("prompt_tokens") or 0, "output_tokens": usage.get("completion_tokens") or 0}


def first_choice(chunk_or_completion):
    choices = chunk_or_completion.get("choices") or [{}]
    return choices[0]


def message_of(completion, body):
    """The canonical completion as Anthropic's message; Anthropic's own when it answered."""
    if NATIVE in completion:
        return {**completion[NATIVE], "model": completion["model"]}
    choice = first_choice(completion)
    chat_message = object_in(choice, "message")
    text = chat_message.get("content")
    content = [{"type": "text", "text": text}] if isinstance(text, str) and text else []
    tool_calls = chat_message.get("tool_calls")
    if isinstance(tool_calls, list):
        content += [tool_use_block(tool_call) for tool_call in tool_calls if isinstance(tool_call, dict)]
    stop_reason, stop_sequence = stop_of(choice, body.get("stop_sequences") or ())
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": completion["model"],
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": anthropic_usage(completion.get("usage")),
    }


# The canonical chunks as Anthropic's events -------------------------------------------------


def event(document):
    return sse(document, event=document["type"])


def block_delta(index, delta):
    return event({"type": "content_block_delta", "index": index, "delta": delta})


def relayed(native_event, model):
    """Anthropic's own event, `model` the registry's id."""
    if native_event["type"] == "message_start":
        return {**native_event, "message": {**native_event["message"], "model": model}}
    return native_event


class MessageEvents(Encoder):
    """The stream encoder of the Messages API: message_start and a ping, then each content
    block (text, or a tool call's tool_use) as it starts, its deltas and its stop, then
    message_delta with the stop reason and the usage, and message_stop; a failure is an
    error event; a ping whenever the model keeps silent. Anthropic's own events, when it
    answered, are relayed as they came."""

    def __init__(self, body):
        self.stop_sequences = body.get("stop_sequences") or ()
        self.started = False
        self.relaying = False  # Anthropic's own events are relayed, message_stop included
        self.blocks = 0  # content blocks started
        self.open_block = None  # the index of the block open now
        self.text_block = None  # the same, when it is a text block
        self.tool_blocks = {}  # tool call index -> its block's index
        self.stop = ("end_turn", None)

    def events(self, chunk):
        if NATIVE in chunk:
            self.relaying = True
            return (event(relayed(chunk[NATIVE], chunk["model"])),)
        events = [] if self.started else self.start(chunk["model"])
        choice = first_choice(chunk)
        delta = object_in(choice, "delta")
        if isinstance(delta.get("content"), str) and delta["content"]:
            events += self.text(delta["content"])
        if isinstance(delta.get("tool_calls"), list):
            for tool_call in delta["tool_calls"]:
                if isinstance(tool_call, dict):
                    events += self.tool_call(tool_call)
        if choice.get("finish_reason"):
            self.stop = stop_of(choice, self.stop_sequences)
        return events

    def start(self, model):
        self.started = True
        message = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [event({"type": "message_start", "message": message}), event({"type": "ping"})]

    def open(self, content_block):
        """Stop the open block and start this one."""
        events = self.close()
        self.open_block, self.blocks = self.blocks, self.blocks + 1
        events.append(event({"type": "content_block_start", "index": self.open_block, "content_block": content_block}))
        return events

    def close(self):
        if self.open_block is None:
            return []
        index, self.open_block, self.text_block = self.open_block, None, None
        return [event({"type": "content_block_stop", "index": index})]

    def text(self, text):
        events = []
        if self.text_block is None:
            events = self.open({"type": "text", "text": ""})
            self.text_block = self.open_block
        return [*events, block_delta(self.text_block, {"type": "text_delta", "text": text})]

    def tool_call(self, tool_call):
        """A tool call's part: its tool_use block started when the call is new, then its
        arguments' part (a late part of an earlier call goes to that call's block)."""
        events = []
        number = tool_call.get("index", 0)
        if number not in self.tool_blocks:
            events = self.open({**tool_use_block(tool_call), "input": {}})
            self.tool_blocks[number] = self.open_block
        arguments = object_in(tool_call, "function").get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(
                block_delta(self.tool_blocks[number], {"type": "input_json_delta", "partial_json": arguments})
            )
        return events

    def end(self, call):
        if self.relaying:
            return
        events = [] if self.started else self.start(call.model)
        stop_reason, stop_sequence = self.stop
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": anthropic_usage(call.usage),
        }
        yield from [*events, *self.close(), event(message_delta), event({"type": "message_stop"})]

    def failure(self, status, message, error_type):
        return sse(anthropic_error_document(status, message), event="error")

    def keepalive(self):
        return event({"type": "ping"})
