"""Shared fixtures: real processes on free local ports (Redis, sidecar), nothing mocked."""
from __future__ import annotations

import os

# One compute thread per process: on 2-core CI boxes competing OpenMP pools run ~10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from lenpred.harness.redisproc import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on a free port, owned by the test session (tests may kill/restart it)."""
    srv = RedisServer.start()
    yield srv
    srv.stop()


@pytest.fixture()
def redis_url(redis_server):
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    return redis_server.url
