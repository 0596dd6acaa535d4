"""Anthropic's own API: `GET {base_url}/models` (in pages), `POST {base_url}/messages` and
`POST {base_url}/messages/count_tokens`, with `x-api-key` and `anthropic-version`.

A canonical chat request is translated to a Messages body, and the message, or its stream
of events, back to the canonical completion or chunks. A request that carries a Messages
body of its own (`request.native`, from the gateway's Messages protocol) is sent as it is,
with its `anthropic-beta` header; its answer and each of its chunks then also carry
Anthropic's own message or event under `NATIVE`, for that protocol to relay unchanged.
"""

import json
import re
import time
from contextlib import closing

from upstreams.errors import UpstreamFailure, UpstreamRefusal
from upstreams.http import (
    UPSTREAM_TEXT_LIMIT,
    is_count,
    is_list_of_objects,
    json_of,
    open_response,
    read_json,
    refuse_constant,
    scrubbed,
    secrets_of,
    sse_events,
    started,
    wrong_shape,
)
from upstreams.listing import get_json, model_entries, upstream_model, usable_models
from upstreams.wire import WireFormat

ANTHROPIC_VERSION = "2023-06-01"
MAX_PAGES = 20
# Anthropic requires max_tokens; a request without one gets this, which every Claude model allows.
DEFAULT_MAX_TOKENS = 4096
NATIVE = "native"  # where an answer or chunk carries Anthropic's own, for a request sent natively
NATIVE_PROTOCOL = "messages"  # the inbound protocol whose bodies Anthropic takes as they are
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k")
EMPTY_INPUT_SCHEMA = {"type": "object", "properties": {}}
DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+);base64,(.*)", re.DOTALL)
ANTHROPIC_USAGE_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def entry_model(entry):
    return upstream_model(entry.get("id"), entry.get("created_at"), "anthropic", entry.get("display_name"))


# The canonical request as a Messages body ---------------------------------------------------


def refused(message, param="messages"):
    """A request Anthropic cannot take, said before it is sent."""
    return UpstreamRefusal(400, {"message": message, "type": "invalid_request_error", "param": param, "code": None})


def part_text(part):
    text = part.get("text")
    if not isinstance(text, str):
        raise refused("A text part needs its `text` as a string.")
    return text


def text_of(content):
    """A system or developer message's content as text: a string, or its text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if not is_list_of_objects(content):
        raise refused("A message's content is a string or a list of parts.")
    return "".join(part_text(part) for part in content if part.get("type") == "text")


def image_block(part):
    """An OpenAI image_url part (a data URL or a link) as Anthropic's image block."""
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise refused("An image_url part needs its `url` as a string.")
    data_url = DATA_URL.fullmatch(url)
    if data_url:
        return {"type": "image", "source": {"type": "base64", "media_type": data_url[1], "data": data_url[2]}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def content_blocks(content):
    """A user's (or a tool result's) content as Anthropic's text and image blocks; empty
    text is left out, as Anthropic refuses it."""
    if content is None or isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not is_list_of_objects(content):
        raise refused("A message's content is a string or a list of parts.")
    blocks = []
    for part in content:
        if part.get("type") == "text":
            if part_text(part):
                blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            blocks.append(image_block(part))
        else:
            raise refused(f"Anthropic models take text and image parts, not {str(part.get('type'))[:40]!r}.")
    return blocks


def anthropic_tool_use(tool_call):
    """An assistant's tool call as Anthropic's tool_use block."""
    function = tool_call.get("function") if isinstance(tool_call, dict) else None
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise refused("An assistant's tool call needs its function's `name`.")
    arguments = function.get("arguments") or "{}"
    try:
        tool_input = json.loads(arguments) if isinstance(arguments, str) else None
    except (ValueError, RecursionError):
        tool_input = None
    if not isinstance(tool_input, dict):
        raise refused("An assistant's tool call needs its `arguments` as a JSON object in a string.")
    return {"type": "tool_use", "id": str(tool_call.get("id") or ""), "name": function["name"], "input": tool_input}


def assistant_blocks(message):
    blocks = content_blocks(text_of(message.get("content")))
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise refused("An assistant's `tool_calls` is a list.")
    return blocks + [anthropic_tool_use(tool_call) for tool_call in tool_calls]


def tool_result_block(message):
    content = message.get("content")
    return {
        "type": "tool_result",
        "tool_use_id": str(message.get("tool_call_id") or ""),
        "content": content if isinstance(content, str) else content_blocks(content),
    }


def system_and_turns(messages):
    """(the system text, the conversation's turns): system and developer messages, wherever
    they are, make the system text; a run of tool results is one user turn."""
    system, turns, previous_role = [], [], None
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(text_of(message.get("content")))
        elif role == "user":
            content = message.get("content")
            turns.append({"role": "user", "content": content if isinstance(content, str) else content_blocks(content)})
        elif role == "assistant":
            turns.append({"role": "assistant", "content": assistant_blocks(message)})
        elif role == "tool" and previous_role == "tool":
            turns[-1]["content"].append(tool_result_block(message))
        elif role == "tool":
            turns.append({"role": "user", "content": [tool_result_block(message)]})
        else:
            raise refused(f"Anthropic models take messages of role system, user, assistant or tool, not {role!r:.40}.")
        previous_role = role
    return "\n\n".join(text for text in system if text), turns


def anthropic_tool(tool):
    function = tool.get("function")
    if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
        raise refused("A function tool needs its `function` with a `name`.", "tools")
    described = {"description": function["description"]} if isinstance(function.get("description"), str) else {}
    return {"name": function["name"], **described, "input_schema": function.get("parameters") or EMPTY_INPUT_SCHEMA}


def anthropic_tools(tools):
    """Function tools as Anthropic's; tools of other kinds are left out (Anthropic runs none of them)."""
    if not is_list_of_objects(tools):
        raise refused("`tools` is a list of tools.", "tools")
    return [anthropic_tool(tool) for tool in tools if tool.get("type", "function") == "function"]


def anthropic_tool_choice(choice, parallel_tool_calls):
    """OpenAI's tool_choice (and parallel_tool_calls false) as Anthropic's tool_choice, or None."""
    named = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}
    if choice is None:
        anthropic = {"type": "auto"} if parallel_tool_calls is False else None
    elif isinstance(choice, str) and choice in named:
        anthropic = dict(named[choice])
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and "name" in choice["function"]:
        if not isinstance(choice["function"]["name"], str):
            raise refused("`tool_choice` names its function by a string.", "tool_choice")
        anthropic = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise refused("`tool_choice` is auto, required, none or a function to call.", "tool_choice")
    if anthropic and parallel_tool_calls is False and anthropic["type"] != "none":
        anthropic["disable_parallel_tool_use"] = True
    return anthropic


def output_config(response_format):
    """A json_schema response format as Anthropic's structured output; other formats have
    no equivalent (a JSON object without a schema is asked for in the prompt)."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    json_schema = response_format.get("json_schema")
    schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
    return {"format": {"type": "json_schema", "schema": schema}} if isinstance(schema, dict) else None


def max_tokens_of(options):
    for name in ("max_completion_tokens", "max_tokens"):
        if options.get(name) is not None:
            return options[name]
    return DEFAULT_MAX_TOKENS


def messages_body(request):
    """The canonical chat request as Anthropic's Messages body (the model added when posted)."""
    options = request.options
    system, turns = system_and_turns(request.messages)
    body = {"max_tokens": max_tokens_of(options), "messages": turns}
    if system:
        body["system"] = system
    if request.tools:
        body["tools"] = anthropic_tools(request.tools)
    tool_choice = anthropic_tool_choice(options.get("tool_choice"), options.get("parallel_tool_calls"))
    if tool_choice and body.get("tools"):
        body["tool_choice"] = tool_choice
    stop = options.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    body.update({name: options[name] for name in SAMPLING_OPTIONS if options.get(name) is not None})
    structured_output = output_config(options.get("response_format"))
    if structured_output:
        body["output_config"] = structured_output
    if isinstance(options.get("user"), str):
        body["metadata"] = {"user_id": options["user"]}
    return body


# Anthropic's answers as canonical ones ------------------------------------------------------


def is_anthropic_usage(usage):
    """An object whose token counts (those given) are counts."""
    return isinstance(usage, dict) and all(
        usage.get(name) is None or is_count(usage[name]) for name in ANTHROPIC_USAGE_COUNTS
    )


def canonical_usage(counts):
    """Anthropic's counts as OpenAI's usage: the prompt is every input token, cached or not."""
    prompt = sum(counts.get(name) or 0 for name in ANTHROPIC_USAGE_COUNTS if name != "output_tokens")
    completion = counts.get("output_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def is_usable_block(block):
    if block.get("type") == "text":
        return isinstance(block.get("text"), str)
    if block.get("type") == "tool_use":
        return isinstance(block.get("id"), str) and isinstance(block.get("name"), str)
    return isinstance(block.get("type"), str)


def checked_message(document, target):
    """The message: its content a list of usable blocks and its usage counted; else this provider failed."""
    if not (
        isinstance(document, dict)
        and is_list_of_objects(document.get("content"))
        and all(is_usable_block(block) for block in document["content"])
        and is_anthropic_usage(document.get("usage"))
    ):
        raise wrong_shape(target, "a message")
    return document


def tool_call(block, arguments):
    """A tool_use block as OpenAI's tool call."""
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}


def completion_of(message, model):
    """A message as the canonical chat completion: its text blocks as the content, its
    tool_use blocks as tool calls (other blocks, thinking included, have no equivalent)."""
    blocks = message["content"]
    text = "".join(block["text"] for block in blocks if block["type"] == "text")
    tool_calls = [
        tool_call(block, json.dumps(block.get("input") or {})) for block in blocks if block["type"] == "tool_use"
    ]
    chat_message = {"role": "assistant", "content": text if text or not tool_calls else None}
    if tool_calls:
        chat_message["tool_calls"] = tool_calls
    choice = {"index": 0, "message": chat_message, "finish_reason": finish_reason_of(message), "logprobs": None}
    return {
        "id": str(message.get("id") or ""),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": canonical_usage(message["usage"]),
    }


def finish_reason_of(message_or_delta):
    stop_reason = message_or_delta.get("stop_reason")
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


class StreamTranslation:
    """Anthropic's stream events, one at a time, as the choices (and usage) of canonical chunks.

    Content blocks are numbered by Anthropic; tool_use blocks become tool calls numbered
    among the answer's tool calls. The usage is that of message_start, updated by
    message_delta (whose counts are totals so far).
    """

    def __init__(self, target, model):
        self.target = target
        self.identity = {"id": "", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        self.tool_numbers = {}  # content block index -> tool call index
        self.counts = {}
        self.finished = False

    def shape_error(self, event_type):
        return wrong_shape(self.target, f"a {event_type:.40} event")

    def choices_and_usage(self, event):
        """([choice], usage or None) of one event; an error event raises."""
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise wrong_shape(self.target, "a stream event")
        translate = getattr(self, f"on_{event['type']}", None)
        return translate(event) if translate else ([], None)

    def choice(self, delta, finish_reason=None):
        return [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]

    def counted(self, usage, event_type):
        if not is_anthropic_usage(usage):
            raise self.shape_error(event_type)
        self.counts.update({name: usage[name] for name in ANTHROPIC_USAGE_COUNTS if usage.get(name) is not None})
        return canonical_usage(self.counts)

    def on_message_start(self, event):
        message = event.get("message")
        if not isinstance(message, dict):
            raise self.shape_error("message_start")
        self.identity["id"] = str(message.get("id") or "")
        return self.choice({"role": "assistant", "content": ""}), self.counted(message.get("usage"), "message_start")

    def block_index(self, event):
        index = event.get("index")
        if not is_count(index):
            raise self.shape_error(event["type"])
        return index

    def on_content_block_start(self, event):
        index, block = self.block_index(event), event.get("content_block")
        if not (isinstance(block, dict) and is_usable_block(block)):
            raise self.shape_error("content_block_start")
        if block["type"] == "text" and block["text"]:
            return self.choice({"content": block["text"]}), None
        if block["type"] != "tool_use":
            return [], None
        number = self.tool_numbers[index] = len(self.tool_numbers)
        arguments = json.dumps(block["input"]) if block.get("input") else ""
        return self.choice({"tool_calls": [{"index": number, **tool_call(block, arguments)}]}), None

    def on_content_block_delta(self, event):
        index, delta = self.block_index(event), event.get("delta")
        if not isinstance(delta, dict):
            raise self.shape_error("content_block_delta")
        if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            return self.choice({"content": delta["text"]}), None
        if delta.get("type") == "input_json_delta" and isinstance(delta.get("partial_json"), str):
            if index not in self.tool_numbers:
                raise self.shape_error("content_block_delta")
            if not delta["partial_json"]:
                return [], None
            part = {"index": self.tool_numbers[index], "function": {"arguments": delta["partial_json"]}}
            return self.choice({"tool_calls": [part]}), None
        if delta.get("type") in ("text_delta", "input_json_delta"):
            raise self.shape_error("content_block_delta")
        return [], None  # thinking, signatures, citations: no canonical equivalent

    def on_message_delta(self, event):
        delta = event.get("delta")
        if not isinstance(delta, dict):
            raise self.shape_error("message_delta")
        return self.choice({}, finish_reason_of(delta)), self.counted(event.get("usage"), "message_delta")

    def on_message_stop(self, event):
        self.finished = True
        return [], None

    def on_error(self, event):
        error = event.get("error")
        said = error.get("message") if isinstance(error, dict) and "message" in error else error
        message = scrubbed(said, UPSTREAM_TEXT_LIMIT, secrets_of(self.target))
        raise UpstreamFailure(f"provider {self.target.provider_id} failed mid-stream: {message}")


def stream_chunks(response, target, model, native):
    """The stream's events as canonical chunks, each as it arrives; with `native`, every
    event is passed on (under NATIVE), with or without a canonical equivalent."""
    translation = StreamTranslation(target, model)
    for data in sse_events(response, target):
        try:
            event = json_of(data, refuse_constant, secrets_of(target))
        except UpstreamFailure as error:
            raise UpstreamFailure(f"provider {target.provider_id} sent an event that is not usable: {error}") from None
        choices, usage = translation.choices_and_usage(event)
        chunk = {**translation.identity, "choices": choices}
        if usage:
            chunk["usage"] = usage
        if native:
            chunk[NATIVE] = event
        if choices or native:
            yield chunk
        if translation.finished:
            return
    raise UpstreamFailure(f"provider {target.provider_id} ended its stream before the model finished")


def native_body(request):
    """The Messages body the request carries to be sent as it is, or None."""
    native = request.native
    return native if native is not None and native.protocol == NATIVE_PROTOCOL else None


class Anthropic(WireFormat):
    name = "Anthropic"

    def auth_headers(self, target):
        key = {"x-api-key": target.api_key} if target.api_key else {}
        return {**key, "anthropic-version": ANTHROPIC_VERSION}

    def list_models(self, target, observe):
        headers = self.auth_headers(target)
        entries, params = [], {"limit": 1000}
        for _ in range(MAX_PAGES):
            document = get_json(target, f"{target.base_url}/models", observe, headers=headers, params=params)
            entries += model_entries(document, "data")
            last_id = document.get("last_id")
            if not document.get("has_more") or not last_id:
                break
            if not isinstance(last_id, str):
                raise UpstreamFailure("unexpected response from the upstream: a last_id that is not a string")
            params = {"limit": 1000, "after_id": last_id}
        return usable_models(target, entries, entry_model)

    def post(self, target, path, body, native_headers, deadline):
        headers = {**self.auth_headers(target), **native_headers}
        return open_response(target, "POST", f"{target.base_url}{path}", deadline, headers=headers, json_body=body)

    def post_messages(self, target, model, request, stream, deadline):
        native = native_body(request)
        body = native.body if native else messages_body(request)
        headers = native.headers if native else {}
        return self.post(target, "/messages", {**body, "model": model, "stream": stream}, headers, deadline)

    def chat(self, target, model, request, deadline):
        response = self.post_messages(target, model, request, False, deadline)
        message = checked_message(read_json(response, target), target)
        completion = completion_of(message, model)
        if native_body(request):
            completion[NATIVE] = message
        return completion

    def open_chat_stream(self, target, model, request, deadline):
        """The accepted stream's chunks, as a generator that closes the upstream call when closed."""
        response = self.post_messages(target, model, request, True, deadline)

        def chunks():
            with closing(response):
                yield from stream_chunks(response, target, model, native_body(request) is not None)

        return started(chunks(), target)

    def count_tokens(self, target, model, native, deadline):
        """Anthropic's count of the body's input tokens (`{"input_tokens": N}` and whatever
        else it answers), the body sent as it is with its beta headers."""
        response = self.post(
            target, "/messages/count_tokens", {**native.body, "model": model}, native.headers, deadline
        )
        count = read_json(response, target)
        if not (isinstance(count, dict) and is_count(count.get("input_tokens"))):
            raise wrong_shape(target, "a token count")
        return count
