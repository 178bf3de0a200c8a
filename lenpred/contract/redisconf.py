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

import redis

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


class RedisAuthError(ValueError):
    """Redis refused our credentials: a configuration error, unlike Redis being down."""


def check_auth(url: str, env: Mapping[str, str] | None = None, timeout_s: float = 2.0) -> str | None:
    """One PING with a deadline at start. Wrong or missing password (or a TLS set-up that cannot
    work): RedisAuthError with a message that says what to set — the component should not start.
    Redis unreachable: returns the reason (Redis is soft state, the caller warns and goes on).
    None: fine."""
    kw = client_kwargs(url, env)
    where = urlparse(url).hostname or url.split("@")[-1]
    try:
        with redis.Redis.from_url(url, **kw, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) as r:
            r.ping()
        return None
    except redis.AuthenticationError as e:
        how = "the password from the URL" if urlparse(url).password else (
            f"{PASSWORD_ENV}" if "password" in kw else f"no password ({PASSWORD_ENV} is not set)")
        raise RedisAuthError(f"Redis at {where} refused authentication with {how}: {e}") from None
    except redis.ResponseError as e:  # e.g. a password sent to a Redis that has none
        raise RedisAuthError(f"Redis at {where} refused the connection set-up: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
        return f"Redis at {where} not reachable now ({e}); predictions are not stored until it is"
