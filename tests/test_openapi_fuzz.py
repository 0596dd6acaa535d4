"""Schemathesis against the served /openapi.json, over a socket to gunicorn, as admin."""

import os
import subprocess
import sys

from tests.conftest import PASSWORDS

CONFIG = os.path.join(os.path.dirname(__file__), "schemathesis.toml")
SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "schemathesis")
# Bounded so the suite stays fast: a few dozen cases per operation and phase, 40 s at most.
BOUNDS = ["--max-examples", "25", "--max-time", "40", "--request-timeout", "10"]
# A keep-alive connection the server closed while idle is retried, as any HTTP client would;
# a worker that died would still show in the server's log, checked below.
RETRIES = ["--request-retries", "2"]
CHECKS = ["--checks", "all"]
# Operations that call the providers' upstreams are left out: generated providers point
# at arbitrary hosts, and tests send no traffic beyond this machine. Fake upstreams
# cover them (test_upstreams.py, test_catalog.py, test_prober.py, test_gateway.py, test_responses.py,
# test_messages.py).
CALLS_UPSTREAMS = [
    "--exclude-path-regex",
    "(/models|/match|/resolve|/check|/chat/completions|/responses|/messages|/count_tokens|/embeddings)$",
]


def test_every_operation_answers_as_its_document_says(start_gunicorn, tmp_path):
    # Failed-login refusals (429) are tested in test_credentials.py; here they would only
    # stand in the way of the checks that send wrong credentials on purpose.
    server = start_gunicorn(workers=2, REGISTRY_LOGIN_FAILURES="1000000")
    command = [SCHEMATHESIS, "--config-file", CONFIG, "run", f"{server.base_url}/openapi.json"]
    command += ["--auth", f"admin:{PASSWORDS['admin']}", *CHECKS, *CALLS_UPSTREAMS, *BOUNDS, *RETRIES]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    log = server.log()
    assert "Traceback" not in log and "CRITICAL" not in log
