"""Choosing a width per pruning group under a latency budget: the solver, free of torch and of runtimes.

Each group offers a few candidate widths, each with a measured latency of its block (from the latency
table) and the importance its removed channels carried. The predicted latency of a choice is the whole
unpruned model's measured latency plus, per group, what its block gains at the chosen width::

    predicted = base_ms + sum_g (ms_g[width_g] - ms_g[full_g])

Choosing one candidate per group to lose the least importance within a time budget is a multiple-choice
knapsack; with tens of groups and a few candidates each, dynamic programming over the budget solves it
exactly (work: groups × candidates × bins array steps). A greedy rule (cheapest importance per millisecond first) was the first
version and it can keep a coarse cut that a finer one elsewhere would have avoided; the program cannot.
Measured times need not fall with the width (a runtime may pad to its SIMD width), and the program does not
assume they do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GroupCosts:
    """One pruning group's options. ``widths[0]`` is the unpruned width; lists run from wide to narrow."""

    name: str
    widths: list[int]
    ms: list[float]
    loss: list[float]
    """Importance removed at each width (0 at the full width, never decreasing as the width falls)."""

    def __post_init__(self) -> None:
        if not (len(self.widths) == len(self.ms) == len(self.loss)) or not self.widths:
            raise ValueError(f"group {self.name}: widths, ms and loss must be equally long and not empty")


@dataclass
class Allocation:
    widths: dict[str, int]
    predicted_ms: float
    importance_lost: float
    moves: int = 0
    """How many groups were narrowed."""


class Unreachable(ValueError):
    """No choice of widths meets the target; ``smallest_ms`` is the best the candidates allow."""

    def __init__(self, target_ms: float, smallest_ms: float):
        super().__init__(f"target {target_ms:.4g} ms is below the smallest reachable prediction {smallest_ms:.4g} ms")
        self.target_ms = target_ms
        self.smallest_ms = smallest_ms


def ms_at_width(widths: list[int], ms: list[float], width: float) -> float:
    """A block's time at ``width``: measured where it was timed, linearly interpolated between timed widths
    (the uniform solver chooses widths between them)."""
    import numpy as np

    order = np.argsort(widths)
    return float(np.interp(width, np.asarray(widths, dtype=float)[order], np.asarray(ms, dtype=float)[order]))


def predict(groups: list[GroupCosts], base_ms: float, choice: dict[str, int]) -> float:
    """Predicted latency of ``choice`` (group name -> index into its candidate lists)."""
    return base_ms + sum(g.ms[choice[g.name]] - g.ms[0] for g in groups)


def smallest_reachable(groups: list[GroupCosts], base_ms: float) -> float:
    return base_ms + sum(min(g.ms) - g.ms[0] for g in groups)


def allocate(groups: list[GroupCosts], base_ms: float, target_ms: float, *, bins: int = 4000) -> Allocation:
    """Widths that keep the most importance while the predicted latency stays at or under ``target_ms``.

    A multiple-choice knapsack, solved exactly by dynamic programming over the time budget the groups' blocks
    may spend, cut into ``bins`` steps. Block times are rounded *up* to a step, so a choice the program
    accepts always meets the target with the exact times too.
    """
    import numpy as np

    smallest = smallest_reachable(groups, base_ms)
    if target_ms < smallest - 1e-12:
        raise Unreachable(target_ms, smallest)
    outside = base_ms - sum(g.ms[0] for g in groups)  # time spent outside every group's block
    budget = target_ms - outside
    step = budget / bins if budget > 0 else 1.0
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    choices = np.zeros((len(groups), bins + 1), dtype=np.int16)
    for gi, g in enumerate(groups):
        new = np.full(bins + 1, np.inf)
        pick = np.zeros(bins + 1, dtype=np.int16)
        for k, (ms, loss) in enumerate(zip(g.ms, g.loss)):
            cost = max(0, int(np.ceil(ms / step - 1e-9)))
            if cost > bins:
                continue
            shifted = np.full(bins + 1, np.inf)
            shifted[cost:] = best[:bins + 1 - cost] + loss
            better = shifted < new - 1e-12
            new[better] = shifted[better]
            pick[better] = k
        best, choices[gi] = new, pick
    if not np.isfinite(best).any():  # rounding up made the tightest choice miss by a fraction of a step
        raise Unreachable(target_ms, smallest)
    lowest = best.min()
    used = int(np.flatnonzero(best <= lowest + 1e-9)[0])  # equal importance: the faster choice
    chosen: dict[str, int] = {}
    for gi in range(len(groups) - 1, -1, -1):
        g = groups[gi]
        k = int(choices[gi, used])
        chosen[g.name] = k
        used -= max(0, int(np.ceil(g.ms[k] / step - 1e-9)))
    widths = {g.name: g.widths[chosen[g.name]] for g in groups}
    lost = sum(g.loss[chosen[g.name]] for g in groups)
    return Allocation(widths=widths, predicted_ms=predict(groups, base_ms, chosen), importance_lost=lost,
                      moves=sum(1 for g in groups if chosen[g.name] > 0))
