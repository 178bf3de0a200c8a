"""`lenpred sidecar`: run the gRPC prediction service."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys

from lenpred.contract import grpctls, redisconf
from lenpred.sidecar.multiproc import default_processes, run_processes
from lenpred.sidecar.server import SidecarConfig, serve


def build_parser() -> argparse.ArgumentParser:
    d = SidecarConfig()
    p = argparse.ArgumentParser(prog="lenpred sidecar", description="EGTP/PLP length-prediction service (gRPC lenpred.v1)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--redis-url", default=os.environ.get("LENPRED_REDIS_URL"),
                   help="Redis for predictions (env LENPRED_REDIS_URL); none = predict only")
    p.add_argument("--namespace", default=os.environ.get("LENPRED_NAMESPACE", d.namespace))
    p.add_argument("--ttl", type=int, default=d.ttl_s, dest="ttl_s")
    p.add_argument("--heads", action="append", default=None,
                   help="folder of *.safetensors heads (repeatable); default: the shipped heads")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--max-wait-us", type=int, default=d.max_wait_us)
    p.add_argument("--prefill-head", default=d.prefill_head, choices=["auto", "egtp", "last"],
                   help="prefill head when both features arrive (auto: lower held-out MAE)")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes)
    p.add_argument("--learn-dir", default=None,
                   help="turn on online learning: record live examples and serve learned heads from this store")
    p.add_argument("--learn-config", default=None,
                   help="JSON object of learning settings (lenpred.sidecar.learn.LearnConfig), e.g. "
                        "'{\"min_finished\": 500, \"retrain_every\": 500}'")
    p.add_argument("--processes", default="auto",
                   help="ingest processes sharing the port (SO_REUSEPORT), each with its own event loop; "
                        "auto = min(cores/2, 8) with a GPU, 1 on CPU")
    p.add_argument("--head-dtype", default=d.head_dtype, choices=["auto", "float32", "bfloat16"],
                   help="head weights' dtype (auto: bf16 on CUDA and on CPUs with AMX, else fp32)")
    p.add_argument("--forward-thread", default=d.forward_thread, choices=["auto", "on", "off"],
                   help="head forwards in a worker thread (auto: on with CUDA, off on CPU)")
    p.add_argument("--plp-min-change", type=float, default=d.plp_min_change,
                   help="store a PLP update only when it moves the predicted total by at least this fraction")
    p.add_argument("--max-rid-bytes", type=int, default=d.max_rid_bytes)
    p.add_argument("--max-inflight-bytes", type=int, default=d.max_inflight_bytes)
    p.add_argument("--max-output-tokens", type=int, default=d.max_output_tokens,
                   help="ceiling on a recorded true length (also clamped to the request's max_new_tokens)")
    p.add_argument("--store-max-pending", type=int, default=d.store_max_pending,
                   help="Redis write-behind: requests waiting to be written (newest per request; oldest dropped)")
    p.add_argument("--slab-slots", type=int, default=d.slab_slots, help="v2: prompt vectors kept on the device")
    p.add_argument("--tls-cert", default=None, help="TLS on the gRPC port: PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="mTLS: require client certificates signed by this PEM CA bundle")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(a: argparse.Namespace) -> SidecarConfig:
    names = {f.name for f in dataclasses.fields(SidecarConfig)}
    kw = {k: v for k, v in vars(a).items() if k in names and v is not None}
    if a.learn_dir:
        kw["learn"] = {**json.loads(a.learn_config or "{}"), "dir": a.learn_dir}
    return SidecarConfig(**kw)


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = config_from_args(a)
    try:  # configuration that cannot work stops the start with its reason (exit 2)
        grpctls.ServerTLS(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca).check()
        if cfg.redis_url and (why := redisconf.check_auth(cfg.redis_url)):
            logging.getLogger("lenpred.sidecar").warning("%s", why)
    except (grpctls.TLSConfigError, redisconf.RedisAuthError, ValueError) as e:
        print(f"lenpred sidecar: error: {e}", file=sys.stderr)
        return 2
    n = default_processes(cfg.device) if a.processes == "auto" else int(a.processes)
    if n < 1:
        raise SystemExit("--processes must be >= 1 or auto")
    if n > 1:
        try:
            return run_processes(cfg, n, a.log_level.upper())
        except ValueError as e:
            raise SystemExit(str(e)) from None
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    return 0
