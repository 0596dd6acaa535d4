"""Serve one OpenAI-compatible fake until killed, printing its port (bench/gateway.py):
`python -m tests.fakes`."""

import threading

from tests.fakes import FakeUpstream

if __name__ == "__main__":
    upstream = FakeUpstream("openai", api_key="sk-bench", models=["gpt-4o"])
    print(upstream.port, flush=True)
    threading.Event().wait()
