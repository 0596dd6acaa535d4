"""LOG_FORMAT=json under the `flask` command: every log line is one JSON object.

A command writes what it was asked for (a sync's summary, a created token) on standard
output and its log lines on standard error, so every line of standard error is a log line.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, registry_environ

pytestmark = pytest.mark.slow  # each test runs a CLI process of its own: seconds

LOG_FIELDS = {"time", "level", "logger", "message"}
MANIFEST = """\
model_providers:
  - type: ollama
    base_url: http://127.0.0.1:9/v1
    api_key: ""
"""


def flask_command(instance_path, *arguments, **overrides):
    environ = registry_environ(
        instance_path, DATABASE_URL=f"sqlite:///{instance_path}/registry.db", LOG_FORMAT="json", **overrides
    )
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *arguments],
        cwd=ROOT,
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


def log_records(done):
    """Every line of the command's standard error, each parsed as a JSON object with the log fields."""
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    for record in records:
        assert isinstance(record, dict) and record.keys() >= LOG_FIELDS, record
    return records


def test_db_upgrade_logs_each_migration_as_json(tmp_path):
    upgrade = flask_command(tmp_path, "db", "upgrade")
    messages = [record["message"] for record in log_records(upgrade)]
    assert any(message.startswith("Running upgrade  -> 0001") for message in messages), messages
    assert upgrade.stdout == ""


def test_users_bootstrap_logs_as_json(tmp_path):
    log_records(flask_command(tmp_path, "db", "upgrade"))
    bootstrap = flask_command(tmp_path, "users", "bootstrap")
    (record,) = log_records(bootstrap)
    assert (record["level"], record["logger"]) == ("WARNING", "registry")
    assert record["message"].startswith("created admin user 'admin'")


def test_registry_sync_logs_as_json_and_prints_its_summary(tmp_path):
    manifest_path = tmp_path / "providers.yaml"
    manifest_path.write_text(MANIFEST)
    log_records(flask_command(tmp_path, "db", "upgrade"))
    sync = flask_command(tmp_path, "registry", "sync", REGISTRY_MANIFESTS=str(manifest_path))
    summary = f"{manifest_path.as_uri()}: 1 added, 0 updated, 0 removed, 0 unchanged"
    assert [record["message"] for record in log_records(sync)] == [f"manifest sync of {summary}"]
    assert sync.stdout == f"{summary}\n"
