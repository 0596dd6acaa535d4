"""The floor for bench/gateway.py: Flask relaying chat completions to the fake model server.

One route, one pooled httpx client, no checks, the answer streamed through as it comes:
what forwarding a call costs through Flask and gunicorn on their own.
`RELAY_UPSTREAM=http://127.0.0.1:PORT gunicorn -c gunicorn.conf.py bench.relay_app:app`
"""

import os

import httpx
from flask import Flask, Response, request

upstream = httpx.Client(
    base_url=os.environ["RELAY_UPSTREAM"],
    timeout=600,
    limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
)

app = Flask(__name__)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


@app.post("/v1/chat/completions")
def chat_completions():
    headers = {"Content-Type": "application/json", "Authorization": request.headers.get("Authorization", "")}
    outbound = upstream.build_request("POST", "/v1/chat/completions", content=request.get_data(), headers=headers)
    answer = upstream.send(outbound, stream=True)

    def relayed():
        try:
            yield from answer.iter_raw()
        finally:
            answer.close()

    return Response(relayed(), status=answer.status_code, content_type=answer.headers.get("Content-Type"))
