"""Fake upstream providers: small local servers that speak each real wire format, listings,
calls and streams alike, with knobs for the faults a test needs.

- server.py: what every fake shares (the server, the knobs applied to each request, JSON
  answers, trickles, SSE streams), and BlackHole and Rendezvous;
- model.py: what the fake model answers (text, tool calls, stop reasons, usage), whatever
  format asks;
- openai.py, watsonx.py, anthropic.py: one module per wire format;
- upstream.py: FakeUpstream(flavor=...), the one class tests start (the `fake_upstream`
  fixture of tests/conftest.py).
"""

from tests.fakes.server import BlackHole, Rendezvous
from tests.fakes.upstream import FakeUpstream

__all__ = ["BlackHole", "FakeUpstream", "Rendezvous"]
