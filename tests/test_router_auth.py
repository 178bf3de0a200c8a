"""API keys, scopes and tenant isolation over real HTTP (SECURITY_CONTRACT.md, docs/SECURITY.md)."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import httpx
import pytest

from lenpred.harness.emulator import start_in_thread
from lenpred.router.app import make_app
from lenpred.router.auth import ANONYMOUS, ApiKeys, AuthConfigError, Scope
from lenpred.router.config import RouterConfig
from tests.test_router_app import FAST, HEAD, chat, received, wait_for
from tests.test_router_limits import RouterThread

KEYS = {"team-a": "a-key-0123456789abcdef", "team-b": "b-key-0123456789abcdef",
        "boss": "p-key-0123456789abcdef", "ops": "o-key-0123456789abcdef"}
KEYS_FILE = f"""keys:
  - {{name: team-a, key: {KEYS['team-a']}, scopes: [inference]}}
  - {{name: team-b, key_sha256: {hashlib.sha256(KEYS['team-b'].encode()).hexdigest()}, scopes: [inference]}}
  - {{name: boss, key: {KEYS['boss']}, scopes: [inference, priority]}}
  - {{name: ops, key: {KEYS['ops']}, scopes: [admin]}}
"""
POLICY = HEAD + """profiles:
  default: {}
  fast: {}
""" + FAST


def bearer(who: str) -> dict:
    return {"authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture()
def secured(tmp_path):
    emu = start_in_thread()
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "keys.yaml").write_text(KEYS_FILE)
    rt = RouterThread(make_app(RouterConfig(backends=[emu.url], policy_path=str(tmp_path / "policy.yaml"),
                                            api_keys_file=str(tmp_path / "keys.yaml"))))
    client = httpx.Client(base_url=rt.url, timeout=10)
    wait_for(lambda: client.get("/ready").status_code == 200, what="replica in the pool")
    yield client, emu
    rt.stop()
    emu.stop()


ACCESS = [
    # (who or header, method, path, expected status)
    (None, "POST", "/v1/chat/completions", 401),
    ("Bearer nope-nope-nope-nope", "POST", "/v1/chat/completions", 401),
    ("Basic dGVhbS1hOmE=", "POST", "/v1/chat/completions", 401),
    ("team-a", "POST", "/v1/chat/completions", 200),
    ("ops", "POST", "/v1/chat/completions", 403),        # admin only: no inference
    ("team-a", "POST", "/v1/lenpred/policy/reload", 403),
    ("ops", "POST", "/v1/lenpred/policy/reload", 200),
    (None, "GET", "/v1/models", 401),
    ("team-b", "GET", "/v1/models", 200),
    (None, "GET", "/health", 200),
    (None, "GET", "/ready", 200),
    (None, "GET", "/metrics", 200),
]


@pytest.mark.parametrize("who,method,path,status", ACCESS, ids=[f"{a[0]}-{a[1]}-{a[2]}" for a in ACCESS])
def test_scopes_decide_who_may_call_what(secured, who, method, path, status):
    client, _ = secured
    headers = bearer(who) if who in KEYS else ({"authorization": who} if who else {})
    r = client.request(method, path, headers=headers, json=chat(2) if method == "POST" else None)
    assert r.status_code == status, r.text[:300]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["type"] == "authentication_error"


def test_priority_and_profiles_need_the_priority_scope(secured):
    client, emu = secured
    r = client.post("/v1/chat/completions", json=chat(2, priority=999), headers={**bearer("team-a"),
                                                                                "x-lenpred-profile": "fast"})
    assert r.status_code == 200
    assert received(emu)[-1]["priority"] is None         # dropped: the default profile sends no priority
    view = client.get(f"/v1/lenpred/requests/{r.headers['x-lenpred-rid']}", headers=bearer("team-a")).json()
    assert view["router"]["profile"] == "default"
    r = client.post("/v1/chat/completions", json=chat(2, priority=999), headers={**bearer("boss"),
                                                                                "x-lenpred-profile": "fast"})
    assert r.status_code == 200 and received(emu)[-1]["priority"] == 999
    assert client.get(f"/v1/lenpred/requests/{r.headers['x-lenpred-rid']}",
                      headers=bearer("boss")).json()["router"]["profile"] == "fast"
    assert client.post("/v1/chat/completions", json=chat(2), headers={**bearer("boss"),
                                                                      "x-lenpred-profile": "nope"}).status_code == 400


def test_a_key_sees_only_its_own_requests_and_rids_are_unguessable(secured):
    client, _ = secured
    rids = [client.post("/v1/chat/completions", json=chat(2), headers=bearer("team-a")).headers["x-lenpred-rid"]
            for _ in range(3)]
    assert all(re.fullmatch(r"lp-[0-9a-f]{8}-[0-9a-f]{32}", rid) for rid in rids) and len(set(rids)) == 3
    # no shared prefix or counter between consecutive rids (128 random bits each)
    assert len({rid[12:20] for rid in rids}) == 3   # after "lp-<router tag>-"
    rid = rids[0]
    assert client.get(f"/v1/lenpred/requests/{rid}", headers=bearer("team-a")).status_code == 200
    assert client.get(f"/v1/lenpred/requests/{rid}-probe", headers=bearer("team-a")).status_code == 404  # none stored
    other = client.get(f"/v1/lenpred/requests/{rid}", headers=bearer("team-b"))
    assert other.status_code == 404 and other.json() == client.get(
        "/v1/lenpred/requests/lp-" + "0" * 32, headers=bearer("team-b")).json()     # not "forbidden": not there
    assert client.get(f"/v1/lenpred/requests/{rid}", headers=bearer("ops")).json()["router"]["state"] == "finished"
    assert client.get(f"/v1/lenpred/requests/{rid}").status_code == 401
    assert 'lenpred_router_auth_failures_total{code="401"}' in client.get("/metrics").text


KEY_FILE_ERRORS = [
    ("keys: []\n", "keys"),
    ("keys:\n  - {name: a, key: short, scopes: [inference]}\n", "at least 16"),
    ("keys:\n  - {name: a, key: 0123456789abcdefgh, key_sha256: " + "ab" * 32 + ", scopes: [inference]}\n",
     "exactly one"),
    ("keys:\n  - {name: a, key_sha256: " + "1" * 64 + ", scopes: [inference]}\n", "quote it"),
    ("keys:\n  - {name: a, key: 0123456789abcdefgh, scopes: [root]}\n", "scopes"),
    ("keys:\n  - {name: a, key: 0123456789abcdefgh, scopes: [inference], extra: 1}\n", "extra"),
    ("keys:\n  - {name: a, key: 0123456789abcdefgh, scopes: [inference]}\n"
     "  - {name: b, key: 0123456789abcdefgh, scopes: [admin]}\n", "listed twice"),
    ("keys: [\n", "invalid YAML"),
    (b"keys: \xff\n", "not UTF-8"),
]


@pytest.mark.parametrize("text,says", KEY_FILE_ERRORS, ids=[e[1] for e in KEY_FILE_ERRORS])
def test_a_bad_keys_file_is_refused_with_a_clear_message(tmp_path, text, says):
    path = tmp_path / "keys.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(AuthConfigError, match=says):
        ApiKeys.load(path)


def test_keys_compare_by_hash_and_no_file_means_anonymous(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS_FILE)
    keys = ApiKeys.load(path)
    assert keys.authenticate(f"Bearer {KEYS['team-b']}").name == "team-b"        # configured by hash only
    assert keys.authenticate(f"bearer  {KEYS['boss']} ").scopes == {Scope.INFERENCE, Scope.PRIORITY}
    assert keys.authenticate(f"Bearer {KEYS['boss']}x") is None and keys.authenticate(None) is None
    assert ApiKeys.disabled().authenticate(None) is ANONYMOUS and ANONYMOUS.may(Scope.ADMIN)


def test_serve_refuses_a_bad_keys_file_at_start(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {name: a, key: short, scopes: [inference]}\n")
    out = subprocess.run([sys.executable, "-m", "lenpred.router.cli", "serve", "--backends", "http://127.0.0.1:9",
                          "--api-keys-file", str(path), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "API keys file" in out.stderr and "at least 16" in out.stderr
