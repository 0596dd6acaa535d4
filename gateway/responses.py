"""OpenAI's Responses API, inbound: the body as the canonical ChatRequest, and the canonical
completion or chunks back as a response object or the Responses event sequence.

The registry stores no responses, so every call carries its whole conversation: `input` is
a string (one user message) or a list of items. Messages become chat messages (`developer`
ones system messages, text parts joined into one text, images kept as image parts),
`function_call` items the assistant's tool calls, `function_call_output` items tool
messages. `reasoning` items and the items of tools run by OpenAI itself (web search, file
search, ...) are left out, as are those tools: no upstream here runs them.

Custom tools (free text in, in a format or grammar of their own, as Codex's `apply_patch`)
are run by the client like functions, but chat knows only functions: each goes upstream as a
function whose one string parameter, `input`, carries the text (the format told in its
description), and a call of it comes back as a `custom_tool_call` item with that text, its
`input` streamed as it is decoded from the arguments' JSON.
"""

import itertools
import json
import re
import time
import uuid

from api.errors import GatewayError
from gateway.call import ChatRequest
from gateway.stream import Encoder, sse
from upstreams.http import is_count

CHAT_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PART_TYPES = ("input_text", "output_text")
TOOL_CHOICE_WORDS = ("auto", "none", "required")
# Passed on under the same name; the other fields of the body have no chat equivalent, or
# need the stored state the registry does not keep, and are left out.
SAME_NAMED_OPTIONS = ("temperature", "top_p")
PARAGRAPH_BREAK = "\n\n"
# A finish reason that ends the response before the model was done, as Responses tells it.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}
# A custom tool as a chat function: its free text is the one string parameter, `input`.
CUSTOM_TOOL_PARAMETERS = {
    "type": "object",
    "properties": {"input": {"type": "string", "description": "The tool's input, as free text in its format"}},
    "required": ["input"],
}
# The arguments of a custom tool's call as a model writes them, up to where `input`'s string starts.
INPUT_OPENING = re.compile(r'\s*\{\s*"input"\s*:\s*"')
# The longest run of a JSON string's body that decodes whole: characters but the quote and the
# backslash, and whole escapes (a surrogate pair's two together).
WHOLE_STRING_RUN = re.compile(
    r'(?:[^"\\]|\\["\\/bfnrt]|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}'
    r"|\\u(?![dD][89abAB])[0-9a-fA-F]{4})*"
)


def bad_input(param, message):
    return GatewayError(400, message, param=param)


def new_id(prefix):
    return f"{prefix}_{uuid.uuid4().hex}"


# The request ----------------------------------------------------------------------------------


def text_of_parts(parts, param):
    """The text of a list of text parts, paragraphs apart."""
    texts = []
    for number, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") in TEXT_PART_TYPES and isinstance(part.get("text"), str)):
            raise bad_input(f"{param}[{number}]", "Expected a content part of type input_text or output_text.")
        texts.append(part["text"])
    return PARAGRAPH_BREAK.join(texts)


def named(mapping, name):
    """mapping[name] when `name` is a string it holds, else None (whatever JSON a client sent)."""
    return mapping.get(name) if isinstance(name, str) else None


def image_part(part, param):
    """An input_image part as a chat image part: the registry keeps no files, so a URL or data URL."""
    if not isinstance(part.get("image_url"), str):
        raise bad_input(f"{param}.image_url", "Send the image as `image_url` (a URL or a data URL); no files are kept.")
    image = {"url": part["image_url"]}
    if isinstance(part.get("detail"), str):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def chat_content_part(part, param):
    if not isinstance(part, dict):
        raise bad_input(param, "Expected a content part (an object).")
    kind = part.get("type")
    if kind in TEXT_PART_TYPES or kind == "refusal":
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise bad_input(param, f"A {kind} part needs its text.")
        return {"type": "text", "text": text}
    if kind == "input_image":
        return image_part(part, param)
    raise bad_input(f"{param}.type", f"Content parts of type {kind!r} cannot be sent to a model here.")


def chat_content(content, param):
    """A message's content as chat content: text as one string, parts kept when an image is among them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_input(param, "Expected the content as a string or a list of content parts.")
    parts = [chat_content_part(part, f"{param}[{number}]") for number, part in enumerate(content)]
    if all(part["type"] == "text" for part in parts):
        return PARAGRAPH_BREAK.join(part["text"] for part in parts)
    return parts


def required_text(item, name, param):
    value = item.get(name)
    if not isinstance(value, str):
        raise bad_input(f"{param}.{name}", f"Expected `{name}` as a string.")
    return value


def add_message(messages, item, param):
    role = named(CHAT_ROLES, item.get("role"))
    if role is None:
        raise bad_input(f"{param}.role", f"A message's role is one of {', '.join(CHAT_ROLES)}.")
    messages.append({"role": role, "content": chat_content(item.get("content"), f"{param}.content")})


def add_tool_call(messages, item, arguments, param):
    """The assistant's tool call, in the assistant message it follows (one turn in chat's terms)."""
    function = {"name": required_text(item, "name", param), "arguments": arguments}
    tool_call = {"id": required_text(item, "call_id", param), "type": "function", "function": function}
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant":
        last.setdefault("tool_calls", []).append(tool_call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [tool_call]})


def add_function_call(messages, item, param):
    add_tool_call(messages, item, required_text(item, "arguments", param), param)


def add_custom_tool_call(messages, item, param):
    """A custom tool's call, as the call of its function: its text as the `input` argument."""
    add_tool_call(messages, item, json.dumps({"input": required_text(item, "input", param)}), param)


def add_function_call_output(messages, item, param):
    output = item.get("output")
    if isinstance(output, list):
        output = text_of_parts(output, f"{param}.output")
    elif not isinstance(output, str):
        raise bad_input(f"{param}.output", "Expected the function's output as a string or a list of text parts.")
    messages.append({"role": "tool", "tool_call_id": required_text(item, "call_id", param), "content": output})


def refuse_reference(messages, item, param):
    raise bad_input(param, "The registry stores no responses: send the items themselves, not references to them.")


ITEM_TRANSLATIONS = {
    "message": add_message,
    "function_call": add_function_call,
    "function_call_output": add_function_call_output,
    "custom_tool_call": add_custom_tool_call,
    "custom_tool_call_output": add_function_call_output,
    "item_reference": refuse_reference,
}


def chat_messages(instructions, input_items):
    messages = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(input_items, str):
        return [*messages, {"role": "user", "content": input_items}]
    for number, item in enumerate(input_items):
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise bad_input(f"input[{number}].type", "An item's type is a string.")
        translate = ITEM_TRANSLATIONS.get(kind)
        if translate is not None:  # else a reasoning item, or one of a tool no upstream here runs
            translate(messages, item, f"input[{number}]")
    if not messages:
        raise bad_input("input", "The input holds no message for the model.")
    return messages


def chat_tool(tool, param):
    function = {"name": required_text(tool, "name", param)}
    for name in ("description", "parameters", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


def format_note(tool_format):
    """What a custom tool's description says of its input's format: its grammar, if any."""
    if not (isinstance(tool_format, dict) and isinstance(tool_format.get("definition"), str)):
        return None
    syntax = tool_format.get("syntax") if isinstance(tool_format.get("syntax"), str) else ""
    return f"Its `input` follows this {syntax} grammar:\n```{syntax}\n{tool_format['definition']}\n```"


def custom_tool_function(tool, param):
    """A custom tool as a chat function of one string parameter, `input`; its format described."""
    function = {"name": required_text(tool, "name", param), "parameters": CUSTOM_TOOL_PARAMETERS}
    notes = [tool.get("description"), format_note(tool.get("format"))]
    description = PARAGRAPH_BREAK.join(note for note in notes if isinstance(note, str) and note)
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


# The tools the client runs, as chat functions; the others (run by OpenAI itself) are left out.
CHAT_FUNCTIONS = {"function": chat_tool, "custom": custom_tool_function}


def chat_tools(tools):
    """The tools the client runs, as chat's function tools."""
    return [
        named(CHAT_FUNCTIONS, tool.get("type"))(tool, f"tools[{number}]")
        for number, tool in enumerate(tools or [])
        if named(CHAT_FUNCTIONS, tool.get("type"))
    ]


def custom_tool_names(tools):
    return {tool.get("name") for tool in tools or [] if tool.get("type") == "custom"}


def chat_tool_choice(tool_choice):
    """The tool choice in chat's terms, or None where it has none (a tool run by OpenAI)."""
    if tool_choice in TOOL_CHOICE_WORDS:
        return tool_choice
    if not isinstance(tool_choice, dict):
        return None
    if named(CHAT_FUNCTIONS, tool_choice.get("type")) and isinstance(tool_choice.get("name"), str):
        return {"type": "function", "function": {"name": tool_choice["name"]}}
    if tool_choice.get("type") == "allowed_tools" and tool_choice.get("mode") in TOOL_CHOICE_WORDS:
        return tool_choice["mode"]
    return None


def response_format(text):
    """`text.format` as chat's response_format (None for plain text)."""
    text_format = (text or {}).get("format")
    if text_format is None:
        return None
    kind = text_format.get("type") if isinstance(text_format, dict) else None
    if kind == "json_schema":
        if not isinstance(text_format.get("schema"), dict):
            raise bad_input("text.format.schema", "A json_schema format needs its `schema` (an object).")
        fields = ("name", "schema", "strict", "description")
        schema = {name: text_format[name] for name in fields if text_format.get(name) is not None}
        return {"type": "json_schema", "json_schema": {"name": "response", **schema}}
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "text":
        return None
    raise bad_input("text.format.type", "The text format is one of text, json_schema or json_object.")


def chat_options(body, tools):
    options = {name: body[name] for name in SAME_NAMED_OPTIONS if body.get(name) is not None}
    if body.get("max_output_tokens") is not None:
        options["max_completion_tokens"] = body["max_output_tokens"]
    chat_format = response_format(body.get("text"))
    if chat_format:
        options["response_format"] = chat_format
    tool_choice = chat_tool_choice(body.get("tool_choice"))
    if tools and tool_choice is not None:
        options["tool_choice"] = tool_choice
    if tools and body.get("parallel_tool_calls") is not None:
        options["parallel_tool_calls"] = body["parallel_tool_calls"]
    return options


def chat_request_of(body):
    """A Responses body (as the schema loaded it) as the gateway's ChatRequest."""
    tools = chat_tools(body.get("tools"))
    return ChatRequest(
        model=body["model"],
        messages=chat_messages(body.get("instructions"), body["input"]),
        tools=tools or None,
        options=chat_options(body, tools),
        stream=body["stream"],
        include_usage=True,
    )


# The answer -----------------------------------------------------------------------------------


def detail_count(usage, details, name):
    details = usage.get(details)
    count = details.get(name) if isinstance(details, dict) else None
    return count if is_count(count) else 0


def responses_usage(usage):
    """Chat's usage in the Responses API's words (None when the upstream reported none)."""
    if not usage:
        return None
    input_tokens = usage.get("prompt_tokens") or 0
    output_tokens = usage.get("completion_tokens") or 0
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": detail_count(usage, "prompt_tokens_details", "cached_tokens")},
        "output_tokens": output_tokens,
        "output_tokens_details": {
            "reasoning_tokens": detail_count(usage, "completion_tokens_details", "reasoning_tokens")
        },
        "total_tokens": usage.get("total_tokens") or input_tokens + output_tokens,
    }


def text_of(content):
    """A chat message's content as text, whatever shape an upstream gave it."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def output_text(text):
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(text, status="completed"):
    content = [output_text(text)] if text is not None else []
    return {
        "id": new_id("msg"),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def tool_call_item(call_id, name, arguments, custom_tools, status="completed"):
    """A function_call item, or a custom_tool_call item when `name` is one of the custom tools
    (its `input` the text of the arguments)."""
    call = {
        "status": status,
        "call_id": call_id if isinstance(call_id, str) and call_id else new_id("call"),
        "name": name,
    }
    if name in custom_tools:
        return {"id": new_id("ctc"), "type": "custom_tool_call", **call, "input": custom_input(arguments)}
    return {"id": new_id("fc"), "type": "function_call", **call, "arguments": arguments}


def custom_input(arguments):
    """A custom tool's input: the `input` of its call's arguments, else the arguments as they
    are (a model that did not write the JSON asked for)."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except (ValueError, RecursionError):
        return arguments
    return parsed["input"] if isinstance(parsed, dict) and isinstance(parsed.get("input"), str) else arguments


class StreamedInput:
    """A custom tool's input as its call's arguments (`{"input": "..."}`) arrive in parts: each
    part's newly decoded text, as soon as it decodes whole."""

    def __init__(self):
        self.arguments = ""
        self.decoded_to = None  # where the input's string is decoded up to, once its opening came

    def add(self, part):
        self.arguments += part
        if self.decoded_to is None:
            opening = INPUT_OPENING.match(self.arguments)
            if opening is None:
                return ""
            self.decoded_to = opening.end()
        run = WHOLE_STRING_RUN.match(self.arguments, self.decoded_to)
        self.decoded_to = run.end()
        return json.loads(f'"{run.group()}"', strict=False) if run.group() else ""


def arguments_text(arguments):
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def output_of(message, custom_tools):
    """A completion's message as Responses output items: its text, then each tool call."""
    message = message if isinstance(message, dict) else {}
    text = text_of(message.get("content"))
    items = [message_item(text)] if text else []
    tool_calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    for tool_call in tool_calls:
        function = tool_call.get("function") if isinstance(tool_call, dict) else None
        if isinstance(function, dict):
            name = function.get("name") if isinstance(function.get("name"), str) else ""
            arguments = arguments_text(function.get("arguments", ""))
            items.append(tool_call_item(tool_call.get("id"), name, arguments, custom_tools))
    return items


class ResponseObject:
    """The response a call answers: its id and time, and what it repeats of the request."""

    def __init__(self, body):
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.body = body
        self.custom_tools = custom_tool_names(body.get("tools"))

    def document(self, status, output, usage=None, finish_reason=None, error=None):
        body = self.body
        incomplete_reason = named(INCOMPLETE_REASONS, finish_reason)
        if incomplete_reason and status == "completed":
            status = "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": body["model"],
            "output": output,
            "usage": responses_usage(usage),
            "error": error,
            "incomplete_details": {"reason": incomplete_reason} if status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "metadata": body.get("metadata") or {},
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "max_output_tokens": body.get("max_output_tokens"),
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": [tool for tool in body.get("tools") or [] if named(CHAT_FUNCTIONS, tool.get("type"))],
            "text": body.get("text") or {"format": {"type": "text"}},
            "previous_response_id": None,
            "store": False,
        }


def response_of(completion, body):
    """A chat completion as the response object."""
    choices = completion.get("choices") or [{}]
    choice = choices[0]
    response = ResponseObject(body)
    output = output_of(choice.get("message"), response.custom_tools)
    return response.document("completed", output, completion.get("usage"), choice.get("finish_reason"))


class ResponseEvents(Encoder):
    """The stream encoder of the Responses API: `response.created` and `.in_progress` with the
    first chunk; an output item for the text (a message with one output_text part) and one for
    each tool call (a custom tool's its `input`), their deltas as they come; at the end each
    item's `.done` events, then
    `response.completed` (`response.incomplete` when the model was cut off). A failure after
    the first event is `response.failed`."""

    def __init__(self, body):
        self.response = ResponseObject(body)
        self.sequence = itertools.count()
        self.items = []  # output items, in output order
        self.positions = {}  # an item's id -> its output index
        self.message = None  # the item of the text, once text came
        self.calls = {}  # the stream's tool call index -> its item
        self.custom_inputs = {}  # a custom tool call's item id -> its StreamedInput
        self.finish_reason = None
        self.begun = False

    def event(self, kind, **fields):
        return sse({"type": kind, "sequence_number": next(self.sequence), **fields}, event=kind)

    def beginning(self):
        if self.begun:
            return []
        self.begun = True
        document = self.response.document("in_progress", [])
        return [self.event(kind, response=document) for kind in ("response.created", "response.in_progress")]

    def added(self, item):
        self.positions[item["id"]] = len(self.items)
        self.items.append(item)
        return self.event("response.output_item.added", output_index=self.positions[item["id"]], item=item)

    def place(self, item):
        return {"item_id": item["id"], "output_index": self.positions[item["id"]]}

    def text_events(self, text):
        events = []
        if self.message is None:
            self.message = message_item(None, status="in_progress")
            events.append(self.added(self.message))
            self.message["content"].append(output_text(""))
            events.append(self.content_part_event("response.content_part.added"))
        self.message["content"][0]["text"] += text
        events.append(self.event("response.output_text.delta", delta=text, logprobs=[], **self.text_place()))
        return events

    def text_place(self):
        return {**self.place(self.message), "content_index": 0}

    def content_part_event(self, kind):
        return self.event(kind, part=self.message["content"][0], **self.text_place())

    def tool_call_events(self, tool_call):
        function = tool_call.get("function") if isinstance(tool_call.get("function"), dict) else {}
        name = function.get("name") if isinstance(function.get("name"), str) else ""
        index = tool_call.get("index")
        index = index if isinstance(index, int) else len(self.calls)
        item = self.calls.get(index)
        events = []
        if item is None:
            item = tool_call_item(tool_call.get("id"), name, "", self.response.custom_tools, status="in_progress")
            self.calls[index] = item
            if item["type"] == "custom_tool_call":
                self.custom_inputs[item["id"]] = StreamedInput()
            events.append(self.added(item))
        elif name and not item["name"]:
            item["name"] = name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events += self.arguments_events(item, arguments)
        return events

    def arguments_events(self, item, arguments):
        """The delta of a function's arguments, or of a custom tool's input (once it decodes)."""
        if item["type"] == "function_call":
            item["arguments"] += arguments
            return [self.event("response.function_call_arguments.delta", delta=arguments, **self.place(item))]
        text = self.custom_inputs[item["id"]].add(arguments)
        item["input"] += text
        return [self.event("response.custom_tool_call_input.delta", delta=text, **self.place(item))] if text else []

    def events(self, chunk):
        events = self.beginning()
        choice = chunk["choices"][0] if chunk["choices"] else {}
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        if isinstance(delta.get("content"), str) and delta["content"]:
            events += self.text_events(delta["content"])
        for tool_call in delta.get("tool_calls") if isinstance(delta.get("tool_calls"), list) else []:
            if isinstance(tool_call, dict):
                events += self.tool_call_events(tool_call)
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return events

    def item_done_events(self, output_index, item):
        place = {"item_id": item["id"], "output_index": output_index}
        if item["type"] == "message":
            text = item["content"][0]["text"]
            yield self.event("response.output_text.done", text=text, logprobs=[], content_index=0, **place)
            yield self.event("response.content_part.done", part=item["content"][0], content_index=0, **place)
        elif item["type"] == "custom_tool_call":
            yield from self.custom_input_done_events(item, place)
        else:
            yield self.event("response.function_call_arguments.done", arguments=item["arguments"], **place)
        item["status"] = "completed"
        yield self.event("response.output_item.done", output_index=output_index, item=item)

    def custom_input_done_events(self, item, place):
        """The input's last delta (what the decoding could not stream, if anything) and its whole."""
        whole = custom_input(self.custom_inputs[item["id"]].arguments)
        rest = whole.removeprefix(item["input"]) if whole.startswith(item["input"]) else ""
        if rest:
            yield self.event("response.custom_tool_call_input.delta", delta=rest, **place)
        item["input"] = whole
        yield self.event("response.custom_tool_call_input.done", input=whole, **place)

    def end(self, call):
        yield from self.beginning()
        for output_index, item in enumerate(self.items):
            yield from self.item_done_events(output_index, item)
        document = self.response.document("completed", self.items, call.usage, self.finish_reason)
        yield self.event(f"response.{document['status']}", response=document)

    def failure(self, status, message, error_type):
        error = {"code": "server_error", "message": message, "type": error_type}
        document = self.response.document("failed", self.items, error=error)
        return b"".join([*self.beginning(), self.event("response.failed", response=document)])
