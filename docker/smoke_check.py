"""The client half of docker/smoke.sh; it runs inside the router image (httpx and redis are there).

Sends real prompts as chat completions through the router, then reads the sidecar's finished
stream in Redis for each answer's request id: a request counts as predicted when the sidecar
recorded an EGTP prediction for it (made from the engine's hidden states at prefill, shipped by the
tap). Prints one JSON line; exits 0 only if every request was answered and predicted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from lenpred.harness.demo import abs_error, collect_predictions, load_prompts, send_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--router", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--api-key", default=None)
    a = ap.parse_args()

    t0 = time.monotonic()
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    results = asyncio.run(send_all(a.router, load_prompts(None, a.requests), a.max_tokens, 0.7, headers))
    collect_predictions(a.redis_url, a.namespace, a.router, results)
    ok = [x for x in results if x["status"] == 200]
    predicted = [x for x in ok if x.get("p50") is not None]
    for x in results:
        p50 = f"{x['p50']:.0f}" if x.get("p50") is not None else "-"
        print(f"[smoke] {x['id']}: HTTP {x['status']} rid={x.get('rid')} p50={p50} "
              f"true={x.get('true_len', '-')}{'+' if x.get('truncated') else ''} {x.get('error', '')}".rstrip(),
              file=sys.stderr)
    mae = sum(abs_error(x) for x in predicted) / len(predicted) if predicted else None
    print(json.dumps({"requests": len(results), "ok": len(ok), "predicted": len(predicted),
                      "mae": round(mae, 2) if mae is not None else None,
                      "requests_s": round(time.monotonic() - t0, 1)}))
    return 0 if len(ok) == len(results) == len(predicted) else 1


if __name__ == "__main__":
    sys.exit(main())
