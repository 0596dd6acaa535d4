"""IBM watsonx.ai: `GET /ml/v1/foundation_model_specs` (with a withdrawn model besides the
upstream's, no key needed), IBM Cloud's IAM token exchange at IAM_PATH, and the calls
`/ml/v1/text/chat`, `/ml/v1/text/chat_stream` (SSE events named `message`, tool calls in
`choices[].delta.tool_calls` with their arguments in parts, usage in the last event) and
`/ml/v1/text/embeddings`, each with `?version=`, an IAM token and a project or space id."""

import json
import time
from urllib.parse import parse_qs, urlsplit

from tests.fakes.model import USAGE, unique_id
from tests.fakes.openai import FINISH_REASONS, chat_answer, chat_deltas, chat_message
from tests.fakes.server import FakeHandler

IAM_PATH = "/identity/token"
IAM_GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
WITHDRAWN_SPEC = {
    "model_id": "ibm/granite-withdrawn",
    "label": "withdrawn",
    "provider": "IBM",
    "lifecycle": [{"id": "available", "start_date": "2023-01-01"}, {"id": "withdrawn", "start_date": "2024-06-01"}],
}


def watsonx_errors(status, code, message):
    """watsonx's error body."""
    return {"errors": [{"code": code, "message": message}], "trace": unique_id("trace-"), "status_code": status}


def identity(body):
    return {
        "id": unique_id("chat-"),
        "model_id": body["model_id"],
        "model": body["model_id"],
        "created": int(time.time()),
        "model_version": "1.0.0",
        "created_at": "2024-10-13T09:27:40.835Z",
    }


class WatsonxHandler(FakeHandler):
    def serve_listing(self, path, query):
        if path != "/ml/v1/foundation_model_specs" or "version" not in query:
            return self.answer(400, watsonx_errors(400, "missing_version", "version is required"))
        resources = [
            {
                "model_id": model,
                "label": model.split("/")[-1],
                "provider": "IBM",
                "functions": [{"id": "text_generation"}],
                "lifecycle": [{"id": "available", "start_date": "2024-01-01"}],
            }
            for model in self.upstream.models
        ]
        resources.append(WITHDRAWN_SPEC)
        return self.answer(200, {"total_count": len(resources), "limit": 200, "resources": resources})

    def own_routes(self):
        return {IAM_PATH: self.serve_iam}

    def call_routes(self):
        return {
            "/ml/v1/text/chat": self.serve_chat,
            "/ml/v1/text/chat_stream": self.serve_chat_stream,
            "/ml/v1/text/embeddings": self.serve_embeddings,
        }

    def refusal(self, path, body):
        if "version" not in parse_qs(urlsplit(self.path).query):
            return 400, watsonx_errors(400, "missing_version", "version is required")
        if self.headers.get("Authorization", "").removeprefix("Bearer ") not in self.upstream.tokens:
            return 401, watsonx_errors(401, "authentication_token_not_valid", "bad token")
        if not (body.get("project_id") or body.get("space_id")):
            return 400, watsonx_errors(400, "invalid_input", "project_id or space_id required")
        if body.get("model_id") not in self.upstream.models:
            return 404, watsonx_errors(404, "model_not_supported", f"Model '{body.get('model_id')}' is not supported")
        return None

    def error_document(self, path, status, message):
        return watsonx_errors(status, "fake_failure", message)

    def serve_iam(self, form):
        """IAM's answer: a new bearer token for the upstream's key, valid `token_lifetime` seconds."""
        upstream = self.upstream
        if upstream.iam_script:
            return upstream.iam_script(self)
        if form.get("grant_type") != IAM_GRANT_TYPE or form.get("apikey") != upstream.api_key:
            return self.answer(400, {"errorCode": "BXNIM0415E", "errorMessage": "Provided API key could not be found."})
        token = upstream.new_iam_token()
        time.sleep(0.05)  # an exchange takes a moment, so concurrent callers overlap
        lifetime = upstream.token_lifetime
        expiration = int(time.time()) + lifetime
        return self.answer(
            200, {"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "expiration": expiration}
        )

    def serve_chat(self, body):
        answer = chat_answer(self.upstream, body)
        choice = {"index": 0, "message": chat_message(answer), "finish_reason": FINISH_REASONS[answer.finish]}
        return self.answer(200, {**identity(body), "choices": [choice], "usage": USAGE})

    def serve_chat_stream(self, body):
        answer = chat_answer(self.upstream, body)
        chunk_identity = identity(body)

        def event(number, document):
            return f"id: {number}\nevent: message\ndata: {json.dumps(document)}\n\n".encode()

        def events():
            number = 0
            for number, delta in enumerate(chat_deltas(answer), start=1):
                yield event(
                    number, {**chunk_identity, "choices": [{"index": 0, "finish_reason": None, "delta": delta}]}
                )
            last = {"index": 0, "finish_reason": FINISH_REASONS[answer.finish], "delta": {}}
            yield event(number + 1, {**chunk_identity, "choices": [last], "usage": USAGE})

        return self.stream(events(), body)

    def serve_embeddings(self, body):
        results = [{"embedding": [0.5, -0.25, float(len(text))]} for text in body["inputs"]]
        document = {
            "model_id": body["model_id"],
            "results": results,
            "created_at": "2024-10-13T09:27:40.835Z",
            "input_token_count": len(body["inputs"]),
        }
        return self.answer(200, document)
