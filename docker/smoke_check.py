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

import httpx

from lenpred.harness.demo import abs_error, collect_predictions, load_prompts


async def send(router: str, prompts: list[dict], max_tokens: int, api_key: str | None, timeout: float) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=router, headers=headers, timeout=timeout) as client:
        async def one(p: dict) -> dict:
            r = await client.post("/v1/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": p["prompt"]}],
                "max_tokens": max_tokens, "temperature": 0.7})
            out = {"id": p["id"], "prompt": p["prompt"], "status": r.status_code, "rid": r.headers.get("x-lenpred-rid")}
            if r.status_code == 200:
                body = r.json()
                out["true_len"] = body["usage"]["completion_tokens"]
                out["truncated"] = body["choices"][0].get("finish_reason") == "length"
            else:
                out["error"] = r.text[:300]
            return out
        return await asyncio.gather(*(one(p) for p in prompts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--router", required=True)
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    a = ap.parse_args()

    t0 = time.monotonic()
    results = asyncio.run(send(a.router, load_prompts(None, a.requests), a.max_tokens, a.api_key, a.timeout))
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
