"""The gateway's inbound protocols as its shared tests call them: each protocol's route, a
body asking a model for an answer to a prompt, and how its answer, its stream and its
errors read, and how its official client streams an answer. The tests of what every
protocol holds to (failover, the provider header, the key kept out of errors, deadlines,
size caps, metrics) take a `protocol` (tests/conftest.py) and run once per protocol."""

import json

import anthropic
import openai


def sse_documents(text):
    """The JSON documents of an SSE answer's events, named or not; `[DONE]` left out."""
    documents = []
    for event in text.split("\n\n"):
        data = [line.removeprefix("data:").removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
        if data and data != ["[DONE]"]:
            documents.append(json.loads("\n".join(data)))
    return documents


def keepalives(protocol, text):
    """The keep-alives in a stream's text, after those every stream of the protocol starts with."""
    return text.count(protocol.keepalive) - protocol.keepalives_at_start


class OpenAIErrors:
    """Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}; OpenAI's
    client; a keep-alive is an SSE comment."""

    model_not_found = "model_not_found"  # the code of an unknown model's 404
    rate_limited = "rate_limit_exceeded"  # the code of a call refused by a limit
    keepalive = ": keep-alive\n\n"  # as it shows in the stream's text
    keepalives_at_start = 0

    def openai_client(self, base_url, token, http_client):
        return openai.OpenAI(
            base_url=f"{base_url}/api/v1/openai", api_key=token, http_client=http_client, max_retries=0
        )

    def error_message(self, document):
        return document["error"]["message"]

    def error_code(self, document):
        return document["error"]["code"]


class ChatCompletions(OpenAIErrors):
    name = "chat-completions"
    path = "/api/v1/openai/chat/completions"
    kind = "chat"  # the call's name in the gateway's log lines
    headers = {}

    def body(self, model, prompt="Hi", **fields):
        return {"model": model, "messages": [{"role": "user", "content": prompt}], **fields}

    def text(self, answer):
        return answer["choices"][0]["message"]["content"]

    def stream_text(self, documents):
        return "".join(
            document["choices"][0]["delta"].get("content") or "" for document in documents if document.get("choices")
        )

    def stream_models(self, documents):
        return {document["model"] for document in documents if "model" in document}

    def stream_error(self, documents):
        """The message of the error event that ended the stream, else None."""
        errors = [document["error"]["message"] for document in documents if "error" in document]
        return errors[-1] if errors else None

    def ends_properly(self, text):
        """Whether the stream ended as the protocol ends one, even after a failure."""
        return text.endswith("data: [DONE]\n\n")

    def client_stream_text(self, base_url, token, http_client, model, prompt="Hi"):
        """The text of an answer streamed by the official client."""
        client = self.openai_client(base_url, token, http_client)
        chunks = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


class Responses(OpenAIErrors):
    name = "responses"
    path = "/api/v1/openai/responses"
    kind = "responses"
    headers = {}

    def body(self, model, prompt="Hi", **fields):
        return {"model": model, "input": prompt, **fields}

    def text(self, answer):
        return "".join(
            part["text"] for item in answer["output"] if item["type"] == "message" for part in item["content"]
        )

    def stream_text(self, documents):
        return "".join(document["delta"] for document in documents if document["type"] == "response.output_text.delta")

    def stream_models(self, documents):
        return {document["response"]["model"] for document in documents if "response" in document}

    def stream_error(self, documents):
        failed = [document for document in documents if document["type"] == "response.failed"]
        return failed[-1]["response"]["error"]["message"] if failed else None

    def ends_properly(self, text):
        last = sse_documents(text)[-1]["type"]
        return last in ("response.completed", "response.incomplete", "response.failed")

    def client_stream_text(self, base_url, token, http_client, model, prompt="Hi"):
        events = self.openai_client(base_url, token, http_client).responses.create(
            model=model, input=prompt, stream=True
        )
        return "".join(event.delta for event in events if event.type == "response.output_text.delta")


class Messages:
    """Anthropic's Messages API; errors in Anthropic's shape {"type": "error", "error": {"type", "message"}}."""

    name = "messages"
    path = "/api/v1/anthropic/v1/messages"
    kind = "messages"
    headers = {"anthropic-version": "2023-06-01"}
    model_not_found = "not_found_error"  # the error type of an unknown model's 404
    rate_limited = "rate_limit_error"  # the error type of a call refused by a limit
    keepalive = "event: ping\n"
    keepalives_at_start = 1  # after message_start, as Anthropic sends one

    def body(self, model, prompt="Hi", **fields):
        return {"model": model, "max_tokens": 1024, "messages": [{"role": "user", "content": prompt}], **fields}

    def text(self, answer):
        return "".join(block["text"] for block in answer["content"] if block["type"] == "text")

    def stream_text(self, documents):
        return "".join(
            document["delta"]["text"]
            for document in documents
            if document["type"] == "content_block_delta" and document["delta"]["type"] == "text_delta"
        )

    def stream_models(self, documents):
        return {document["message"]["model"] for document in documents if document["type"] == "message_start"}

    def stream_error(self, documents):
        errors = [document["error"]["message"] for document in documents if document["type"] == "error"]
        return errors[-1] if errors else None

    def ends_properly(self, text):
        return sse_documents(text)[-1]["type"] in ("message_stop", "error")

    def client_stream_text(self, base_url, token, http_client, model, prompt="Hi"):
        client = anthropic.Anthropic(
            base_url=f"{base_url}/api/v1/anthropic", auth_token=token, http_client=http_client, max_retries=0
        )
        messages = [{"role": "user", "content": prompt}]
        with client.messages.stream(model=model, max_tokens=1024, messages=messages) as stream:
            return "".join(stream.text_stream)

    def error_message(self, document):
        return document["error"]["message"]

    def error_code(self, document):
        return document["error"]["type"]


PROTOCOLS = (ChatCompletions(), Responses(), Messages())
