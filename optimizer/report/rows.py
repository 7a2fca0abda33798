"""The stage table as rows of strings, shared by the Markdown, HTML and terminal renderings."""

from __future__ import annotations

from typing import Any

COLUMNS = ["stage", "pass", "form", "precision", "size MB", "params", "MMACs", "top-1 % (95% CI)", "Δ top-1 vs base",
           "p50 ms (95% CI)", "p90 ms", "p99 ms", "speedup vs base", "vs prev", "samples/s", "status"]


def _pct(value: float) -> str:
    return f"{value * 100:.2f}"


def _speed(change: dict[str, Any] | None) -> str:
    if not change or change.get("speedup") is None:
        return "–"
    mark = "" if change["latency_significant"] else " (n.s.)"
    return f"{change['speedup']:.2f}×{mark}"


def stage_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in report["stages"]:
        if "accuracy" in s:
            acc = s["accuracy"]
            lat = s["latency"]
            low, high = acc["ci95"]
            delta = s.get("vs_baseline", {}) or {}
            row = [
                s["name"], s["pass"] or "–", s.get("form", "–"), s.get("precision") or "–",
                f"{s['size_bytes'] / 1e6:.2f}", f"{s['params']:,}" if s.get("params") is not None else "–",
                f"{s['macs'] / 1e6:.1f}" if s.get("macs") else "–",
                f"{_pct(acc['value'])} ({_pct(low)}–{_pct(high)})",
                f"{delta['accuracy_delta'] * 100:+.2f}" if delta else "–",
                f"{lat['p50_ms']:.3f} ({lat['p50_ci95_ms'][0]:.3f}–{lat['p50_ci95_ms'][1]:.3f})"
                + (" unstable" if lat["unstable"] else ""),
                f"{lat['p90_ms']:.3f}", f"{lat['p99_ms']:.3f}",
                _speed(s.get("vs_baseline")), _speed(s.get("vs_previous")),
                f"{s['throughput']['samples_per_s']:.0f}", s["status"],
            ]
        else:
            row = [s["name"], s["pass"] or "–", s.get("form", "–")] + ["–"] * (len(COLUMNS) - 4) + [s["status"]]
        rows.append(row)
    return rows


def notes(report: dict[str, Any]) -> list[str]:
    out = []
    stages = report["stages"]
    base = stages[0]
    if "latency" in base:
        lat = base["latency"]
        plan = report["recipe"]["evaluate"]["latency"]
        counts = ", ".join(f"{s['name']} {s['latency']['iterations']}" for s in stages if "latency" in s)
        out.append(
            f"Latency: batch {lat['batch_size']}, {plan['threads']} thread(s), each stage in its own process; "
            f"warm-up of at least 10 iterations and {plan['warmup_s']} s, then timed for at least "
            f"{plan['min_iterations']} iterations and {plan['min_duration_s']} s (iterations: {counts}). "
            f"Throughput at batch {base['throughput']['batch_size']}. "
            "A speedup marked (n.s.) is not significant: the 95 % intervals of the medians overlap "
            "or one side is unstable."
        )
        if lat.get("mode") == "quick":
            out.append("QUICK MODE: few iterations; these latency figures are for smoke tests, not for decisions.")
    for s in stages:
        if s["status"] != "ok":
            out.append(f"Stage '{s['name']}' failed: {s.get('error')}")
        fidelity = (s.get("details") or {}).get("fidelity")
        if fidelity:
            out.append(f"Stage '{s['name']}' fidelity vs PyTorch on {fidelity['samples']} eval samples: max abs diff "
                       f"{fidelity['max_abs_diff']:.2e}, max rel diff {fidelity['max_rel_diff']:.2e}, "
                       f"top-1 agreement {fidelity['top1_agreement'] * 100:.1f} %.")
        training = (s.get("details") or {}).get("training")
        if training:
            out.append(f"Stage '{s['name']}' trained {training['steps']} steps on {training['world_size']} process(es) "
                       f"in {training['seconds']:.0f} s; best selection top-1 {training['best_eval_acc'] * 100:.1f} % "
                       f"at step {training['best_step']} ({training['selection']}).")
        pruning = (s.get("details") or {}).get("pruning")
        if pruning and pruning.get("macs_before") and pruning.get("macs_after"):
            out.append(f"Stage '{s['name']}' pruning: MACs {pruning['macs_before'] / 1e6:.1f} M -> "
                       f"{pruning['macs_after'] / 1e6:.1f} M ({pruning['macs_before'] / pruning['macs_after']:.2f}x fewer), "
                       f"params {pruning['params_before']:,} -> {pruning['params_after']:,}.")
        change = s.get("vs_previous")
        if change and change.get("speedup") and change["speedup"] < 1 and change["latency_significant"]:
            out.append(f"Stage '{s['name']}' is slower than the stage before it ({change['speedup']:.2f}×).")
    if not report["passed"]:
        out.append("The run did not pass: final/ was not updated.")
    return out
