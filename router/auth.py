"""API keys, scopes and tenants (the names are the shared contract, /work SECURITY_CONTRACT.md;
the threat model is docs/SECURITY.md).

The keys file (`--api-keys-file`, env `LENPRED_ROUTER_API_KEYS_FILE`):

    keys:
      - name: team-a            # tenant name; requests are owned by it
        key_sha256: <hex>       # or `key: <plain>` (hashed at load)
        scopes: [inference]     # inference | priority | admin

- `inference`: the OpenAI endpoints (and batch submissions);
- `priority`: may set `priority` and pick a profile (`x-lenpred-profile`); without it a client-set
  `priority` is dropped before the request reaches the engine and the profile is `default`;
- `admin`: every tenant's `/v1/lenpred/requests/{rid}`, policy reload.

A request carries `Authorization: Bearer <key>`. The key is hashed (SHA-256) and compared with every
configured hash in constant time (`hmac.compare_digest`, no early exit), so neither the comparison
nor the loop says which key was close. Without a keys file the router serves everyone as `anonymous`
with every scope (demo and tests) and warns at start.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

KEYS_FILE_ENV = "LENPRED_ROUTER_API_KEYS_FILE"
MAX_KEYS_FILE_BYTES = 1 << 20


class Scope(str, enum.Enum):
    INFERENCE = "inference"
    PRIORITY = "priority"
    ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the tenant that owns it and what it may do."""

    name: str
    scopes: frozenset[Scope]

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes


ANONYMOUS = Caller("anonymous", frozenset(Scope))
"""Every request when no keys are configured."""


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    key: str | None = Field(None, min_length=16, max_length=4096)
    scopes: list[Scope] = Field(min_length=1)

    @field_validator("key_sha256", "key", mode="before")
    @classmethod
    def _quoted(cls, v):
        if v is not None and not isinstance(v, str):
            raise ValueError("must be a string (quote it: YAML reads an all-digit value as a number)")
        return v

    @model_validator(mode="after")
    def _one_key(self) -> "_KeyEntry":
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of `key_sha256` and `key`")
        return self


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[_KeyEntry] = Field(min_length=1)


class AuthConfigError(ValueError):
    """An unusable keys file; the message says what and where."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ApiKeys:
    """The configured keys, or none (`ApiKeys.disabled()`: everyone is ANONYMOUS)."""

    def __init__(self, entries: list[tuple[bytes, Caller]]):
        self._entries = entries

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @classmethod
    def disabled(cls) -> "ApiKeys":
        return cls([])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ApiKeys":
        source = str(path)
        try:
            raw = Path(path).read_bytes()
            if len(raw) > MAX_KEYS_FILE_BYTES:
                raise AuthConfigError(f"API keys file {source}: larger than {MAX_KEYS_FILE_BYTES} bytes")
            data = yaml.safe_load(raw.decode("utf-8"))
            spec = _KeysFile.model_validate(data)
        except OSError as e:
            raise AuthConfigError(f"API keys file {source}: cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise AuthConfigError(f"API keys file {source}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise AuthConfigError(f"API keys file {source}: invalid YAML: {e}") from None
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise AuthConfigError(f"API keys file {source}: {problems}") from None
        entries, seen = [], set()
        for k in spec.keys:
            d = bytes.fromhex(k.key_sha256) if k.key_sha256 else digest(k.key)
            if d in seen:
                raise AuthConfigError(f"API keys file {source}: the key of {k.name!r} is listed twice")
            seen.add(d)
            entries.append((d, Caller(k.name, frozenset(k.scopes))))
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Caller | None:
        """The caller an `Authorization` header names; None for a missing or unknown key."""
        if not self._entries:
            return ANONYMOUS
        if not authorization:
            return None
        kind, _, key = authorization.partition(" ")
        if kind.lower() != "bearer" or not key.strip():
            return None
        presented = digest(key.strip())
        found = None
        for d, caller in self._entries:      # every entry, whatever matched: no timing hint
            if hmac.compare_digest(d, presented):
                found = caller
        return found
