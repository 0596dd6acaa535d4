"""OpenAI-compatible upstreams: `GET {base}/models` and its variants (RITS's key header,
GitHub Models' catalog at the host's root, Voyage's missing listing; a keyless server, as
Ollama is, wants no Authorization at all), `POST {base}/chat/completions` as JSON or SSE
chunks (tool calls with their arguments in parts, the usage chunk when asked for) and
`POST {base}/embeddings`."""

import time

from tests.fakes.model import USAGE, Question, answer_to, argument_parts, pieces_of, takes_free_text, unique_id
from tests.fakes.server import FakeHandler, sse_event

SSE_DONE = b"data: [DONE]\n\n"
FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}
OWNERS = {"rits": "rits", "openai": "fake"}
TOOL_CALL_ID = "call_1"


def chat_question(body):
    """An OpenAI chat body (watsonx's too: `tool_choice_option` is its word for a string choice)."""
    functions = [tool["function"] for tool in body.get("tools") or []]
    choice = body.get("tool_choice") or body.get("tool_choice_option") or "auto"
    stop = body.get("stop") or ()
    messages = body.get("messages") or [{}]
    return Question(
        tools=tuple(function["name"] for function in functions),
        free_text_tools=tuple(
            function["name"] for function in functions if takes_free_text(function.get("parameters"))
        ),
        forced_tool=choice["function"]["name"] if isinstance(choice, dict) else None,
        tool_choice=choice if isinstance(choice, str) else "required",
        last_is_users=messages[-1].get("role") == "user",
        json_mode=(body.get("response_format") or {}).get("type") in ("json_object", "json_schema"),
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
        stop_sequences=(stop,) if isinstance(stop, str) else tuple(stop),
    )


def chat_answer(upstream, body):
    return answer_to(chat_question(body), pieces_of(upstream, body))


def chat_message(answer):
    """The answer as a chat completion's message."""
    if answer.tool:
        function = {"name": answer.tool, "arguments": answer.arguments}
        call = {"id": TOOL_CALL_ID, "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"role": "assistant", "content": answer.text}


def chat_deltas(answer):
    """The answer as a stream's deltas: the role first, then each piece of text or of the
    tool call (its id and name, then its arguments in parts)."""
    if answer.tool:
        function = {"name": answer.tool, "arguments": ""}
        yield {
            "role": "assistant",
            "tool_calls": [{"index": 0, "id": TOOL_CALL_ID, "type": "function", "function": function}],
        }
        for part in argument_parts(answer.arguments):
            yield {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
        return
    yield {"role": "assistant", "content": ""}
    for piece in answer.pieces:
        yield {"content": piece}


class OpenAIHandler(FakeHandler):
    def serve_listing(self, path, query):
        flavor = self.upstream.flavor
        if flavor == "voyage":
            return self.answer(404, {"detail": "Not Found"})
        if path != ("/catalog/models" if flavor == "github" else "/models"):
            return self.answer(404, self.error_document(path, 404, "not found"))
        refusal = self.bearer_refusal()
        if refusal:
            return self.answer(*refusal)
        if flavor == "github":
            return self.answer(200, self.github_catalog())
        owner = OWNERS.get(flavor, flavor)
        data = [
            {"id": model, "object": "model", "created": 1700000000, "owned_by": owner} for model in self.upstream.models
        ]
        return self.answer(200, {"object": "list", "data": data})

    def github_catalog(self):
        return [
            {"id": model, "name": model.split("/")[-1].upper(), "publisher": model.split("/")[0], "registry": "azureml"}
            for model in self.upstream.models
        ]

    def call_routes(self):
        routes = {"/embeddings": self.serve_embeddings}
        if self.upstream.flavor != "voyage":
            routes["/chat/completions"] = self.serve_chat
        return routes

    def bearer_refusal(self):
        """401 quoting the key that was sent, as real upstreams do: the registry must not repeat it."""
        upstream = self.upstream
        sent = self.headers.get("Authorization")
        if sent != (f"Bearer {upstream.api_key}" if upstream.api_key else None):
            message = f"Incorrect API key provided: {sent}"
            return 401, {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}}
        if upstream.flavor == "rits" and self.headers.get("RITS_API_KEY") != upstream.api_key:
            return 401, {"error": {"message": "RITS_API_KEY missing or wrong", "type": "invalid_request_error"}}
        return None

    def refusal(self, path, body):
        refusal = self.bearer_refusal()
        if refusal:
            return refusal
        if body.get("model") not in self.upstream.models:
            message = f"The model {body.get('model')} does not exist"
            return 404, {"error": {"message": message, "type": "invalid_request_error", "code": "model_not_found"}}
        return None

    def error_document(self, path, status, message):
        error_type = "server_error" if status >= 500 else "invalid_request_error"
        return {"error": {"message": message, "type": error_type, "param": None, "code": None}}

    def serve_chat(self, body):
        answer = chat_answer(self.upstream, body)
        identity = {"id": unique_id("chatcmpl-"), "created": int(time.time()), "model": body["model"]}
        if body.get("stream"):
            return self.stream(self.chat_events(answer, body, identity), body)
        choice = {"index": 0, "message": chat_message(answer), "finish_reason": FINISH_REASONS[answer.finish]}
        completion = {**identity, "object": "chat.completion", "choices": [{**choice, "logprobs": None}]}
        return self.answer(200, {**completion, "usage": USAGE, "system_fingerprint": "fp_fake"})

    def chat_events(self, answer, body, identity):
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        usage = {"usage": None} if include_usage else {}

        def chunk(delta, finish_reason=None):
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return sse_event({**identity, "object": "chat.completion.chunk", "choices": [choice], **usage})

        for delta in chat_deltas(answer):
            yield chunk(delta)
        yield chunk({}, FINISH_REASONS[answer.finish])
        if include_usage:
            yield sse_event({**identity, "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
        yield SSE_DONE

    def serve_embeddings(self, body):
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": index, "embedding": [0.5, -0.25, float(len(str(text)))]}
            for index, text in enumerate(inputs)
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return self.answer(200, {"object": "list", "data": data, "model": body["model"], "usage": usage})
