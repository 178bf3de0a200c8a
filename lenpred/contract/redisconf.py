"""How every component connects to Redis: one URL plus two optional settings from the environment.

    LENPRED_REDIS_URL       redis://[:password@]host:port/db, or rediss://... for TLS
                            (a component's --redis-url flag overrides it)
    LENPRED_REDIS_PASSWORD  AUTH password, used when the URL carries none (the Helm chart sets it
                            from a Secret, so the password never appears in a URL or a flag)
    LENPRED_REDIS_CA_FILE   CA bundle that verifies the server's certificate for rediss://

The router (redis.asyncio), the sidecar and the tools all build clients through `client_kwargs`,
so AUTH and TLS behave the same everywhere.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlparse

URL_ENV = "LENPRED_REDIS_URL"
PASSWORD_ENV = "LENPRED_REDIS_PASSWORD"
CA_ENV = "LENPRED_REDIS_CA_FILE"


def redis_url(flag: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The URL to use: the flag if given, else LENPRED_REDIS_URL, else None (no Redis)."""
    env = os.environ if env is None else env
    return flag or env.get(URL_ENV) or None


def client_kwargs(url: str, env: Mapping[str, str] | None = None) -> dict:
    """Extra keyword arguments for `redis.from_url(url, **kw)` / `redis.asyncio.from_url`."""
    env = os.environ if env is None else env
    u = urlparse(url)
    if u.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://, got {url!r}")
    kw: dict = {}
    if not u.password and env.get(PASSWORD_ENV):
        kw["password"] = env[PASSWORD_ENV]
    if u.scheme == "rediss" and env.get(CA_ENV):
        kw["ssl_ca_certs"] = env[CA_ENV]
    return kw
