"""OpenAI's embeddings, inbound: the body as an EmbeddingsRequest; the answer's floats
base64-encoded here when the client asks so (not every upstream can)."""

import base64
import struct
from functools import partial

from gateway.call import EmbeddingsRequest, call_finished
from gateway.routing import served_answer


def embeddings_request_of(body):
    """An OpenAI embeddings body as the gateway's EmbeddingsRequest; `encoding_format` is the gateway's to apply."""
    options = {name: value for name, value in body.items() if name not in ("model", "input", "encoding_format")}
    return EmbeddingsRequest(body["model"], body["input"], options)


def ask_embeddings(embeddings_request, adapter, target, model, deadline):
    return adapter.embed(target, model, embeddings_request, deadline)


def float32_base64(vector):
    """An embedding as OpenAI's base64: little-endian float32 values."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embeddings(call, body, settings):
    """Embeddings in OpenAI's shape, base64-encoded when the client asked so (as OpenAI's
    own client does by default), `model` the registry's id."""
    request = embeddings_request_of(body)
    target, answer, _ = served_answer(call, "embedding", partial(ask_embeddings, request), settings)
    call.usage = answer.get("usage")
    answer["model"] = call.model
    if body["encoding_format"] == "base64":
        for item in answer.get("data") or []:
            if isinstance(item.get("embedding"), list):
                item["embedding"] = float32_base64(item["embedding"])
    call_finished(call)
    return target, answer
