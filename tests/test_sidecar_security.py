"""Tap -> sidecar TLS / mTLS and Redis AUTH / TLS, with real processes and sockets: throwaway CAs
and certificates (lenpred/harness/certs.py), real sidecars, a real password-protected Redis, the
real tap sender."""
from __future__ import annotations

import os
import subprocess

import grpc
import pytest
import redis
import torch

from lenpred.contract import keys, redisconf, wire
from lenpred.contract.grpctls import ClientTLS, ServerTLS, TLSConfigError, open_channel
from lenpred.contract.prediction import Prediction
from lenpred.harness.certs import CA
from lenpred.harness.procs import lenpred_argv, spawn, wait_grpc
from lenpred.harness.redisproc import RedisServer, free_port
from lenpred.proto.v1 import lenpred_pb2 as pb
from lenpred.proto.v1 import lenpred_pb2_grpc as pb_grpc
from lenpred.sidecar.server import SidecarConfig
from lenpred.tap.config import TapConfig
from lenpred.tap.core import Tap
from lenpred.tap.sender import TapSender
from lenpred.bench._thread import SidecarThread, write_random_heads
from lenpred.harness.waiting import eventually

D = 16
MODEL = "test/model"
HEAD = pb.HeadSelector(model_id=MODEL, hidden_size=D, layer=-1)
PASSWORD = "s3cret-redis-pass"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA.create(d / "ca", "ca"), CA.create(d / "other", "other-ca")
    return {
        "ca": ca.cert, "other_ca": other.cert,
        "server": ca.issue("sidecar", dns=["localhost"], ips=["127.0.0.1"]),
        "named": ca.issue("sidecar-named", dns=["sidecar.example"]),  # no IP SAN: needs the server name
        "client": ca.issue("tap", client=True, server=False),
        "rogue": other.issue("rogue-tap", client=True, server=False),
        "dir": d,
    }


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    return write_random_heads(tmp_path_factory.mktemp("heads"), D, MODEL)


def _server_tls(pki, mode: str) -> dict:
    if mode == "plain":
        return {}
    cert = pki["named"] if mode == "named" else pki["server"]
    kw = {"tls_cert": str(cert.cert), "tls_key": str(cert.key)}
    if mode == "mtls":
        kw["tls_client_ca"] = str(pki["ca"])
    return kw


@pytest.fixture(scope="module")
def sidecars(pki, heads_dir):
    """One real sidecar per server mode, shared by the table below."""
    out = {m: SidecarThread(SidecarConfig(port=0, heads=[str(heads_dir)], device="cpu", **_server_tls(pki, m)))
           for m in ("plain", "tls", "mtls", "named")}
    yield out
    for s in out.values():
        s.stop()


def _client(pki, spec: str) -> ClientTLS | None:
    """ca / other_ca / ca+client / ca+rogue / ca@sidecar.example / ca@wrong.example / plain"""
    if spec == "plain":
        return None
    roots, _, name = spec.partition("@")
    ca, _, who = roots.partition("+")
    leaf = pki[who] if who else None
    return ClientTLS(ca=str(pki[ca]), server_name=name, cert=str(leaf.cert) if leaf else "",
                     key=str(leaf.key) if leaf else "")


# (server mode, client spec, served?)
TLS_CASES = [
    ("tls", "ca", True),
    ("mtls", "ca+client", True),
    ("named", "ca@sidecar.example", True),
    ("plain", "plain", True),
    ("mtls", "ca", False),              # mTLS without a client certificate
    ("mtls", "ca+rogue", False),        # client certificate signed by another CA
    ("tls", "other_ca", False),         # the client does not trust the sidecar's CA
    ("tls", "plain", False),            # plaintext client to a TLS sidecar
    ("plain", "ca", False),             # TLS client to a plaintext sidecar
    ("named", "ca", False),             # certificate does not name 127.0.0.1, no server name given
    ("named", "ca@wrong.example", False),
]


@pytest.mark.parametrize("server,client,served", TLS_CASES, ids=[f"{s}-{c}" for s, c, _ in TLS_CASES])
def test_tls_table(pki, sidecars, server, client, served):
    sc = sidecars[server]
    req = pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(torch.randn(2, D)))
    with open_channel(sc.target, _client(pki, client)) as ch:
        stub = pb_grpc.LengthPredictorStub(ch)
        if served:
            assert len(stub.Predict(req, timeout=10).predictions) == 2
            acks = list(stub.Ingest(iter([_prefill("tls-ok", seq=1)]), timeout=10))
            assert [(a.seq, a.code, a.accepted) for a in acks] == [(1, 0, 1)]
        else:
            with pytest.raises(grpc.RpcError) as ei:
                stub.Predict(req, timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    # a refused client leaves the sidecar serving the right ones
    with open_channel(sc.target, _client(pki, {"plain": "plain", "tls": "ca", "mtls": "ca+client",
                                               "named": "ca@sidecar.example"}[server])) as ch:
        assert len(pb_grpc.LengthPredictorStub(ch).Predict(req, timeout=10).predictions) == 2


def _prefill(rid: str, seq: int = 0) -> pb.IngestBatch:
    b = pb.IngestBatch(head=HEAD, seq=seq)
    b.prefill.rids.append(rid)
    b.prefill.vectors.CopyFrom(wire.encode(torch.randn(1, D)))
    return b


# ------------------------------------------------------------------ configuration errors, at start
def _bad_files(pki, tmp):
    not_pem = tmp / "not.pem"
    not_pem.write_text("hello")
    srv, cli = pki["server"], pki["client"]
    return {"missing": str(tmp / "missing.crt"), "not_pem": str(not_pem), "cert": str(srv.cert),
            "key": str(srv.key), "other_key": str(cli.key), "ca": str(pki["ca"]), "client_cert": str(cli.cert),
            "client_key": str(cli.key), "dir": str(tmp)}


SERVER_ERRORS = [  # (cert, key, client_ca, message part)
    ("missing", "key", None, "cannot read"),
    ("cert", "missing", None, "cannot read"),
    ("not_pem", "key", None, "not a PEM file"),
    ("cert", "other_key", None, "unusable"),          # key of another certificate
    ("cert", None, None, "go together"),
    (None, None, "ca", "go together"),
    ("cert", "key", "missing", "cannot read"),
    ("cert", "key", "not_pem", "not a PEM file"),
    ("cert", "key", "dir", "cannot read"),            # a folder, not a file
]


@pytest.mark.parametrize("cert,key,client_ca,msg", SERVER_ERRORS, ids=[f"{c}-{k}-{a}" for c, k, a, _ in SERVER_ERRORS])
def test_server_tls_config_errors_name_the_file(pki, tmp_path, cert, key, client_ca, msg):
    f = _bad_files(pki, tmp_path)
    tls = ServerTLS(f.get(cert), f.get(key), f.get(client_ca))
    with pytest.raises(TLSConfigError, match=msg) as ei:
        tls.check()
    bad = [f[n] for n in (cert, key, client_ca) if n in ("missing", "not_pem", "dir")]
    assert all(p in str(ei.value) for p in bad)


CLIENT_ERRORS = [  # tap environment -> message part
    ({"LENPRED_SIDECAR_TLS_CA": "missing"}, "cannot read"),
    ({"LENPRED_SIDECAR_TLS_CA": "not_pem"}, "not a PEM file"),
    ({"LENPRED_SIDECAR_TLS_CA": "ca", "LENPRED_SIDECAR_TLS_CERT": "client_cert"}, "go together"),
    ({"LENPRED_SIDECAR_TLS_CA": "ca", "LENPRED_SIDECAR_TLS_CERT": "client_cert",
      "LENPRED_SIDECAR_TLS_KEY": "missing"}, "cannot read"),
    ({"LENPRED_SIDECAR_TLS_CA": "ca", "LENPRED_SIDECAR_TLS_CERT": "client_cert",
      "LENPRED_SIDECAR_TLS_KEY": "key"}, "unusable"),
    ({"LENPRED_SIDECAR_TLS_SERVER_NAME": "sidecar.example"}, "TLS is off"),
]


@pytest.mark.parametrize("env,msg", CLIENT_ERRORS, ids=[",".join(f"{k[20:]}={v}" for k, v in e.items()) for e, _ in CLIENT_ERRORS])
def test_tap_tls_config_errors_at_start(pki, tmp_path, env, msg):
    f = _bad_files(pki, tmp_path)
    full = {"LENPRED_SIDECAR": "127.0.0.1:1"}
    full.update({k: f.get(v, v) for k, v in env.items()})
    with pytest.raises(TLSConfigError, match=msg):
        TapConfig.from_env(full)
    # the plugin's register() turns this ValueError into "lenpred tap disabled: invalid configuration"
    assert issubclass(TLSConfigError, ValueError)


def test_tap_config_reads_tls_environment(pki):
    c = pki["client"]
    cfg = TapConfig.from_env({"LENPRED_SIDECAR_TLS_CA": str(pki["ca"]), "LENPRED_SIDECAR_TLS_CERT": str(c.cert),
                              "LENPRED_SIDECAR_TLS_KEY": str(c.key), "LENPRED_SIDECAR_TLS_SERVER_NAME": "x.example"})
    assert cfg.tls == ClientTLS(str(pki["ca"]), "x.example", str(c.cert), str(c.key)) and cfg.tls.enabled
    assert not TapConfig.from_env({}).tls.enabled


def test_sidecar_cli_refuses_missing_certificate(tmp_path):
    cp = subprocess.run(lenpred_argv("sidecar", "--port", "0", "--tls-cert", str(tmp_path / "nope.crt"),
                                     "--tls-key", str(tmp_path / "nope.key")),
                        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cp.returncode == 2, cp.stderr[-2000:]
    assert f"{tmp_path / 'nope.crt'}: cannot read" in cp.stderr


# ------------------------------------------------------------------ tap -> TLS sidecar -> Redis with a password
@pytest.fixture(scope="module")
def auth_redis():
    srv = RedisServer.start(password=PASSWORD)
    yield srv
    srv.stop()


def _wait(pred, timeout=20.0):
    return eventually(pred, timeout, interval=0.05)


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_tap_streams_through_tls_to_sidecar_and_password_redis(pki, heads_dir, auth_redis, tmp_path, mtls):
    """The real `lenpred sidecar` process with TLS flags and LENPRED_REDIS_PASSWORD; the real tap
    (TapConfig from the engine environment -> TapSender -> Tap)."""
    port, srv = free_port(), pki["server"]
    argv = ["sidecar", "--port", str(port), "--heads", str(heads_dir), "--device", "cpu",
            "--redis-url", auth_redis.url, "--tls-cert", str(srv.cert), "--tls-key", str(srv.key)]
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if mtls:
        argv += ["--tls-client-ca", str(pki["ca"])]
        env.update({"LENPRED_SIDECAR_TLS_CERT": str(pki["client"].cert), "LENPRED_SIDECAR_TLS_KEY": str(pki["client"].key)})
    env["LENPRED_SIDECAR_TLS_CA"] = str(pki["ca"])
    side = spawn("sidecar", lenpred_argv(*argv), tmp_path, env={"LENPRED_REDIS_PASSWORD": PASSWORD})
    sender = None
    try:
        cfg = TapConfig.from_env({"LENPRED_SIDECAR": f"127.0.0.1:{port}", "LENPRED_TAP_EVERY": "4", **env})
        wait_grpc(side, cfg.sidecar, 90, tls=cfg.tls)
        sender = TapSender(cfg.sidecar, engine_id="tls-test", tls=cfg.tls)
        tap = Tap(cfg, model_id=MODEL, hidden_size=D, sender=sender)
        # one engine step at a time, each acknowledged (engine steps are ms apart; the sidecar runs
        # the batches of one stream concurrently, so back-to-back steps could land out of order)
        tap.on_extend(["req-tls"], torch.randn(7, D), torch.rand(7), [7], [7])
        tap.end_step()
        assert _wait(lambda: sender.stats.sent == 1), (sender.stats, side.log_tail())
        tap.on_decode(["req-tls"], [4], torch.randn(1, D))
        tap.end_step()
        assert _wait(lambda: sender.stats.sent == 2), sender.stats
        tap.on_finished("req-tls", output_tokens=9, prompt_tokens=7)
        tap.end_step()
        assert _wait(lambda: sender.stats.sent == 3), sender.stats
        r = redis.Redis.from_url(auth_redis.url, password=PASSWORD)
        key = keys.pred_key("default", "req-tls")
        assert _wait(lambda: r.hget(key, "true_len") == b"9" and r.hget(key, "source") == b"plp"), \
            (sender.stats, side.log_tail())
        rec = Prediction.from_hash(r.hgetall(key))
        assert rec.p50 > 0 and rec.true_len == 9
        assert sender.stats.sent == 3 and sender.stats.dropped == 0 and sender.stats.rejected == 0
        with pytest.raises(redis.AuthenticationError):  # the Redis really wants the password
            redis.Redis.from_url(auth_redis.url).get(key)
        if mtls:  # the same sidecar refuses a tap without a client certificate
            with open_channel(cfg.sidecar, ClientTLS(ca=str(pki["ca"]))) as ch:
                with pytest.raises(grpc.RpcError):
                    pb_grpc.LengthPredictorStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=10)
        assert "TLS" in side.log_tail(200)
    finally:
        if sender is not None:
            sender.close()
        side.stop()


@pytest.mark.parametrize("password,msg", [("wrong-pass", "refused authentication with LENPRED_REDIS_PASSWORD"),
                                          (None, "no password (LENPRED_REDIS_PASSWORD is not set)")],
                         ids=["wrong", "missing"])
def test_sidecar_cli_wrong_redis_password_is_a_clear_error(auth_redis, heads_dir, password, msg):
    env = {k: v for k, v in os.environ.items() if k != "LENPRED_REDIS_PASSWORD"}
    env["OMP_NUM_THREADS"] = "1"
    if password:
        env["LENPRED_REDIS_PASSWORD"] = password
    cp = subprocess.run(lenpred_argv("sidecar", "--port", "0", "--heads", str(heads_dir), "--device", "cpu",
                                     "--redis-url", auth_redis.url),
                        capture_output=True, text=True, timeout=120, env=env)
    assert cp.returncode == 2, cp.stderr[-2000:]
    assert msg in cp.stderr and "127.0.0.1" in cp.stderr and PASSWORD not in cp.stderr


def test_redis_unreachable_at_start_is_only_a_warning():
    why = redisconf.check_auth(f"redis://127.0.0.1:{free_port()}/0", env={}, timeout_s=0.5)
    assert why and "not reachable" in why


def _predict_and_store(sc: SidecarThread, rid: str) -> None:
    """Predict with a rid: the sidecar answers, and writes the prediction to Redis (if it can)."""
    with open_channel(sc.target) as ch:
        req = pb.PredictRequest(head=HEAD, prompt_vectors=wire.encode(torch.randn(1, D)), rids=[rid])
        assert len(pb_grpc.LengthPredictorStub(ch).Predict(req, timeout=10).predictions) == 1


@pytest.mark.parametrize("password,stored", [(PASSWORD, True), ("wrong-pass", False), (None, False)],
                         ids=["right", "wrong", "missing"])
def test_sidecar_store_uses_the_password_from_the_environment(auth_redis, heads_dir, monkeypatch, password, stored):
    """Through the sidecar's public behaviour: with the right LENPRED_REDIS_PASSWORD predictions
    land in Redis; with a wrong one they are still answered, just not stored."""
    if password:
        monkeypatch.setenv("LENPRED_REDIS_PASSWORD", password)
    else:
        monkeypatch.delenv("LENPRED_REDIS_PASSWORD", raising=False)
    sc = SidecarThread(SidecarConfig(port=0, heads=[str(heads_dir)], device="cpu", redis_url=auth_redis.url))
    rid = f"auth-{password}"
    try:
        _predict_and_store(sc, rid)
        r = redis.Redis.from_url(auth_redis.url, password=PASSWORD)
        key = keys.pred_key("default", rid)
        assert _wait(lambda: r.exists(key), timeout=5 if stored else 1.5) is stored
        _predict_and_store(sc, rid + "-again")  # still serving
    finally:
        sc.stop()


@pytest.fixture(scope="module")
def tls_redis(pki):
    srv_cert = pki["server"]
    try:
        srv = RedisServer.start(password=PASSWORD, tls=(str(srv_cert.cert), str(srv_cert.key), str(pki["ca"])))
    except RuntimeError as e:  # a redis-server built without TLS
        pytest.skip(f"redis-server without TLS support: {e}")
    yield srv
    srv.stop()


def test_sidecar_writes_over_rediss_with_ca_file(pki, tls_redis, heads_dir, monkeypatch):
    """rediss:// + LENPRED_REDIS_CA_FILE + LENPRED_REDIS_PASSWORD: the sidecar's writes over TLS."""
    assert tls_redis.url.startswith("rediss://")
    monkeypatch.setenv("LENPRED_REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("LENPRED_REDIS_CA_FILE", str(pki["ca"]))
    assert redisconf.check_auth(tls_redis.url) is None
    r = redis.Redis.from_url(tls_redis.url, password=PASSWORD, ssl_ca_certs=str(pki["ca"]))
    sc = SidecarThread(SidecarConfig(port=0, heads=[str(heads_dir)], device="cpu", redis_url=tls_redis.url))
    try:
        _predict_and_store(sc, "over-tls")
        assert _wait(lambda: r.exists(keys.pred_key("default", "over-tls")), timeout=5)
    finally:
        sc.stop()
    monkeypatch.delenv("LENPRED_REDIS_CA_FILE")  # without the CA the server is not trusted: not stored
    assert "not reachable" in redisconf.check_auth(tls_redis.url, timeout_s=1)
    sc = SidecarThread(SidecarConfig(port=0, heads=[str(heads_dir)], device="cpu", redis_url=tls_redis.url))
    try:
        _predict_and_store(sc, "untrusted")
        assert not _wait(lambda: r.exists(keys.pred_key("default", "untrusted")), timeout=1.5)
    finally:
        sc.stop()
