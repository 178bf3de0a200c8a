"""`lenpred router serve | validate | schema` (dispatched from `lenpred router ...`)."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

import uvicorn

from lenpred.contract.keys import DEFAULT_NAMESPACE
from lenpred.contract.redisconf import client_kwargs, redis_url
from lenpred.router import server
from lenpred.router.app import make_app
from lenpred.router.auth import KEYS_FILE_ENV, ApiKeys, AuthConfigError
from lenpred.router.config import PolicyError, RouterConfig, default_policy_path, load_policy, schema_text


def _parser() -> argparse.ArgumentParser:
    d = server.ServerLimits()
    p = argparse.ArgumentParser(prog="lenpred router", description="Length-aware router over SGLang replicas.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the OpenAI-compatible router")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--backends", required=True, help="comma-separated SGLang base URLs")
    s.add_argument("--policy", default=default_policy_path(), help="RouterPolicy YAML (hot-reloaded)")
    s.add_argument("--redis-url", default=None,
                   help="Redis with the predictions (env LENPRED_REDIS_URL; AUTH from LENPRED_REDIS_PASSWORD, "
                        "rediss:// CA from LENPRED_REDIS_CA_FILE); none = fallback estimates only")
    s.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    s.add_argument("--api-keys-file", default=os.environ.get(KEYS_FILE_ENV),
                   help=f"API keys YAML (env {KEYS_FILE_ENV}); none = no authentication (a warning at start)")
    s.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="client connections beyond this get 503 and are closed")
    s.add_argument("--header-timeout-s", type=float, default=d.header_timeout_s,
                   help="a client must send a request's headers within this time (408 and closed)")
    s.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_s,
                   help="idle keep-alive client connections are closed after this time")
    s.add_argument("--log-level", default="info")
    s.add_argument("--access-log", action="store_true", help="log every request (uvicorn access log; costs CPU)")
    v = sub.add_parser("validate", help="check a policy file; exit 0 if valid")
    v.add_argument("file")
    sub.add_parser("schema", help="print the policy file's JSON schema")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "validate":
        try:
            policy = load_policy(args.file)
        except PolicyError as e:
            print(e, file=sys.stderr)
            return 1
        print(f"{args.file}: valid ({len(policy.plugins)} plugins, profiles: {', '.join(policy.profiles)})")
        return 0
    if args.cmd == "schema":
        sys.stdout.write(schema_text())
        return 0

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    url = redis_url(args.redis_url)
    try:
        if url:
            client_kwargs(url)     # a bad URL fails here, with its reason, not in the first request
        keys = ApiKeys.load(args.api_keys_file) if args.api_keys_file else ApiKeys.disabled()
        app = make_app(RouterConfig(backends=backends, policy_path=args.policy, redis_url=url,
                                    namespace=args.namespace, api_keys_file=args.api_keys_file), keys)
    except (PolicyError, AuthConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    gc.collect()
    gc.freeze()   # startup objects (FastAPI, pydantic, plugins) leave the collector's working set: shorter pauses
    # uvloop and httptools (router/README.md "Overhead": ~1.5x req/s over h11), plus the connection limits
    limits = server.ServerLimits(max_connections=args.max_connections, header_timeout_s=args.header_timeout_s,
                                 idle_timeout_s=args.idle_timeout_s)
    uvicorn.Server(server.config(app, args.host, args.port, limits, log_level=args.log_level.lower(),
                                 access_log=args.access_log)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
