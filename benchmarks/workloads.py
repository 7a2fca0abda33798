"""The toolkit's recipes against what a user would do instead, on several workloads, in one run.

    python benchmarks/workloads.py [--workloads fashion-resnet,mobilenet-fashion,minilm-sentiment]
                                   [--trials 3] [--threads 1] [--out runs/bench_workloads] [--quick] [--fresh]

For every workload (a model, its checkpoint and its data, given by a recipe) the variants are:

  eager          PyTorch eager, FP32: the model as trained (the recipes' baseline stage)
  ort-fp32       export to ONNX, run by onnxruntime (FP32)
  ort-int8       export, onnxruntime ``quantize_static`` (QDQ, U8S8 per-channel), run by onnxruntime
  nncf-ir-ov     export, convert to OpenVINO IR, NNCF post-training INT8 on the IR: the order OpenVINO's
                 documentation shows (``ov.convert_model`` then ``nncf.quantize``), run by OpenVINO
  recipe-int8-ov the recipe: export, NNCF INT8 on the ONNX model (Q/DQ), compile to OpenVINO IR
  recipe-pdq-ov  the recipe: structured pruning, distillation from the original, then as recipe-int8-ov
                 (only where the workload names pruning settings; skipped with the reason otherwise)
  recipe-latency-prune-ov  the workload's latency-allocated pruning recipe as shipped (prune to a measured
                 speedup on OpenVINO INT8, reconstruct, short frugal KD, INT8, OpenVINO); its own data
                 section, so its baseline is built once more

The first four are the single-tool paths a user writes by hand. "Best alternative" is the fastest of
ort-fp32, ort-int8 and nncf-ir-ov among those whose top-1 stays within the workload recipe's accuracy budget
of eager's (a user would not ship a model that fails it either); when none does, the fastest of them. OpenVINO always runs with an explicit f32 precision hint (float layers
in FP32, never a silent bf16), one stream, ``threads`` threads, like every other runtime here.

Every variant is produced by ``run_recipe`` from the workload's recipe with its stages replaced (stage
settings are taken from that recipe by pass name; budgets are removed so that every variant is built and
its accuracy shown). Production measures in quick latency mode; stages shared by several variants (the
baseline, the ONNX export) are built once through a stage cache shared by the variants' runs. Accuracy
comes from those runs: top-1 on the recipe's eval data with a Wilson 95 % interval.

Then the batch-1 latency of every variant's final artifact is measured again, in full mode, each time in
a fresh process, for ``--trials`` trials; the order of the variants rotates from trial to trial so that
drift of the machine (a neighbour's job, frequency changes) hits all of them alike. The table shows the
p50 of the pooled per-iteration times with the 95 % interval of the median (order statistics), the range
of the trials' p50s, throughput (offline, the recipe's throughput batch size, median over trials), size on
disk, and speedups as the median over trials of the per-trial ratio (each trial pairs measurements taken
minutes apart, which cancels slow drift), with the trials' range.

Writes to ``--out``: one folder per workload with the variants' runs, ``<workload>.svg`` (top-1 against
p50 latency), ``workloads.md`` (the tables) and ``workloads.json`` (every figure).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any folder: the workloads' modules live in the repo
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------ workloads


@dataclass(frozen=True)
class Workload:
    """A model, its checkpoint and data (the base recipe), and how to benchmark it."""

    name: str
    title: str
    recipe: str                                   # relative to the repository
    # Where prune.structured and distill.kd settings come from; None: no pruning variant, for `no_prune`.
    prune_recipe: str | None = None
    no_prune: str = ""
    # The latency-allocated pruning recipe run whole for the recipe-latency-prune-ov variant; None: skipped.
    latency_recipe: str | None = None
    # The latency plan of the re-measurement (full mode); slow models get a shorter one.
    latency: dict[str, Any] = field(default_factory=dict)
    # --quick: recipe overrides (dotted paths) and stage-setting overrides by pass name.
    quick: dict[str, Any] = field(default_factory=dict)
    quick_stages: dict[str, dict[str, Any]] = field(default_factory=dict)


# --quick is a smoke run: 64 verification samples and, for pruning, a student distilled for one short epoch, whose
# near-ties OpenVINO's and onnxruntime's INT8 kernels may break differently (on a CPU without VNNI, 2 of 64
# samples did: 96.9 %). One or two samples must not fail the smoke run; full runs keep the recipes' gates.
# The same holds for the quantize passes' own agreement gate: the one-epoch student of recipe-pdq-ov agreed with
# its INT8 model on 88.8 % of 500 samples in a smoke run, so quick mode lowers that gate to 80 % as well.
QUICK_INT8_GATE = {"min_top1_agreement": 0.8}
QUICK_QUANTIZATION = {"quantize.nncf": {"subset_size": 64, **QUICK_INT8_GATE},
                      "quantize.ort": {"subset_size": 64, **QUICK_INT8_GATE},
                      "compile.openvino": {"verify_samples": 64, "min_top1_agreement": 0.9}}

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        name="fashion-resnet",
        title="built-in Fashion-MNIST ResNet (small_resnet, 1×28×28, 10 classes)",
        recipe="recipes/prune_distill_int8_openvino.yaml",
        prune_recipe="recipes/prune_distill_int8_openvino.yaml",
        quick={"data.eval.samples": 500, "data.calibration.samples": 64, "data.train.samples": 2000},
        # One short epoch rather than `steps`: a recipe with distill `steps` does not pass validation yet.
        quick_stages={**QUICK_QUANTIZATION,
                      "distill.kd": {"epochs": 1, "train_samples": 1000, "eval_samples": 100}},
    ),
    Workload(
        name="mobilenet-fashion",
        title="MobileNetV2 (ImageNet weights) fine-tuned on Fashion-MNIST, 3×224×224, 10 classes",
        recipe="recipes/cpu_openvino_int8_mobilenet.yaml",
        latency_recipe="recipes/mobilenet_latency_prune_openvino.yaml",
        no_prune="pruning changes the channels of every block, so distillation must train the whole network: "
                 "about four forward passes per training image (student forward and backward, teacher forward) "
                 "at 17-34 ms each on this 2-core CPU (idle to busy), so the 3 epochs over 60,000 images that "
                 "the built-in example needs to recover from pruning would take 3 1/2 to 7 hours",
        latency={"min_iterations": 100, "min_duration_s": 10.0, "max_duration_s": 20.0},
        quick={"data.eval.samples": 50, "data.calibration.samples": 32},
        # With 50 samples one INT8 top-1 flip between runtimes is 2 %: the agreement gate is loosened further.
        quick_stages={**QUICK_QUANTIZATION, "quantize.nncf": {"subset_size": 32, **QUICK_INT8_GATE},
                      "quantize.ort": {"subset_size": 32, **QUICK_INT8_GATE},
                      "compile.openvino": {"verify_samples": 50, "min_top1_agreement": 0.8},
                      "export.onnx": {"verify_samples": 8}},
    ),
    Workload(
        name="minilm-sentiment",
        title="MiniLM-L6 sentence encoder + sentiment head (Rotten Tomatoes, 2×int64[64], 2 classes)",
        recipe="recipes/minilm_sentiment_int8.yaml",
        latency_recipe="recipes/minilm_latency_prune_openvino.yaml",
        no_prune="pruning attention heads and MLP width changes every layer, so distillation must train the "
                 "whole 22.7 M-parameter encoder (teacher forward, student forward and backward) for several "
                 "epochs; even the example's own fine-tuning trains only the top layers to stay within minutes "
                 "on this 2-core CPU",
        latency={"min_iterations": 200, "min_duration_s": 5.0, "max_duration_s": 20.0},
        quick={"data.eval.samples": 100, "data.calibration.samples": 32},
        quick_stages={**QUICK_QUANTIZATION, "quantize.nncf": {"subset_size": 32, **QUICK_INT8_GATE},
                      "quantize.ort": {"subset_size": 32, **QUICK_INT8_GATE},
                      "compile.openvino": {"verify_samples": 100, "min_top1_agreement": 0.9}},
    ),
)


# ------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    kind: str                                    # "reference" (eager), "alternative" (by hand), "recipe"
    chain: tuple[tuple[str, str], ...]           # (stage name, pass name); empty: the baseline itself
    whole_recipe: bool = False                   # the workload's latency_recipe as it is (chain unused)


EXPORT = ("export", "export.onnx")
VARIANTS: tuple[Variant, ...] = (
    Variant("eager", "PyTorch eager FP32", "reference", ()),
    Variant("ort-fp32", "onnxruntime FP32", "alternative", (EXPORT,)),
    Variant("ort-int8", "onnxruntime quantize_static INT8", "alternative", (EXPORT, ("int8_ort", "quantize.ort"))),
    Variant("nncf-ir-ov", "NNCF INT8 on OpenVINO IR", "alternative",
            (EXPORT, ("ir_fp32", "compile.openvino"), ("int8_ir", "quantize.nncf"))),
    Variant("recipe-int8-ov", "recipe: ONNX → NNCF INT8 → OpenVINO", "recipe",
            (EXPORT, ("int8", "quantize.nncf"), ("openvino", "compile.openvino"))),
    Variant("recipe-pdq-ov", "recipe: prune → distill → INT8 → OpenVINO", "recipe",
            (("prune", "prune.structured"), ("distill", "distill.kd"), EXPORT, ("int8", "quantize.nncf"),
             ("openvino", "compile.openvino"))),
    Variant("recipe-latency-prune-ov", "recipe: latency-allocated prune → reconstruct → short KD → INT8 → OpenVINO",
            "recipe", (), whole_recipe=True),
)
PRUNING_PASSES = {"prune.structured", "distill.kd"}

# Settings for passes a workload's recipe does not use. quantize.ort gets the calibration count of the
# recipe's NNCF stage (filled in below), so both INT8 paths see the same samples.
DEFAULT_STAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "export.onnx": {"opset": 18},
    "quantize.nncf": {"preset": "performance", "subset_size": 300},
    "quantize.ort": {},
    "compile.openvino": {"precision_hint": "f32", "performance_hint": "latency"},
}
LATENCY_SAMPLES = 64  # real eval inputs handed to the latency re-measurement (accuracy comes from production)


def read_recipe(relative: str) -> dict[str, Any]:
    path = REPO / relative
    raw = yaml.safe_load(path.read_text())
    # The variant recipes are passed as mappings: make the checkpoint path absolute first.
    checkpoint = raw["model"].get("checkpoint")
    if checkpoint and not Path(checkpoint).is_absolute():
        raw["model"]["checkpoint"] = str((path.parent / checkpoint).resolve())
    return raw


def stage_settings(workload: Workload, quick: bool) -> dict[str, dict[str, Any]]:
    """Settings by pass name: the workload's recipes first, then the defaults; quick overrides on top."""
    settings = copy.deepcopy(DEFAULT_STAGE_SETTINGS)
    for relative in filter(None, (workload.prune_recipe, workload.recipe)):
        for stage in read_recipe(relative)["stages"]:
            settings[stage["pass"]] = copy.deepcopy(stage.get("with") or {})
    settings["quantize.ort"].setdefault("subset_size", settings["quantize.nncf"].get("subset_size", 300))
    if quick:
        for pass_name, changes in workload.quick_stages.items():
            settings.setdefault(pass_name, {}).update(changes)
    return settings


def stage_flags(workload: Workload) -> dict[str, dict[str, Any]]:
    """Stage-level keys other than the settings and the budget, by pass name (``intermediate: true`` on a
    pruning stage that distillation repairs)."""
    flags: dict[str, dict[str, Any]] = {}
    for relative in filter(None, (workload.prune_recipe, workload.recipe)):
        for stage in read_recipe(relative)["stages"]:
            flags[stage["pass"]] = {k: v for k, v in stage.items() if k not in ("name", "pass", "with", "budget")}
    return flags


def variant_recipe(workload: Workload, variant: Variant, *, quick: bool) -> dict[str, Any]:
    from optimizer.recipe import apply_overrides

    base = read_recipe(workload.recipe)
    if workload.prune_recipe:
        # Every variant gets the same data section (train split included), so the baseline and the shared
        # stages have the same cache key in every variant's run.
        base["data"] = read_recipe(workload.prune_recipe)["data"]
    if quick:
        base = apply_overrides(base, workload.quick)
    settings, flags = stage_settings(workload, quick), stage_flags(workload)
    chain = variant.chain or (EXPORT,)  # the eager variant is the baseline of a one-stage run
    base["name"] = f"bench-{workload.name}-{variant.name}"
    base["budget"] = {}
    base["stages"] = [{"name": name, "pass": pass_name, "with": copy.deepcopy(settings.get(pass_name, {})),
                       **flags.get(pass_name, {})} for name, pass_name in chain]
    base.setdefault("evaluate", {}).setdefault("latency", {})["mode"] = "quick"  # re-measured below
    return base


def whole_recipe(workload: Workload, variant: Variant, *, quick: bool) -> dict[str, Any]:
    """The workload's latency-allocated pruning recipe as shipped (budget removed, quick settings applied)."""
    from optimizer.recipe import apply_overrides

    assert workload.latency_recipe is not None
    recipe = read_recipe(workload.latency_recipe)
    if quick:
        recipe = apply_overrides(recipe, workload.quick)
        for stage in recipe["stages"]:
            stage.setdefault("with", {}).update(copy.deepcopy(workload.quick_stages.get(stage["pass"], {})))
    recipe["name"] = f"bench-{workload.name}-{variant.name}"
    recipe["budget"] = {}
    recipe.setdefault("evaluate", {}).setdefault("latency", {})["mode"] = "quick"  # re-measured below
    return recipe


# ----------------------------------------------------------------------------------------- production


@dataclass
class Row:
    variant: Variant
    accuracy: float | None = None
    accuracy_ci: tuple[float, float] | None = None
    n: int | None = None
    size_bytes: int | None = None
    artifact: Any = None
    form: str = ""
    precision: str = ""
    p50s: list[float] = field(default_factory=list)
    throughputs: list[float] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)
    skipped: str | None = None
    # The run's baseline stage record and artifact (kept from the ort-fp32 run: it is the eager variant).
    baseline: tuple[dict[str, Any], Any] | None = None


Log = Callable[[str], None]


def produce(workload: Workload, variant: Variant, out: Path, cache: Path, *, quick: bool, fresh: bool,
            log: Log) -> Row:
    from optimizer import Artifact, run_recipe
    from optimizer.errors import OptimizerError

    row = Row(variant)
    if variant.whole_recipe and not workload.latency_recipe:
        row.skipped = "no latency-allocated pruning recipe for this workload"
        return row
    if not variant.chain and not variant.whole_recipe:
        return row  # filled from the ort-fp32 run's baseline
    if any(p in PRUNING_PASSES for _, p in variant.chain) and not workload.prune_recipe:
        row.skipped = workload.no_prune
        return row
    started = time.perf_counter()
    try:
        recipe = whole_recipe(workload, variant, quick=quick) if variant.whole_recipe else \
            variant_recipe(workload, variant, quick=quick)
        report = run_recipe(recipe, out=out / variant.name, quiet=True, resume=not fresh, cache=cache)
    except OptimizerError as exc:
        row.skipped = f"failed: {str(exc).splitlines()[0][:300]}"
        return row
    except Exception as exc:  # a library's own error: the other variants are still worth measuring
        row.skipped = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        return row
    final = report.stages[-1]
    fill(row, final, Artifact.load(report.path / final["artifact"]))
    cached = sum(1 for s in report.stages if s.get("cached"))
    log(f"  {variant.name}: built in {time.perf_counter() - started:.0f}s "
        f"({len(report.stages)} stages, {cached} from the cache)")
    if variant.name == "ort-fp32":
        row.baseline = (report.stages[0], Artifact.load(report.path / report.stages[0]["artifact"]))
    return row


def fill(row: Row, stage: dict[str, Any], artifact: Any) -> None:
    accuracy = stage["accuracy"]
    row.accuracy, row.accuracy_ci, row.n = accuracy["value"], tuple(accuracy["ci95"]), accuracy["n"]
    row.size_bytes, row.artifact = stage["size_bytes"], artifact
    row.form, row.precision = stage["form"], stage.get("precision") or ""


# ------------------------------------------------------------------------------------------ latency


def remeasure(workload: Workload, rows: dict[str, Row], work: Path, *, trials: int, threads: int, quick: bool,
              log: Log) -> dict[str, Any]:
    """Batch-1 latency of every built variant, fresh process each time, rotating order over trials."""
    from optimizer.data.provider import DataProvider
    from optimizer.measure.evaluate import evaluate_artifact
    from optimizer.progress import Progress
    from optimizer.recipe import load_recipe

    recipe = variant_recipe(workload, VARIANTS[1], quick=quick)
    recipe["data"]["eval"]["samples"] = min(LATENCY_SAMPLES, recipe["data"]["eval"].get("samples") or LATENCY_SAMPLES)
    loaded = load_recipe(recipe)
    data = DataProvider(loaded, list(loaded.recipe.model.inputs)).eval()
    work.mkdir(parents=True, exist_ok=True)
    eval_npz = work / "latency_inputs.npz"
    np.savez(eval_npz, __labels__=data.labels, **data.inputs)
    plan = loaded.recipe.evaluate.latency.model_copy(
        update={"mode": "quick" if quick else "full", "threads": threads, "trials": 1, **workload.latency}
    ).model_dump()
    names = [name for name, row in rows.items() if row.artifact is not None]
    progress = Progress(quiet=True)
    for trial in range(trials):
        order = names[trial % len(names):] + names[: trial % len(names)]
        for name in order:
            log(f"  latency trial {trial + 1}/{trials}: {name}")
            result = evaluate_artifact(
                rows[name].artifact, stage=name, eval_npz=eval_npz, measurements_dir=work / f"{name}-{trial}",
                threads=threads, latency=plan, accuracy_batch_size=loaded.recipe.evaluate.accuracy.batch_size,
                seed=loaded.recipe.seed, import_paths=[REPO], progress=progress,
            )
            rows[name].p50s.append(result["latency"]["p50_ms"])
            rows[name].throughputs.append(result["throughput"]["samples_per_s"])
            rows[name].raw.append(np.load(result["raw_times_file"], allow_pickle=False))
    return {"plan": plan, "throughput_batch_size": plan["throughput_batch_size"], "order": names}


# -------------------------------------------------------------------------------------------- tables


def ratio_stats(reference: list[float], candidate: list[float]) -> tuple[float, float, float]:
    """Per-trial speedups reference/candidate: median, min, max."""
    ratios = [r / c for r, c in zip(reference, candidate)]
    return statistics.median(ratios), min(ratios), max(ratios)


def summarize_rows(rows: dict[str, Row], budget: float | None) -> tuple[list[dict[str, Any]], str | None]:
    from optimizer.measure.latency import summarize

    measured = {name: row for name, row in rows.items() if row.p50s}
    eager = measured.get("eager")
    alternatives = [name for name, row in measured.items() if row.variant.kind == "alternative"]
    if eager and budget is not None:
        within = [n for n in alternatives if eager.accuracy - measured[n].accuracy <= budget + 1e-12]
        alternatives = within or alternatives
    best_alt = min(alternatives, key=lambda n: statistics.median(measured[n].p50s)) if alternatives else None
    table = []
    for name, row in rows.items():
        entry: dict[str, Any] = {"variant": name, "label": row.variant.label, "kind": row.variant.kind,
                                 "skipped": row.skipped}
        if row.p50s:
            pooled = summarize(np.concatenate(row.raw))
            entry.update({
                "form": row.form, "precision": row.precision,
                "top1": row.accuracy, "top1_ci95": list(row.accuracy_ci or ()), "eval_samples": row.n,
                "p50_ms": pooled["p50_ms"], "p50_ci95_ms": pooled["p50_ci95_ms"],
                "trial_p50_ms": row.p50s, "iterations": pooled["iterations"],
                "samples_per_s": statistics.median(row.throughputs), "size_bytes": row.size_bytes,
                "speedup_vs_eager": ratio_stats(eager.p50s, row.p50s) if eager else None,
                "speedup_vs_best_alternative": ratio_stats(measured[best_alt].p50s, row.p50s) if best_alt else None,
            })
        table.append(entry)
    return table, best_alt


def render_table(workload: Workload, table: list[dict[str, Any]], best_alt: str | None, meta: dict[str, Any]) -> str:
    def speed(value: tuple[float, float, float] | None) -> str:
        return f"{value[0]:.2f}× [{value[1]:.2f}–{value[2]:.2f}]" if value else "–"

    header = ("| variant | runtime, precision | top-1 % (95% CI) | p50 ms (95% CI) | trial p50s ms | samples/s | "
              "size MB | vs eager | vs best alternative |")
    lines = [f"### {workload.name}: {workload.title}", "", header, "|" + "---|" * 9]
    for entry in table:
        if entry.get("p50_ms") is None:
            lines.append(f"| {entry['variant']} | – | – | – | – | – | – | – | skipped: {entry['skipped'] or 'not built'} |")
            continue
        low, high = entry["top1_ci95"]
        p_low, p_high = entry["p50_ci95_ms"]
        mark = " (best alternative)" if entry["variant"] == best_alt else ""
        lines.append(
            f"| {entry['variant']}{mark} | {entry['form']}, {entry['precision']} | {entry['top1'] * 100:.2f} "
            f"({low * 100:.2f}–{high * 100:.2f}) | {fmt_ms(entry['p50_ms'])} ({fmt_ms(p_low)}–{fmt_ms(p_high)}) | "
            f"{fmt_ms(min(entry['trial_p50_ms']))}–{fmt_ms(max(entry['trial_p50_ms']))} | "
            f"{entry['samples_per_s']:.0f} | {entry['size_bytes'] / 1e6:.2f} | {speed(entry['speedup_vs_eager'])} | "
            f"{speed(entry['speedup_vs_best_alternative'])} |"
        )
    n = next((e["eval_samples"] for e in table if e.get("eval_samples")), None)
    budget = meta.get("budget")
    rule = (f"the fastest by-hand variant within {budget * 100:g} points of eager's top-1 (the recipe's budget)"
            if budget is not None else "the fastest by-hand variant")
    lines += ["", f"top-1 on {n} eval samples; latency batch 1, {meta['trials']} trials in fresh processes "
              f"(rotating order), {meta['threads']} thread(s){', QUICK MODE' if meta['quick'] else ''}; "
              f"throughput batch {meta['throughput_batch_size']}; speedups: median [min–max] of per-trial ratios; "
              f"best alternative: {rule}."]
    return "\n".join(lines)


def fmt_ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def write_chart(path: Path, workload: Workload, table: list[dict[str, Any]]) -> None:
    from optimizer.report.charts import TradeoffPoint, tradeoff_chart

    points = [TradeoffPoint(label=e["variant"], latency_ms=e["p50_ms"], latency_ci=tuple(e["p50_ci95_ms"]),
                            accuracy=e["top1"], accuracy_ci=tuple(e["top1_ci95"]))
              for e in table if e.get("p50_ms") is not None]
    svg = tradeoff_chart(points, batch_size=1)
    # A standalone file: say what it shows above the plot (the chart itself carries only axis titles).
    caption = f"<!-- {workload.name}: {workload.title}; top-1 against batch-1 p50 latency -->\n"
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + caption + svg + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ main


def check_workload(workload: Workload, out: Path) -> str | None:
    """Why this workload cannot run here (missing recipe, checkpoint, module or data), or None."""
    from optimizer.errors import OptimizerError
    from optimizer.recipe import load_recipe
    from optimizer.validate import validate_recipe

    for relative in filter(None, (workload.recipe, workload.prune_recipe)):
        if not (REPO / relative).is_file():
            return f"{relative} does not exist"
    try:
        validate_recipe(load_recipe(REPO / workload.recipe), out=out)
    except OptimizerError as exc:
        return str(exc).splitlines()[0]
    except ImportError as exc:
        return f"cannot import what {workload.recipe} needs ({exc})"
    return None


# ------------------------------------------------------------------------------ MiniLM at real lengths
#
# python benchmarks/workloads.py --workloads minilm-lengths [--trials 3] [--quick]
#
# Batch-1 latency of MiniLM INT8 on OpenVINO over the real test snippets, each at the length a user sends:
#   fixed64-hand    by hand: static export at [1, 64], ov.convert_model, nncf.quantize on the IR (transformer
#                   preset), every snippet padded to 64
#   dynamic-hand    by hand: export with dynamic batch and sequence axes, convert, nncf.quantize on the IR with
#                   calibration snippets at their own lengths, every snippet at its own length: what a careful
#                   user does
#   recipe-buckets  recipes/minilm_dynamic_int8_openvino.yaml: dynamic export, NNCF INT8 on ONNX, OpenVINO shape
#                   buckets chosen from the eval lengths, all in one compiled model (an If routes each input to its
#                   bucket); timed through optimizer.deploy.open_final, as deployed
#   buckets-apart   the same IR and buckets, each bucket compiled as a model of its own and each input padded to
#                   its bucket in Python inside the timed call: what the toolkit did before, shown for comparison
# The by-hand paths use the recipe's NNCF settings and calibration count, the same checkpoint, and the same
# OpenVINO properties (f32 precision hint, 1 stream, --threads threads) as the toolkit. Each variant is timed
# in a fresh process per trial, in rotating order: one call per snippet over every test snippet in a seeded
# order (after a warm-up), top-1 from the same calls. Inputs are prepared before timing (padded to 64 for the
# fixed path); the recipe's padding to a bucket happens inside the timed call.

LENGTHS_RECIPE = "recipes/minilm_dynamic_int8_openvino.yaml"
LENGTHS_WARMUP = 50


def lengths_hand_model(kind: str, folder: Path, *, calibration: int, log: Log) -> Path:
    """The by-hand NNCF -> OpenVINO INT8 IR of the MiniLM checkpoint: 'fixed64' or 'dynamic'. Reused if present."""
    xml = folder / kind / "model.xml"
    if xml.is_file():
        return xml
    import nncf
    import openvino as ov
    import torch
    from safetensors.torch import load_file

    from optimizer.examples.minilm_sentiment import minilm_classifier, rotten_tomatoes

    started = time.perf_counter()
    xml.parent.mkdir(parents=True, exist_ok=True)
    model = minilm_classifier(pretrained=False).eval()
    model.load_state_dict(load_file(str(REPO / "checkpoints" / "minilm_sentiment.safetensors")))
    train = rotten_tomatoes("train", pad="longest" if kind == "dynamic" else "max")
    index = np.random.default_rng(0).choice(len(train), size=calibration, replace=False)
    items = [{n: v[None] for n, v in train[int(i)][0].items()} for i in index]
    example = tuple(torch.from_numpy(np.repeat(items[0][n], 2 if kind == "dynamic" else 1, axis=0))
                    for n in ("input_ids", "attention_mask"))
    onnx_path = xml.parent / "model.onnx"
    if kind == "dynamic":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=1, max=64)
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    else:
        shapes = None
    torch.onnx.export(model, example, str(onnx_path), input_names=["input_ids", "attention_mask"],
                      output_names=["output"], opset_version=18, dynamo=True, dynamic_shapes=shapes)
    ir = ov.convert_model(str(onnx_path))
    quantized = nncf.quantize(ir, nncf.Dataset(items), preset=nncf.QuantizationPreset.PERFORMANCE,
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=calibration)
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    log(f"  {kind}-hand: built in {time.perf_counter() - started:.0f}s")
    return xml


def lengths_worker(spec_path: Path) -> int:
    """One timing process: ``python benchmarks/workloads.py --lengths-worker SPEC.json``."""
    spec = json.loads(spec_path.read_text())
    from optimizer.examples.minilm_sentiment import rotten_tomatoes

    test = rotten_tomatoes("test", pad="longest")
    order = np.random.default_rng(spec["seed"]).permutation(len(test))
    pad64 = spec["variant"] == "fixed64-hand"
    feeds = []
    for i in order:
        sample = test[int(i)][0]
        if pad64:  # the fixed path: [PAD] id 0 and mask zeros up to 64, as the tokenizer's padding does
            sample = {n: np.pad(v, (0, 64 - len(v))) for n, v in sample.items()}
        feeds.append({n: np.ascontiguousarray(v[None]) for n, v in sample.items()})
    if spec["variant"] == "recipe-buckets":
        from optimizer.deploy import open_final

        model = open_final(spec["final"], threads=spec["threads"])
        call = model.run
    elif spec["variant"] == "buckets-apart":
        import openvino as ov

        from optimizer.runtimes.openvino_cpu import compile_properties
        from optimizer.shapes import pick_bucket

        core = ov.Core()
        properties = compile_properties(precision="f32", performance_hint="latency", threads=spec["threads"])
        sizes = json.loads((Path(spec["final"]) / "manifest.json").read_text())["buckets"]["sizes"]
        ir = core.read_model(str(Path(spec["final"]) / "model.xml"))
        requests = {}
        for size in sizes:
            static = ir.clone()
            static.reshape({port.get_any_name(): ov.PartialShape([1, size]) for port in static.inputs})
            requests[size] = core.compile_model(static, "CPU", properties).create_infer_request()

        def call(feed: dict[str, np.ndarray]) -> np.ndarray:
            length = feed["input_ids"].shape[1]
            size = pick_bucket(sizes, length)
            return requests[size].infer({n: np.pad(v, ((0, 0), (0, size - length))) for n, v in feed.items()})[0]
    else:
        import openvino as ov

        from optimizer.runtimes.openvino_cpu import compile_properties

        core = ov.Core()
        properties = compile_properties(precision="f32", performance_hint="latency", threads=spec["threads"])
        request = core.compile_model(core.read_model(spec["xml"]), "CPU", properties).create_infer_request()

        def call(feed: dict[str, np.ndarray]) -> np.ndarray:
            return request.infer(feed)[0]

    for feed in feeds[:LENGTHS_WARMUP]:
        call(feed)
    times = np.empty(len(feeds))
    predictions = np.empty(len(feeds), dtype=np.int64)
    clock = time.perf_counter
    for k, feed in enumerate(feeds):
        start = clock()
        out = call(feed)
        times[k] = clock() - start
        predictions[k] = int(np.asarray(out).reshape(-1).argmax())
    correct = predictions == test.labels[order]
    Path(spec["result"]).write_text(json.dumps({
        "times_ms": (times * 1e3).tolist(), "accuracy": float(correct.mean()), "n": int(len(correct)),
        "lengths": [int(f["input_ids"].shape[1]) for f in feeds]}))
    return 0


def minilm_lengths(out: Path, *, trials: int, threads: int, quick: bool, fresh: bool, log: Log) -> tuple[str, dict]:
    """Build the three variants, time them over the real test snippets, and return the table and figures."""
    import subprocess

    from optimizer import run_recipe

    out.mkdir(parents=True, exist_ok=True)
    recipe = read_recipe(LENGTHS_RECIPE)
    calibration = next(s["with"]["subset_size"] for s in recipe["stages"] if s["pass"] == "quantize.nncf")
    if quick:
        calibration = 32
        recipe["data"]["calibration"]["samples"] = 32
        for stage in recipe["stages"]:
            if stage["pass"] == "quantize.nncf":
                stage["with"]["subset_size"] = 32
    hand = {kind: str(lengths_hand_model(kind, out / "hand", calibration=calibration, log=log))
            for kind in ("fixed64", "dynamic")}
    started = time.perf_counter()
    report = run_recipe(recipe, out=out / "recipe", quiet=True, resume=not fresh, cache=out / ".stage-cache")
    log(f"  recipe-buckets: built in {time.perf_counter() - started:.0f}s; buckets "
        f"{json.loads((report.path / 'final' / 'manifest.json').read_text()).get('buckets', {}).get('sizes')}")
    variants = {"fixed64-hand": {"xml": hand["fixed64"]}, "dynamic-hand": {"xml": hand["dynamic"]},
                "recipe-buckets": {"final": str(report.path / "final")},
                "buckets-apart": {"final": str(report.path / "final")}}
    names = list(variants)
    results: dict[str, list[dict]] = {name: [] for name in names}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for trial in range(trials):
        for name in names[trial % len(names):] + names[: trial % len(names)]:
            log(f"  latency trial {trial + 1}/{trials}: {name}")
            spec = {**variants[name], "variant": name, "threads": threads, "seed": trial,
                    "result": str(out / f"{name}-{trial}.json")}
            spec_path = out / f"{name}-{trial}-spec.json"
            spec_path.write_text(json.dumps(spec))
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--lengths-worker", str(spec_path)],
                           check=True, env=env)
            results[name].append(json.loads(Path(spec["result"]).read_text()))
    rows = {}
    for name in names:
        pooled = np.concatenate([r["times_ms"] for r in results[name]])
        rows[name] = {"p50_ms": float(np.median(pooled)), "p90_ms": float(np.percentile(pooled, 90)),
                      "mean_ms": float(pooled.mean()), "trial_p50_ms": [float(np.median(r["times_ms"])) for r in results[name]],
                      "accuracy": results[name][0]["accuracy"], "n": results[name][0]["n"]}
    for name in names:
        rows[name]["vs_recipe"] = [float(np.median(a["times_ms"]) / np.median(b["times_ms"]))
                                   for a, b in zip(results[name], results["recipe-buckets"])]
    lengths = np.array(results["dynamic-hand"][0]["lengths"])
    lines = [f"### minilm-lengths: MiniLM INT8 on OpenVINO, batch 1 over the {len(lengths)} real test snippets "
             f"(word pieces: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, p90 "
             f"{np.percentile(lengths, 90):.0f}, max {lengths.max()})", "",
             "| variant | top-1 | p50 ms | p90 ms | mean ms | trial p50s | p50 ÷ recipe (per trial, median) |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        row = rows[name]
        lines.append(f"| {name} | {row['accuracy']:.2%} | {row['p50_ms']:.3f} | {row['p90_ms']:.3f} | "
                     f"{row['mean_ms']:.3f} | {', '.join(f'{v:.3f}' for v in row['trial_p50_ms'])} | "
                     f"{statistics.median(row['vs_recipe']):.2f}× |")
    return "\n".join(lines), {"variants": rows, "trials": trials, "threads": threads, "quick": quick}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--lengths-worker":
        return lengths_worker(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                        help=f"comma-separated, of: {', '.join(w.name for w in WORKLOADS)}, and minilm-lengths "
                             "(MiniLM at the real snippet lengths: fixed 64 and dynamic by hand against the "
                             "shape-bucketed recipe; run only when named)")
    parser.add_argument("--trials", type=int, default=3, help="latency trials per variant (fresh process each)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every runtime")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_workloads")
    parser.add_argument("--quick", action="store_true",
                        help="small eval and calibration sets, short distillation, quick latency: a smoke run")
    parser.add_argument("--fresh", action="store_true", help="rebuild every stage instead of reusing cached ones")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated subset of the variants (eager and ort-fp32 are always built: the "
                             "baseline and the alternatives' reference)")
    args = parser.parse_args(argv)

    from optimizer.measure.environment import describe, fingerprint

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    by_name = {w.name: w for w in WORKLOADS}
    chosen = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in by_name and name != "minilm-lengths"]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {list(by_name)}")
    wanted = {v.strip() for v in args.variants.split(",") if v.strip()} | {"eager", "ort-fp32"}
    unknown = sorted(wanted - {v.name for v in VARIANTS})
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {[v.name for v in VARIANTS]}")
    variants = [v for v in VARIANTS if v.name in wanted]
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ".stage-cache"
    cache.mkdir(exist_ok=True)

    environment = fingerprint(threads=args.threads)
    command = "python benchmarks/workloads.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections: list[str] = []
    results: dict[str, Any] = {"environment": environment, "command": command, "quick": args.quick,
                               "trials": args.trials, "threads": args.threads, "workloads": {}}
    for name in chosen:
        if name == "minilm-lengths":
            log("minilm-lengths: building the variants")
            text, figures = minilm_lengths(out / name, trials=args.trials, threads=args.threads, quick=args.quick,
                                           fresh=args.fresh, log=log)
            print("\n" + text, flush=True)
            sections.append(text)
            results["workloads"][name] = figures
            continue
        workload = by_name[name]
        reason = check_workload(workload, out / name)
        if reason:
            print(f"\n{name}: skipped: {reason}", flush=True)
            results["workloads"][name] = {"skipped": reason}
            sections.append(f"### {name}: {workload.title}\n\nskipped: {reason}")
            continue
        log(f"{name}: building {len(variants)} variants")
        started = time.perf_counter()
        rows = {v.name: produce(workload, v, out / name, cache, quick=args.quick, fresh=args.fresh, log=log)
                for v in variants}
        baseline = rows["ort-fp32"].baseline
        if baseline is not None:
            fill(rows["eager"], *baseline)
        else:
            rows["eager"].skipped = "the ort-fp32 run, whose baseline it is, did not finish"
        for row in rows.values():
            if row.skipped:
                log(f"  {row.variant.name}: skipped: {row.skipped}")
        build_s = time.perf_counter() - started
        if not any(row.artifact is not None for row in rows.values()):
            # Typically the data: the recipe validates, but loading it fails in every variant alike.
            first = next((row.skipped for row in rows.values() if row.skipped and row.variant.chain), "")
            reason = f"no variant could be built ({first})"
            print(f"\n{name}: skipped: {reason}", flush=True)
            results["workloads"][name] = {"skipped": reason}
            sections.append(f"### {name}: {workload.title}\n\nskipped: {reason}")
            continue
        meta = remeasure(workload, rows, out / name / ".latency", trials=args.trials, threads=args.threads,
                         quick=args.quick, log=log)
        budget = (read_recipe(workload.recipe).get("budget") or {}).get("accuracy_drop")
        meta.update({"trials": args.trials, "threads": args.threads, "quick": args.quick, "budget": budget})
        table, best_alt = summarize_rows(rows, budget)
        text = render_table(workload, table, best_alt, meta)
        chart = out / f"{name}.svg"
        write_chart(chart, workload, table)
        print("\n" + text, flush=True)
        print(f"chart: {chart}", flush=True)
        sections.append(text)
        results["workloads"][name] = {"title": workload.title, "recipe": workload.recipe, "variants": table,
                                      "best_alternative": best_alt, "build_seconds": round(build_s, 1),
                                      "latency_plan": meta["plan"], "chart": str(chart)}

    # Other jobs on the machine move latency more than anything measured here: say how busy it was.
    load = f"load average (1 min) {environment['load_average'][0]:.1f} at the start, {os.getloadavg()[0]:.1f} " \
           f"at the end, on {environment['cpus_usable']} usable cpus" if environment.get("load_average") else ""
    env_line = f"Environment: {describe(environment)}" + (f" | {load}" if load else "")
    results["load_average_end"] = list(os.getloadavg())
    print(f"\n{env_line}\nCommand: {command}", flush=True)
    markdown = "\n\n".join([f"{env_line}  \nCommand: `{command}`", *sections]) + "\n"
    (out / "workloads.md").write_text(markdown, encoding="utf-8")
    (out / "workloads.json").write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
