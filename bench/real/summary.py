"""Per-run numbers from per-request results, and the markdown report."""
from __future__ import annotations

import statistics

from lenpred.bench import report
from lenpred.bench.real.replay import Result
from lenpred.bench.schedule import pct

TPOT_SLO_FACTORS = (1.25, 1.5, 2.0)     # x the round-robin run's median TPOT at saturation
TTFT_SLOS = (1.0, 2.0, 5.0)             # seconds


def good(r: Result, ttft_s: float, tpot_s: float) -> bool:
    return r.status == 200 and r.ttft is not None and r.ttft <= ttft_s and (r.tpot or 0.0) <= tpot_s


def online(results: list[Result], span_s: float, slo: dict | None) -> dict:
    meas = [r for r in results if r.measured]
    ok = [r for r in meas if r.status == 200]
    row = {"requests": len(meas), "completed": len(ok), "cut_off": sum(1 for r in meas if r.error == "cut off"),
           "failed": sum(1 for r in meas if r.status not in (0, 200) or (r.status == 0 and r.error != "cut off")),
           "length_errors": sum(1 for r in ok if r.tokens != r.expected), "multi_part": sum(1 for r in ok if r.parts > 1),
           "throughput_rps": len(ok) / span_s if span_s else 0.0,
           "ttft_p50_s": pct([r.ttft for r in ok], 0.5), "ttft_p99_s": pct([r.ttft for r in ok], 0.99),
           "tpot_p50_ms": _ms(pct([r.tpot for r in ok], 0.5)), "tpot_p99_ms": _ms(pct([r.tpot for r in ok], 0.99)),
           "e2e_p50_s": pct([r.e2e for r in ok], 0.5), "e2e_p99_s": pct([r.e2e for r in ok], 0.99)}
    if slo:
        row.update(goodput(meas, span_s, slo["ttft_s"], slo["tpot_ms"] / 1000))
    return row


def goodput(meas: list[Result], span_s: float, ttft_s: float, tpot_s: float) -> dict:
    n = sum(good(r, ttft_s, tpot_s) for r in meas)
    return {"goodput_rps": n / span_s if span_s else 0.0, "slo_attainment": n / len(meas) if meas else 0.0}


def grid(meas: list[Result], span_s: float, base_tpot_ms: float) -> dict:
    """Goodput at every SLO of the grid (TTFT s x TPOT factor of the baseline's median)."""
    return {f"ttft<={t}s,tpot<={f}x": goodput(meas, span_s, t, f * base_tpot_ms / 1000)["goodput_rps"]
            for t in TTFT_SLOS for f in TPOT_SLO_FACTORS}


def batch(results: list[Result]) -> dict:
    ok = [r for r in results if r.status == 200]
    done = sorted(r.done for r in ok)
    n = len(done)
    steady = None
    if n >= 10:   # completions per second between the 10th and 90th percentile: the saturated rate
        a, b = done[n // 10], done[(9 * n) // 10]
        steady = (0.8 * n) / (b - a) if b > a else None
    return {"requests": len(results), "completed": n, "failed": len(results) - n,
            "length_errors": sum(1 for r in ok if r.tokens != r.expected),
            "makespan_s": done[-1] if done else None, "throughput_rps": n / done[-1] if done else 0.0,
            "steady_rps": steady, "e2e_mean_s": statistics.fmean(r.e2e for r in ok if r.e2e is not None) if ok else None,
            "e2e_p99_s": pct([r.e2e for r in ok], 0.99)}


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000 * x


ONLINE_COLS = ["label", "rate_rps", "completed", "cut_off", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms",
               "goodput_rps", "slo_attainment", "retractions"]
BATCH_COLS = ["label", "completed", "makespan_s", "throughput_rps", "steady_rps", "e2e_mean_s", "retractions"]


def render(res: dict) -> str:
    eng, wl = res["engine"], res["workload"]
    lines = [f"### `lenpred bench schedule-real` — real SGLang replicas, {res['environment'].get('gpu', 'CPU')}", "",
             f"Command: `{res['command']}`", "",
             f"Engines: {res['replicas']} x SGLang {res['environment'].get('sglang', '?')} ({eng['model']}, "
             f"{'dummy weights' if eng['dummy_weights'] else 'real weights'}, {eng['device']}), KV budget "
             f"`--max-total-tokens {eng['max_total_tokens']}` per replica, tap on (pool off, decode row every "
             f"{eng['tap_every']} tokens). Flags: `{eng['flags']}`.",
             f"Workload: {wl['trace']} ({wl['kept']} of {wl['of']} items after the filter: {wl['filter']}; lengths "
             f"/{wl['length_scale']:g}; prompt mean {wl['prompt_mean']:.0f}, output mean {wl['output_mean']:.0f}, "
             f"p50 {wl['output_p50']}, max {wl['output_max']} tokens), random token ids.",
             (f"Length control: {res['length_control']['mode']} ({res['length_control']['note']})."
              if res.get("length_control") else "Length control: not checked yet."),
             f"Predictions: INJECTED — true length x the served head's measured error ({res['error_model']['source']}); "
             "oracle rows: the true length. Neither the router nor SGLang sees the length in the request.", ""]
    sat = res.get("saturation") or {}
    if sat:
        lines.append(f"Saturation: {sat.get('rate_rps', 0):.2f} req/s ({sat.get('source', '')}).")
    slo = res.get("slo") or {}
    if slo:
        lines.append(f"SLO for goodput: TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_ms']:.1f} ms ({slo['source']}).")
    lines.append("")
    on = [r for r in res["rows"] if r["mode"] == "online"]
    ba = [r for r in res["rows"] if r["mode"] == "batch"]
    if on:
        lines += ["Online (Poisson arrivals; measured: requests arriving after the warm-up):", "",
                  report.markdown_table(on, ONLINE_COLS), ""]
        rr = {r["rate_rps"]: r for r in on if r["label"].startswith("round-robin") and r.get("tpot_p99_ms")}
        vs = [f"{r['label']}: P99 TPOT {100 * (r['tpot_p99_ms'] / rr[r['rate_rps']]['tpot_p99_ms'] - 1):+.0f}%, "
              f"goodput x{r.get('goodput_rps', 0) / max(rr[r['rate_rps']].get('goodput_rps', 0), 1e-9):.2f}"
              for r in on if r.get("rate_rps") in rr and r is not rr[r["rate_rps"]] and r.get("tpot_p99_ms")]
        if vs:
            lines += ["Versus round-robin at the same rate: " + "; ".join(vs) + ".", ""]
    if ba:
        bw = res.get("batch_workload") or {}
        lines += [f"Batch (all {bw.get('requests', '')} requests in one `POST /v1/lenpred/batch`; prompt lengths made "
                  f"distinct so the router's probes can be told apart: mean prompt {bw.get('prompt_mean_before', 0):.0f} "
                  f"-> {bw.get('prompt_mean', 0):.0f} tokens, outputs untouched):", "",
                  report.markdown_table(ba, BATCH_COLS), ""]
        van = next((r for r in ba if r["label"] == "vanilla"), None)
        if van and van.get("makespan_s"):
            lines.append("Makespan versus vanilla: " + "; ".join(
                f"{r['label']}: x{van['makespan_s'] / r['makespan_s']:.2f} throughput"
                for r in ba if r is not van and r.get("makespan_s")) + ".")
            lines.append("")
    if res.get("skipped"):
        lines.append("Not run (time budget): " + ", ".join(res["skipped"]) + ".")
    if res.get("errors"):
        lines.append("Errors: " + "; ".join(res["errors"]))
    e2e = res.get("smollm2_e2e")
    if e2e:
        lines += ["", "SmolLM2 end to end (real tap -> sidecar -> Redis predictions, real prompts, greedy):", ""]
        if e2e.get("error"):
            lines.append(f"failed: {e2e['error'][:500]}")
        else:
            lines.append(report.markdown_table(e2e["runs"], ["policy", "completed", "predicted", "e2e_mean_s",
                                                             "ttft_p50_s", "tpot_mean_ms", "makespan_s"]))
            if e2e.get("prediction_mae") is not None:
                lines.append(f"\nPrefill prediction MAE {e2e['prediction_mae']:.1f} tokens over {e2e['predicted']} of "
                             f"{e2e['answered']} answers (max_tokens {e2e['max_tokens']}).")
    return "\n".join(lines) + "\n"
