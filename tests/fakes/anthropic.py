"""Anthropic: `GET {base}/models` in pages (one model a page, `after_id` for the next) and
`POST {base}/messages`, each with `x-api-key` and `anthropic-version`; a message as JSON or
as Anthropic's stream of named events (`message_start`; per content block
`content_block_start`, its `text_delta` or `input_json_delta` parts, `content_block_stop`,
with a `ping` after the first start; `message_delta` with the stop reason and output
tokens; `message_stop`); `POST {base}/messages/count_tokens` answers `{"input_tokens": N}`,
N the words of the body's texts (system and messages). Errors in Anthropic's shape. Like the
real API, it also serves OpenAI's chat completions at `{base}/chat/completions` (Bearer key,
OpenAI's shapes)."""

import json

from tests.fakes.model import USAGE, Question, answer_to, argument_parts, pieces_of, takes_free_text, unique_id
from tests.fakes.openai import OpenAIHandler
from tests.fakes.server import sse_event

STOP_REASONS = {"stop": "end_turn", "stop_sequence": "stop_sequence", "length": "max_tokens", "tool_calls": "tool_use"}
# Anthropic's error types by status, as its API answers them (a fake keeps its own table:
# the registry's translation is what the tests check against it).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
ERROR_TYPES |= {404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
COUNT_TOKENS = "/messages/count_tokens"
REQUIRED_FIELDS = {"/messages": ("model", "max_tokens", "messages"), COUNT_TOKENS: ("model", "messages")}
CHAT_COMPLETIONS = "/chat/completions"


def anthropic_error(status, message):
    """Anthropic's error body."""
    error_type = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": unique_id("req_")}


def usage(output_tokens=USAGE["completion_tokens"]):
    return {
        "input_tokens": USAGE["prompt_tokens"],
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }


def is_tool_result(message):
    content = message.get("content")
    return isinstance(content, list) and any(block.get("type") == "tool_result" for block in content)


def messages_question(body):
    """A Messages body as the fake model's question."""
    choice = body.get("tool_choice") or {"type": "auto"}
    last = body["messages"][-1]
    return Question(
        tools=tuple(tool["name"] for tool in body.get("tools") or []),
        free_text_tools=tuple(
            tool["name"] for tool in body.get("tools") or [] if takes_free_text(tool.get("input_schema"))
        ),
        forced_tool=choice.get("name") if choice["type"] == "tool" else None,
        tool_choice={"auto": "auto", "none": "none"}.get(choice["type"], "required"),
        last_is_users=last.get("role") == "user" and not is_tool_result(last),
        max_tokens=body["max_tokens"],
        stop_sequences=tuple(body.get("stop_sequences") or ()),
    )


def texts_of(content):
    if isinstance(content, str):
        return [content]
    return [block.get("text", "") for block in content or [] if isinstance(block, dict)]


def words_in(body):
    """The fake's token count of a body: the words of its system text and its messages' texts."""
    texts = texts_of(body.get("system")) + [
        text for message in body["messages"] for text in texts_of(message.get("content"))
    ]
    return sum(len(text.split()) for text in texts)


def content_blocks(answer):
    """The answer's content: its text, or a sentence and the tool call, as Claude answers."""
    if answer.tool:
        call = {"type": "tool_use", "id": "toolu_01", "name": answer.tool, "input": json.loads(answer.arguments)}
        return [{"type": "text", "text": f"Let me call {answer.tool}."}, call]
    return [{"type": "text", "text": answer.text}]


def block_events(index, block, answer):
    """One content block as stream events: its start (text and input empty), its parts, its stop."""
    empty = {**block, "input": {}} if block["type"] == "tool_use" else {**block, "text": ""}
    yield sse_event({"type": "content_block_start", "index": index, "content_block": empty}, "content_block_start")
    if index == 0:
        yield sse_event({"type": "ping"}, "ping")
    if block["type"] == "tool_use":
        deltas = [
            {"type": "input_json_delta", "partial_json": part} for part in ["", *argument_parts(answer.arguments)]
        ]
    else:
        pieces = [block["text"]] if answer.tool else answer.pieces
        deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
    for delta in deltas:
        yield sse_event({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta")
    yield sse_event({"type": "content_block_stop", "index": index}, "content_block_stop")


class AnthropicHandler(OpenAIHandler):
    def serve_listing(self, path, query):
        if path != "/models" or not self.headers.get("anthropic-version"):
            return self.answer(400, anthropic_error(400, "anthropic-version: header is required"))
        refusal = self.api_key_refusal()
        if refusal:
            return self.answer(*refusal)
        models = self.upstream.models
        after_id = query.get("after_id", [None])[0]
        start = models.index(after_id) + 1 if after_id in models else 0
        page = models[start : start + 1]  # one model per page, to exercise paging
        data = [
            {"type": "model", "id": model, "display_name": model.title(), "created_at": "2025-02-19T00:00:00Z"}
            for model in page
        ]
        has_more = start + 1 < len(models)
        return self.answer(200, {"data": data, "has_more": has_more, "first_id": page[0], "last_id": page[-1]})

    def call_routes(self):
        return {"/messages": self.serve_messages, COUNT_TOKENS: self.serve_count, CHAT_COMPLETIONS: self.serve_chat}

    def api_key_refusal(self):
        """401 unless the key came as `x-api-key` (or as a Bearer token, as the current SDK
        sends it), quoting what was sent: the registry must not repeat it."""
        sent = self.headers.get("x-api-key") or self.headers.get("Authorization", "").removeprefix("Bearer ")
        if sent != self.upstream.api_key:
            return 401, anthropic_error(401, f"invalid x-api-key: {sent}")
        return None

    def refusal(self, path, body):
        if path == CHAT_COMPLETIONS:
            return super().refusal(path, body)
        if not self.headers.get("anthropic-version"):
            return 400, anthropic_error(400, "anthropic-version: header is required")
        refusal = self.api_key_refusal()
        if refusal:
            return refusal
        missing = [name for name in REQUIRED_FIELDS[path] if not body.get(name)]
        if missing:
            return 400, anthropic_error(400, f"{missing[0]}: Field required")
        if body["model"] not in self.upstream.models:
            return 404, anthropic_error(404, f"model: {body['model']}")
        return None

    def error_document(self, path, status, message):
        if path == CHAT_COMPLETIONS:
            return super().error_document(path, status, message)
        return anthropic_error(status, message)

    def serve_count(self, body):
        return self.answer(200, {"input_tokens": words_in(body)})

    def serve_messages(self, body):
        answer = answer_to(messages_question(body), pieces_of(self.upstream, body))
        message = {
            "id": unique_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content_blocks(answer),
            "stop_reason": STOP_REASONS[answer.finish],
            "stop_sequence": answer.stop_sequence,
            "usage": usage(),
        }
        if body.get("stream"):
            return self.stream(self.message_events(message, answer), body)
        return self.answer(200, message)

    def message_events(self, message, answer):
        started = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage(1)}
        yield sse_event({"type": "message_start", "message": started}, "message_start")
        for index, block in enumerate(message["content"]):
            yield from block_events(index, block, answer)
        stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
        delta = {"type": "message_delta", "delta": stop, "usage": {"output_tokens": USAGE["completion_tokens"]}}
        yield sse_event(delta, "message_delta")
        yield sse_event({"type": "message_stop"}, "message_stop")
