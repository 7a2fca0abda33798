"""What a report concludes: the Pareto front, the recommended stage, and what it cost and bought.

Every renderer states the same conclusion, so it is worked out once here from report.json alone. Fields
added to the schema after version 1 went out (``accuracy_test``, ``latency_sweep``, ``profile``) are
optional: older reports lack them and the conclusions fall back to what the report does have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from optimizer.measure.accuracy import Z95
from optimizer.report.metric import report_metric


def measured(stage: dict[str, Any]) -> bool:
    """A stage that ran and has the figures the conclusions compare."""
    return stage.get("status") == "ok" and "accuracy" in stage and "latency" in stage


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) points that no other point beats on both counts (lower latency,
    higher accuracy), ordered by latency. Equal points do not dominate each other."""
    finite = [i for i, (lat, acc) in enumerate(points) if math.isfinite(lat) and math.isfinite(acc)]
    front = []
    for i in finite:
        lat, acc = points[i]
        dominated = any(
            points[j][0] <= lat and points[j][1] >= acc and (points[j][0] < lat or points[j][1] > acc)
            for j in finite if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def latency_differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The rule report/build.py applies: the medians' 95 % intervals are apart and neither is unstable."""
    a_low, a_high = a["p50_ci95_ms"]
    b_low, b_high = b["p50_ci95_ms"]
    return bool((a_high < b_low or a_low > b_high) and not a.get("unstable") and not b.get("unstable"))


def speedup_range(stage: dict[str, Any], reference: dict[str, Any]) -> tuple[float, float] | None:
    """Speedup bounds implied by both medians' intervals (reference slowest / stage fastest and the
    reverse): conservative, since it combines the two worst cases."""
    low, high = stage["latency"]["p50_ci95_ms"]
    ref_low, ref_high = reference["latency"]["p50_ci95_ms"]
    if low <= 0 or high <= 0:
        return None
    return ref_low / high, ref_high / low


@dataclass(frozen=True)
class AccuracyChange:
    delta: float                 # stage minus reference, as a fraction
    low: float
    high: float
    paired: bool                 # interval from the paired (per-sample) counts, not two independent ones
    test: dict[str, Any] | None  # the McNemar record when the report has one


def accuracy_change(stage: dict[str, Any], reference: dict[str, Any], test: dict[str, Any] | None) -> AccuracyChange:
    """Change in top-1 with a 95 % interval.

    With McNemar counts the interval is the Wald interval of a paired difference: only samples on which
    the two models disagree add variance, so it is much narrower than comparing two independent
    accuracies. Without them, the unpaired interval is an over-estimate (the same samples were used).
    """
    acc, ref = stage["accuracy"], reference["accuracy"]
    delta = acc["value"] - ref["value"]
    n = acc.get("n") or 0
    if test and test.get("difference_ci95"):
        # Scores that are not right-or-wrong: the paired bootstrap interval of the mean difference.
        low, high = test["difference_ci95"]
        return AccuracyChange(delta, low, high, True, test)
    if test and n and test.get("only_baseline_right") is not None and test.get("only_stage_right") is not None:
        b, c = test["only_baseline_right"], test["only_stage_right"]
        variance = max(0.0, b + c - (c - b) ** 2 / n) / (n * n)
        half = Z95 * math.sqrt(variance)
        return AccuracyChange(delta, delta - half, delta + half, True, test)
    ref_n = ref.get("n") or 0
    if not n or not ref_n:
        return AccuracyChange(delta, float("nan"), float("nan"), False, test)
    variance = acc["value"] * (1 - acc["value"]) / n + ref["value"] * (1 - ref["value"]) / ref_n
    half = Z95 * math.sqrt(variance)
    return AccuracyChange(delta, delta - half, delta + half, False, test)


LATENCY_BUDGETS = (("latency_p50_ms", "p50_ms", "p50"), ("latency_p90_ms", "p90_ms", "p90"))


def budget_breaches(stage: dict[str, Any]) -> list[str]:
    """What a stage's measured figures break of its budget, one phrase each (empty: within budget).

    The latency limits compare the measured percentiles as they are, not their intervals: a budget is a
    promise about the figure the report shows. Reports written before latency budgets existed have none."""
    budget = stage.get("budget") or {}
    breaches = []
    if budget.get("accuracy_drop") is not None and budget.get("drop") is not None \
            and budget["drop"] > budget["accuracy_drop"] + 1e-12:
        breaches.append("accuracy drop over its budget")
    latency = stage.get("latency") or {}
    for limit, figure, label in LATENCY_BUDGETS:
        if budget.get(limit) is not None and latency.get(figure) is not None and latency[figure] > budget[limit]:
            breaches.append(f"{label} {latency[figure]:.3f} ms over the budget of {budget[limit]:g} ms")
    return breaches


def within_budget(stage: dict[str, Any]) -> bool:
    return not budget_breaches(stage)


def intermediate_names(report: dict[str, Any]) -> set[str]:
    """Stages the recipe marks intermediate: results a later stage repairs, never deployed."""
    recipe_stages = (report.get("recipe") or {}).get("stages") or []
    return {s.get("name") for s in recipe_stages if isinstance(s, dict) and s.get("intermediate")}


def publishable(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The stages that may go to final/, in recipe order: measured, within every budget, neither the baseline
    (the model the user already has) nor an intermediate stage."""
    stages = report.get("stages") or []
    skip = intermediate_names(report)
    return [s for s in stages[1:] if measured(s) and within_budget(s) and s.get("name") not in skip]


def _p50(stage: dict[str, Any]) -> float:
    return float(stage["latency"]["p50_ms"])


def _deployable(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A torch stage timed through a throwaway export runs that fast only once exported, so its own artifact is not
    # what its figure describes: a stage holding an exported artifact is preferred, when one qualifies.
    exported = [s for s in candidates if (s.get("latency") or {}).get("timed_via") != "export"]
    return exported or candidates


@dataclass(frozen=True)
class PublishChoice:
    """The stage ``optimizer run`` puts into final/ under a publish policy, and why, in one sentence."""

    policy: str                      # "recommended" or "last"
    stage: dict[str, Any] | None     # None: nothing may be published
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The form report.json and final/manifest.json keep."""
        return {"policy": self.policy, "stage": self.stage["name"] if self.stage else None, "reason": self.reason}


def choose_publish(report: dict[str, Any], policy: str = "recommended") -> PublishChoice:
    """The stage to publish, from report.json alone: the chooser behind both final/ and the verdict.

    'recommended': the fastest publishable stage by p50; a later stage whose p50 is not significantly slower
    (report/build.py's rule, latency_differs) wins the tie, so noise between two equally fast stages never flips
    the shipped artifact away from the recipe's end. 'last': the recipe's last stage, whatever its budget says.
    """
    stages = report.get("stages") or []
    last = stages[-1] if len(stages) > 1 else None
    if policy == "last":
        if last is None or not measured(last):
            return PublishChoice(policy, None, "the last stage has no measurements")
        reason = "the recipe's last stage"
        breaches = budget_breaches(last)
        if breaches:
            reason += f", although it is outside its budget ({'; '.join(breaches)})"
        better = choose_publish(report, "recommended").stage
        if better is not None and better is not last:
            reason += f"; publish: recommended would ship '{better['name']}' (p50 {_p50(better):.3f} ms)"
        return PublishChoice(policy, last, reason)
    candidates = publishable(report)
    if not candidates:
        return PublishChoice(policy, None, _nothing_within_budget(report))
    pool = _deployable(candidates)
    fastest = min(pool, key=_p50)
    chosen = next(s for s in reversed(pool) if s is fastest or not latency_differs(s["latency"], fastest["latency"]))
    return PublishChoice(policy, chosen, _publish_reason(report, chosen, fastest, last))


def _publish_reason(report: dict[str, Any], chosen: dict[str, Any], fastest: dict[str, Any],
                    last: dict[str, Any] | None) -> str:
    if chosen is fastest:
        text = f"fastest within budget: p50 {_p50(chosen):.3f} ms"
    else:
        text = (f"within budget at p50 {_p50(chosen):.3f} ms, not significantly slower than the fastest, "
                f"'{fastest['name']}' at {_p50(fastest):.3f} ms, and later in the recipe")
    if last is None or chosen is last:
        return text + "; the recipe's last stage"
    name = last["name"]
    if name in intermediate_names(report):
        return text + f"; the last stage, '{name}', is intermediate"
    if not measured(last):
        return text + f"; the last stage, '{name}', has no measurements"
    breaches = budget_breaches(last)
    if breaches:
        return text + f"; the last stage, '{name}', is outside its budget ({'; '.join(breaches)})"
    if last not in _deployable(publishable(report)):
        return text + f"; the last stage, '{name}', was timed through a throwaway export, not as it is"
    significant = "significant" if latency_differs(chosen["latency"], last["latency"]) else "not significant"
    return text + f" vs {_p50(last):.3f} ms for stage '{name}'; difference {significant}"


def _nothing_within_budget(report: dict[str, Any]) -> str:
    stages = report.get("stages") or []
    skip = intermediate_names(report)
    if stages[1:] and all(s.get("name") in skip for s in stages[1:]):
        return ("every stage of the recipe is intermediate (a result a later stage repairs), and those are never "
                "published; set intermediate: false on the stage to ship")
    outside = [f"'{s['name']}' {', '.join(budget_breaches(s))}" for s in stages[1:]
               if measured(s) and s.get("name") not in skip and budget_breaches(s)]
    text = "no stage other than the baseline and intermediate stages is within its budget"
    if outside:
        shown = "; ".join(outside[:3]) + (f"; and {len(outside) - 3} more" if len(outside) > 3 else "")
        text += f" ({shown})"
    return text + "; relax the budget or change the stages"


def final_stage(report: dict[str, Any]) -> dict[str, Any] | None:
    """The stage whose artifact final/ holds, when the run published one."""
    stages = report.get("stages") or []
    if not stages or not report.get("final"):
        return None
    published = report.get("publish")
    if isinstance(published, dict):
        found = [s for s in stages if s.get("name") == published.get("stage") and measured(s)]
        return found[0] if found else None
    # Reports written before the publish policy existed: final/ held the last stage of a passed run.
    return stages[-1] if report.get("passed") and measured(stages[-1]) else None


@dataclass
class Recommendation:
    stage: dict[str, Any]
    in_final: bool                                   # final/ holds this stage's artifact
    final_stage: dict[str, Any] | None               # the stage in final/, when there is one
    remarks: list[str] = field(default_factory=list)


def recommend(report: dict[str, Any]) -> Recommendation | None:
    """The stage to deploy: the fastest measured stage within its budget (accuracy and latency), among the
    publishable stages (choose_publish's) and the baseline. The stage in final/ wins whenever its latency is
    not significantly different from the fastest, because it is the one a deployer already has, packaged
    with a manifest. None when the baseline has no measurements or nothing is within budget."""
    stages = report.get("stages") or []
    if not stages or not measured(stages[0]):
        return None
    baseline = stages[0]
    candidates = ([baseline] if within_budget(baseline) else []) + publishable(report)
    if not candidates:
        return None
    fastest = min(_deployable(candidates), key=_p50)
    final = final_stage(report)
    remarks: list[str] = []
    if final is not None and final in candidates and (
            final is fastest or not latency_differs(final["latency"], fastest["latency"])):
        return Recommendation(final, True, final, remarks)
    if final is not None:
        policy = (report.get("publish") or {}).get("policy")
        if final not in candidates:
            if policy is None:  # a report with a publish record says so in its publish sentence already
                remarks.append(f"final/ holds '{final['name']}', which is outside its budget "
                               f"({'; '.join(budget_breaches(final)) or 'intermediate'}).")
        else:
            text = (f"final/ holds '{final['name']}', but '{fastest['name']}' is significantly faster "
                    f"({_p50(final):.3f} ms vs {_p50(fastest):.3f} ms p50)")
            if fastest is baseline:
                text += "; the optimized stages within budget are slower than the model they started from."
            elif policy == "last":
                text += "; publish: recommended would ship it."
            else:
                text += f"; consider ending the recipe at '{fastest['name']}'."
            remarks.append(text)
    return Recommendation(fastest, False, final, remarks)


def publish_sentence(report: dict[str, Any]) -> str | None:
    """Which stage went to final/ and why (None for reports from before the publish policy)."""
    published = report.get("publish")
    if not isinstance(published, dict):
        return None
    if published.get("stage") and report.get("final"):
        return (f"Published to final/: '{published['stage']}' (publish: {published.get('policy')}): "
                f"{published.get('reason')}.")
    return f"Nothing was published (publish: {published.get('policy')}): {published.get('reason')}; final/ was not updated."


def _pct(value: float) -> str:
    return f"{value * 100:.2f}"


def _points(value: float) -> str:
    return f"{value * 100:+.2f}"


def accuracy_sentence(stage: dict[str, Any], baseline: dict[str, Any], report: dict[str, Any] | None = None) -> str:
    acc, ref = stage["accuracy"], baseline["accuracy"]
    low, high = acc["ci95"]
    test = (stage.get("vs_baseline") or {}).get("accuracy_test")
    change = accuracy_change(stage, baseline, test)
    view = report_metric(report or {"stages": [baseline, stage]})
    if view.percent:
        text = (f"{view.name} {_pct(acc['value'])} % (95 % CI {_pct(low)}–{_pct(high)}) vs {_pct(ref['value'])} % "
                f"for the baseline: {_points(change.delta)} points")
    else:
        kind = " bootstrap" if acc.get("interval") == "bootstrap" else ""
        text = (f"{view.name} {view.value(acc['value'])} (95 %{kind} CI {view.interval(low, high)}) vs "
                f"{view.value(ref['value'])} for the baseline: {view.delta(change.delta)}")
    if math.isfinite(change.low):
        kind = "paired" if change.paired else "unpaired, so wider than it needs to be"
        if view.percent:
            text += f" (95 % CI {_points(change.low)} to {_points(change.high)}, {kind})"
        else:
            text += f" (95 % CI {view.delta(change.low)} to {view.delta(change.high)}, {kind})"
    if test and test.get("test") == "sign-flip":
        verdict = "significant" if test.get("significant") else "not significant"
        text += (f"; {verdict} by a sign-flip permutation test of the per-sample differences (p = "
                 f"{test['p_value']:.2g}, {test.get('resamples')} resamples)")
    elif test:
        verdict = "significant" if test.get("significant") else "not significant"
        text += (f"; {verdict} by McNemar's test (p = {test['p_value']:.2g}: "
                 f"{test['only_baseline_right']} samples only the baseline got right, "
                 f"{test['only_stage_right']} only this stage)")
    else:
        text += "; this report has no paired significance test"
    budget = stage.get("budget") or {}
    if budget.get("accuracy_drop") is not None:
        text += (f"; budget {budget['accuracy_drop'] * 100:.2f} points" if view.percent else
                 f"; budget {budget['accuracy_drop']:g} ({'fall' if view.higher_is_better else 'rise'} in "
                 f"{view.name})")
    return "Accuracy: " + text + "."


def latency_sentence(stage: dict[str, Any], baseline: dict[str, Any]) -> str:
    lat, ref = stage["latency"], baseline["latency"]
    text = (f"p50 {lat['p50_ms']:.3f} ms (95 % CI {lat['p50_ci95_ms'][0]:.3f}–{lat['p50_ci95_ms'][1]:.3f}) at batch "
            f"{lat.get('batch_size', '?')} vs {ref['p50_ms']:.3f} ms ({ref['p50_ci95_ms'][0]:.3f}–"
            f"{ref['p50_ci95_ms'][1]:.3f}) for the baseline")
    if lat["p50_ms"] > 0:
        speedup = ref["p50_ms"] / lat["p50_ms"]
        text += f": {speedup:.2f}× faster" if speedup >= 1 else f": {1 / speedup:.2f}× slower"
        bounds = speedup_range(stage, baseline)
        if bounds:
            text += f" (speedup between {bounds[0]:.2f}× and {bounds[1]:.2f}× from the two intervals)"
        if latency_differs(lat, ref):
            text += ", significant"
        else:
            why = "a figure is unstable" if lat.get("unstable") or ref.get("unstable") else "the intervals overlap"
            text += f", not significant ({why})"
    return "Latency: " + text + "."


def cost_sentence(stage: dict[str, Any], baseline: dict[str, Any]) -> str | None:
    parts = []
    thr, ref_thr = stage.get("throughput") or {}, baseline.get("throughput") or {}
    if thr.get("samples_per_s") and ref_thr.get("samples_per_s"):
        interval = thr.get("samples_per_s_ci95")
        span = f" (95 % CI {interval[0]:,.0f}–{interval[1]:,.0f}{', unstable' if thr.get('unstable') else ''})" \
            if interval else ""
        parts.append(f"throughput {thr['samples_per_s']:,.0f} samples/s{span} at batch {thr.get('batch_size', '?')} "
                     f"({thr['samples_per_s'] / ref_thr['samples_per_s']:.2f}× the baseline)")
    if stage.get("size_bytes") and baseline.get("size_bytes"):
        parts.append(f"size {stage['size_bytes'] / 1e6:.2f} MB ({stage['size_bytes'] / baseline['size_bytes']:.2f}× "
                     "the baseline)")
    if not parts:
        return None
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


@dataclass
class Verdict:
    headline: str
    sentences: list[str]
    recommendation: Recommendation | None


def verdict(report: dict[str, Any]) -> Verdict:
    """The report's conclusion in plain sentences (renderers add emphasis and escape)."""
    stages = report.get("stages") or []
    rec = recommend(report)
    failed = [s for s in stages if s.get("status") != "ok"]
    sentences: list[str] = []
    if failed:
        first = failed[0]
        sentences.append(f"The run failed at stage '{first['name']}': {first.get('error') or 'no error recorded'}. "
                         "final/ was not updated.")
    published = publish_sentence(report) if not failed else None
    if rec is None:
        sentences += [published] if published else []
        if stages and measured(stages[0]):
            return Verdict("Nothing to recommend: no stage, the baseline included, is within its budget.",
                           sentences, None)
        return Verdict("No conclusion: the baseline has no measurements.", sentences, None)
    stage, baseline = rec.stage, stages[0]
    where = " (in final/)" if rec.in_final else ""
    if stage is baseline:
        headline = "Keep the baseline: no stage within the budget is faster."
        if rec.final_stage is not None and rec.final_stage is not baseline and not rec.remarks:
            sentences.append(f"final/ holds '{rec.final_stage['name']}', which is not faster than the baseline.")
    else:
        significant = latency_differs(stage["latency"], baseline["latency"])
        gain = "" if significant else ", but its latency gain over the baseline is not significant"
        headline = f"Recommended deployable: '{stage['name']}'{where}{gain}."
        sentences.append(accuracy_sentence(stage, baseline, report))
        sentences.append(latency_sentence(stage, baseline))
        extra = cost_sentence(stage, baseline)
        if extra:
            sentences.append(extra)
    sentences += [published] if published else []
    sentences.extend(rec.remarks)
    if any((s.get("latency") or {}).get("mode") == "quick" for s in stages):
        sentences.append("Latency was measured in quick mode: figures for smoke tests, not for decisions.")
    return Verdict(headline, sentences, rec)
