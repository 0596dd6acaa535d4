"""A token's limits are exact across instances on one PostgreSQL database, each instance
with several workers."""

import pytest

from tests.conftest import SHARED_ENCRYPTION_KEY, TEST_DATABASE_URL, database_url
from tests.test_limits import caller_token
from tests.test_limits_over_gunicorn import calls_at_once

pytestmark = pytest.mark.skipif(
    not TEST_DATABASE_URL,
    reason="needs TEST_DATABASE_URL: instances share a PostgreSQL database (SQLite serves one machine)",
)


@pytest.fixture
def registry(make_app):
    """The app on the instances' database, with their encryption key, to register the fake
    model server and make tokens."""
    return make_app(REGISTRY_VERIFY_ON_CREATE="true", REGISTRY_ENCRYPTION_KEYS=SHARED_ENCRYPTION_KEY)


def test_requests_per_minute_is_exact_across_instances(instance_path, start_instances, registry, upstream):
    servers = start_instances(2, database_url(instance_path))
    secret = caller_token(registry, requests_per_minute=10)
    assert calls_at_once([server.base_url for server in servers], secret, 40) == [200] * 10 + [429] * 30
    assert len(upstream.calls) == 10


def test_max_parallel_is_exact_across_instances(instance_path, start_instances, registry, upstream):
    servers = start_instances(2, database_url(instance_path))
    secret = caller_token(registry, max_parallel=3)
    upstream.delay = 2.0
    assert calls_at_once([server.base_url for server in servers], secret, 16) == [200] * 3 + [429] * 13
