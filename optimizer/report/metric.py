"""How the report names and formats its accuracy metric.

top-1 reads as it always has ('top-1 % (95% CI)', changes in points). top-5 and top-1 agreement are shares
of samples too and read the same way under their own names. Cosine agreement and python: metrics are means
in their own units: shown as plain numbers, changes in those units, and a lower-is-better python: metric
counts a fall as an improvement. Reports written before metrics had names are top-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optimizer.measure.metrics import metric_name


@dataclass(frozen=True)
class MetricView:
    metric: str                 # as the recipe names it: top1, top5, agreement, python:module:function
    name: str                   # as the report names it: top-1, top-5, cosine agreement, ...
    percent: bool               # a share of samples: shown in percent, changes in points
    higher_is_better: bool = True
    bootstrap: bool = False     # intervals and tests from resampling (scores that are not 0/1)

    @property
    def is_top1(self) -> bool:
        return self.metric == "top1"

    # ----------------------------------------------------------------------------------- columns
    @property
    def column(self) -> str:
        return f"{self.name} % (95% CI)" if self.percent else f"{self.name} (95% CI)"

    def delta_column(self, against: str) -> str:
        return f"Δ {self.name} vs {against}"

    @property
    def unit(self) -> str:
        """The unit of a change: points for a share, none (the metric's own) otherwise."""
        return "points" if self.percent else ""

    # ----------------------------------------------------------------------------------- figures
    def value(self, value: float) -> str:
        return f"{value * 100:.2f}" if self.percent else _plain(value)

    def interval(self, low: float, high: float) -> str:
        return f"{self.value(low)}–{self.value(high)}"

    def delta(self, delta: float) -> str:
        if self.percent:
            return f"{delta * 100:+.2f}"
        # Cosine agreement of an FP32 export differs from 1 by 1e-7: four decimals would hide it as +0.0000.
        return f"{delta:+.4f}" if delta == 0 or abs(delta) >= 1e-3 else f"{delta:+.1e}"

    def improved(self, delta: float) -> bool:
        return delta > 0 if self.higher_is_better else delta < 0

    def direction(self) -> str:
        return "higher is better ↑" if self.higher_is_better else "lower is better ↓"


def _plain(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


TOP1 = MetricView("top1", "top-1", True)


def metric_view(accuracy: dict[str, Any] | None) -> MetricView:
    """The view of one stage's accuracy record."""
    if not accuracy or accuracy.get("metric", "top1") == "top1":
        return TOP1
    metric = str(accuracy["metric"])
    agreement = accuracy.get("agreement")
    name = str(accuracy.get("name") or metric_name(metric, agreement))
    percent = metric == "top5" or (metric == "agreement" and agreement != "cosine")
    return MetricView(metric, name, percent, bool(accuracy.get("higher_is_better", True)),
                      accuracy.get("interval") == "bootstrap")


def report_metric(report: dict[str, Any]) -> MetricView:
    """The metric of a whole report: every stage is scored with the recipe's one metric, so the first
    stage with an accuracy record tells (its interval kind may differ per stage for a python: metric)."""
    for stage in report.get("stages") or []:
        if isinstance(stage.get("accuracy"), dict):
            view = metric_view(stage["accuracy"])
            if any((s.get("accuracy") or {}).get("interval") == "bootstrap" for s in report["stages"]):
                return MetricView(view.metric, view.name, view.percent, view.higher_is_better, True)
            return view
    accuracy = (((report.get("recipe") or {}).get("evaluate") or {}).get("accuracy")) or {}
    if accuracy.get("metric", "top1") == "top1":
        return TOP1
    return metric_view({**accuracy, "name": None})
