"""`lenpred bench soak`: N minutes of steady traffic through the router, watching for leaks.

Real processes (lenpred.harness.fleet): the router, the real sidecar (CPU, random heads of width 16)
fed by a tap stand-in (a prefill row per request, its finished row after), Redis, and EMULATED
SGLang engines. An open-loop client sends chat completions at `--rate` (half streamed). Every
`--sample-s` the router's and the sidecar's RSS and Redis's key count are sampled; the report
gives their series and least-squares slopes, over the whole run and over its second half (after
warm-up: caches and pools filled, prediction keys reaching their TTL).

    lenpred bench soak --minutes 5 --rate 20 --json soak.json --md soak.md
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

from lenpred.bench import report
from lenpred.harness.fleet import Feeder, Fleet, Load

POLICY = pathlib.Path(__file__).resolve().parent.parent / "router" / "policies" / "default.yaml"


def slope_per_min(ts: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over ts (seconds), per minute."""
    if len(ts) < 3:
        return None
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else None


def summarize(samples: list[dict], key: str) -> dict:
    ts, ys = [s["t_s"] for s in samples], [s[key] for s in samples]
    half = [i for i, t in enumerate(ts) if t >= ts[-1] / 2]
    return {"first": ys[0], "last": ys[-1], "max": max(ys), "slope_per_min": slope_per_min(ts, ys),
            "slope_per_min_second_half": slope_per_min([ts[i] for i in half], [ys[i] for i in half])}


def render(result: dict) -> str:
    a, s = result["args"], result["series"]
    rows = [{"measure": "router RSS (MB)", **s["router_rss_mb"]}, {"measure": "sidecar RSS (MB)", **s["sidecar_rss_mb"]},
            {"measure": "Redis keys", **s["redis_keys"]}]
    r = result["requests"]
    return "\n".join([
        "### `lenpred bench soak` — memory and state over time (emulated engines)", "",
        f"Command: `{result['command']}`", "",
        f"{a['minutes']} min at {a['rate']} req/s (Poisson, half streamed, 10-60 output tokens), {a['engines']} "
        f"emulated engines, the real router and sidecar (CPU), Redis; prediction TTL {a['ttl_s']} s; router "
        f"history bound {a['history_bytes'] or 'from the policy'} bytes. "
        f"Sampled every {a['sample_s']} s. Machine: {result['environment'].get('cpu_count', '?')} CPUs, "
        f"load average {result['loadavg_start']} at start, {result['loadavg_end']} at end.", "",
        report.markdown_table(rows, ["measure", "first", "last", "max", "slope_per_min", "slope_per_min_second_half"]),
        "", f"Requests: {r['sent']} sent, {r['ok']} ok, {r['failed']} failed; latency p50 {r['p50_s']:.3f} s, "
        f"p99 {r['p99_s']:.3f} s. Sidecar rows fed: {r['fed_batches']} batches, {r['feeder_dropped']} dropped.", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lenpred bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--ttl-s", type=int, default=60, help="the sidecar's prediction TTL (Redis keys expire after it)")
    p.add_argument("--policy", default=str(POLICY))
    p.add_argument("--history-bytes", type=int, default=None,
                   help="the router's limits.history_bytes (default: the policy's); a small bound (1 MiB: "
                        "512 requests) fills within the run, so growth after it is a leak, not the history")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="lenpred-soak-"))
    policy = pathlib.Path(args.policy).read_text()
    if args.history_bytes is not None:
        policy += f"\nlimits: {{history_bytes: {args.history_bytes}}}\n"
    fleet = Fleet.start(workdir, policy, engines=args.engines,
                        engine_args=["--step-base-s", "0.02"], sidecar_args=["--ttl", str(args.ttl_s)])
    feeder = Feeder(fleet.sidecar_target)
    result = {"bench": "soak", "args": vars(args), "environment": report.environment(),
              "command": "lenpred bench soak " + " ".join(argv if argv is not None else sys.argv[1:]),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "samples": []}
    try:
        load = Load(fleet.router_url, args.rate, tokens=(10, 60),
                    on_rid=lambda rid, n: feeder.feed(rid, output_tokens=n)).start()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        while True:
            now = time.monotonic()
            sample = {"t_s": round(now - t0, 1), "router_rss_mb": fleet.rss_mb("router"),
                      "sidecar_rss_mb": fleet.rss_mb("sidecar"), "redis_keys": fleet.redis_keys(),
                      "requests_done": len(load.outcomes)}
            result["samples"].append(sample)
            print(f"[soak] {sample}", file=sys.stderr, flush=True)
            if now >= end:
                break
            time.sleep(min(args.sample_s, max(end - now, 0.0)))
        outcomes = load.stop()
    finally:
        feeder.stop()
        fleet.stop()
    lat = sorted(o.elapsed for o in outcomes if o.ok) or [float("nan")]
    result["requests"] = {"sent": len(outcomes), "ok": sum(o.ok for o in outcomes),
                          "failed": sum(not o.ok for o in outcomes), "p50_s": lat[len(lat) // 2],
                          "p99_s": lat[min(int(len(lat) * 0.99), len(lat) - 1)], "fed_batches": feeder.sent,
                          "feeder_dropped": feeder.dropped}
    result["series"] = {k: summarize(result["samples"], k) for k in ("router_rss_mb", "sidecar_rss_mb", "redis_keys")}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report.write(result, args.json, args.md, render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
