"""`lenpred router serve | validate | schema` (dispatched from `lenpred router ...`)."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

import uvicorn

from lenpred.contract.keys import DEFAULT_NAMESPACE
from lenpred.router.app import make_app
from lenpred.router.config import PolicyError, RouterConfig, default_policy_path, load_policy, schema_text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lenpred router", description="Length-aware router over SGLang replicas.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the OpenAI-compatible router")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--backends", required=True, help="comma-separated SGLang base URLs")
    s.add_argument("--policy", default=default_policy_path(), help="RouterPolicy YAML (hot-reloaded)")
    s.add_argument("--redis-url", default=os.environ.get("LENPRED_REDIS_URL"),
                   help="Redis with the predictions (env LENPRED_REDIS_URL); none = fallback estimates only")
    s.add_argument("--namespace", default=DEFAULT_NAMESPACE)
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
    try:
        app = make_app(RouterConfig(backends=backends, policy_path=args.policy, redis_url=args.redis_url,
                                    namespace=args.namespace))
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    gc.collect()
    gc.freeze()   # startup objects (FastAPI, pydantic, plugins) leave the collector's working set: shorter pauses
    # uvicorn picks uvloop and httptools when installed (router/README.md "Overhead": ~1.5x req/s over h11)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=args.access_log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
