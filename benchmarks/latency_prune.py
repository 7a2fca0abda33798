"""Latency-allocated pruning on MobileNetV2 against NNCF INT8 -> OpenVINO of the unpruned model, with ablations.

    python benchmarks/latency_prune.py [--speedup 1.6] [--trials 3] [--threads 1] [--out runs/bench_latency_prune]
                                       [--variants nncf-ov,latency,...] [--recipe-eval 1000] [--test-images 10000]
                                       [--cache DIR] [--run NAME=DIR ...]

Every variant is built by ``run_recipe`` from ``recipes/mobilenet_latency_prune_openvino.yaml`` with its stages
replaced (a shared stage cache builds the baseline and the common prefixes once), and every final artifact is
an OpenVINO INT8 model:

  nncf-ov          unpruned: export, OpenVINO IR, NNCF INT8 on the IR (OpenVINO's documented order, by hand)
  latency          prune.structured allocation: latency, no recovery
  latency+rec      ... then recover.reconstruct (least squares, no gradient step)
  latency+rec+bn   ... reconstruct, then recover.batchnorm
  latency+rec+kd   ... reconstruct, then distill.kd, frugal (teacher logits cached, last blocks only, minutes
                   budget): the recipe
  uniform+rec+kd   the same latency target met by one kept fraction in every block (latency.solver: uniform),
                   with the recipe's recovery: MAC-uniform pruning at the same measured latency

``--run NAME=DIR`` adds the final artifact of a finished ``optimizer run`` or ``optimizer search`` (``DIR/final``)
as one more row, built by the real command rather than here: the recipe as shipped, timed end to end, or a
search's chosen artifact. Its MAC ratio and stage times come from ``DIR/report.json`` (for a search, the chosen
trial's report, which the published manifest names) when there is one.

Then, for every final artifact:
* top-1 on all ``--test-images`` Fashion-MNIST test images (streamed through the recipe's preprocessing in
  chunks; 10,000 images at 224×224 are 6 GB as floats), with a Wilson 95 % interval; the unpruned FP32 model
  (its ONNX export, checked against eager by the export stage) is scored the same way as the baseline;
* batch-1 p50 in a fresh process per variant and trial, the variants' order rotated between trials; speedup
  against nncf-ov as the median [min-max] of per-trial ratios.

Prints the table and writes ``latency_prune.md`` and ``latency_prune.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / "recipes" / "mobilenet_latency_prune_openvino.yaml"

VARIANTS: dict[str, list[str]] = {
    "nncf-ov": ["export", "ir_fp32", "int8_ir"],
    "latency": ["prune", "export", "int8", "openvino"],
    "latency+rec": ["prune", "reconstruct", "export", "int8", "openvino"],
    "latency+rec+bn": ["prune", "reconstruct", "batchnorm", "export", "int8", "openvino"],
    "latency+rec+kd": ["prune", "reconstruct", "distill", "export", "int8", "openvino"],
    "uniform+rec+kd": ["prune_uniform", "reconstruct", "distill", "export", "int8", "openvino"],
}
LATENCY_SAMPLES = 16


def stage_table(recipe: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage a variant may use, by name, built from the recipe's own stages."""
    stages = {s["name"]: s for s in copy.deepcopy(recipe["stages"])}
    uniform = copy.deepcopy(stages["prune"])
    uniform["name"] = "prune_uniform"
    uniform["with"].setdefault("latency", {})["solver"] = "uniform"
    stages["prune_uniform"] = uniform
    stages["batchnorm"] = {"name": "batchnorm", "pass": "recover.batchnorm",
                           "with": {"split": "calibration", "batches": 16, "batch_size": 32}}
    stages["ir_fp32"] = {"name": "ir_fp32", "pass": "compile.openvino",
                         "with": {"precision_hint": "f32", "performance_hint": "latency"}}
    stages["int8_ir"] = {"name": "int8_ir", "pass": "quantize.nncf",
                         "with": copy.deepcopy(stages["int8"]["with"])}
    return stages


def variant_recipe(base: dict[str, Any], stages: dict[str, dict[str, Any]], variant: str, speedup: float,
                   recipe_eval: int) -> dict[str, Any]:
    recipe = copy.deepcopy(base)
    recipe["name"] = f"bench-latency-prune-{variant}"
    recipe["budget"] = {}  # every variant is built and shown, whatever it costs
    recipe["publish"] = "last"  # every stage is marked intermediate below; the variant's result is its last stage
    recipe["data"]["eval"]["samples"] = recipe_eval
    recipe["evaluate"]["latency"]["mode"] = "quick"  # re-measured below, in full
    chain = []
    for name in VARIANTS[variant]:
        stage = copy.deepcopy(stages[name])
        if stage["pass"] == "prune.structured":
            stage["with"]["speedup"] = speedup
        stage["intermediate"] = True
        chain.append(stage)
    recipe["stages"] = chain
    return recipe


def score_on_test_images(artifact: Any, count: int, threads: int,
                         preprocess: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Top-1 over the first ``count`` test images, preprocessed in chunks (never all in memory at once) by
    ``preprocess`` (uint8 images in, model inputs out; default: the MobileNetV2 example's, 224×224)."""
    from optimizer.data.idx import load_fashion_mnist
    from optimizer.examples.mobilenet_fashion import DEFAULT_FASHION_ROOT
    from optimizer.measure.accuracy import top1
    from optimizer.runtimes.base import open_runtime

    if preprocess is None:
        from optimizer.examples.mobilenet_fashion import preprocess

    images, labels = load_fashion_mnist(Path(DEFAULT_FASHION_ROOT), "test")
    images, labels = images[:count], labels[:count].astype(np.int64)
    runtime = open_runtime(artifact, threads=threads)
    batch = runtime.fixed_batch or 50
    predictions = np.empty(len(labels), dtype=np.int64)
    for start in range(0, len(labels), 500):
        chunk = preprocess(images[start:start + 500])
        for offset in range(0, len(chunk), batch):
            part = chunk[offset:offset + batch]
            count_here = len(part)
            if runtime.fixed_batch and count_here < batch:
                part = np.concatenate([part, np.repeat(part[-1:], batch - count_here, axis=0)])
            logits = runtime.run({artifact.inputs[0].name: np.ascontiguousarray(part)})[:count_here]
            predictions[start + offset:start + offset + count_here] = logits.reshape(count_here, -1).argmax(-1)
    runtime.close()
    result = top1(predictions, labels)
    result["correct"] = (predictions == labels)
    return result


def finished_run(folder: Path) -> dict[str, Any]:
    """A row's inputs from an ``optimizer run`` / ``optimizer search`` output folder: its published artifact,
    and the pruning details and stage times of the run that built it (the chosen trial's, for a search)."""
    from optimizer import Artifact

    artifact = Artifact.load(folder / "final")
    report_file = folder / "report.json"
    manifest = json.loads((folder / "final" / "manifest.json").read_text())
    trial = (manifest.get("search") or {}).get("trial_folder")
    if not report_file.is_file() and trial:
        report_file = folder / trial / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {"stages": []}
    prune = next((s for s in report["stages"] if s["name"].startswith("prune")), None)
    return {"artifact": artifact, "report": report_file if report_file.is_file() else None,
            "macs": None, "pruning": ((prune or {}).get("details") or {}).get("pruning", {}),
            "seconds": float(report.get("duration_s") or 0),
            "stage_seconds": {s["name"]: round(float(s.get("seconds") or 0), 1) for s in report["stages"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speedup", type=float, default=None, help="prune target (default: the recipe's)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_latency_prune")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--recipe-eval", type=int, default=1000,
                        help="eval images of the variants' runs (their stage tables); the final artifacts are "
                             "scored on --test-images")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--score-threads", type=int, default=2, help="threads for the 10,000-image scoring")
    parser.add_argument("--cache", type=Path, default=None,
                        help="stage cache folder to share with earlier runs (default: OUT/stage-cache)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                        help="add the final artifact of a finished optimizer run/search output folder DIR")
    args = parser.parse_args(argv)

    from optimizer import Artifact, run_recipe
    from optimizer.data.provider import DataProvider
    from optimizer.measure.accuracy import mcnemar
    from optimizer.measure.environment import describe, fingerprint
    from optimizer.measure.evaluate import evaluate_artifact
    from optimizer.measure.latency import summarize
    from optimizer.progress import Progress
    from optimizer.recipe import load_recipe

    started = time.perf_counter()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    base = yaml.safe_load(RECIPE.read_text())
    base["model"]["checkpoint"] = str((RECIPE.parent / base["model"]["checkpoint"]).resolve())
    if not Path(base["model"]["checkpoint"]).is_file():
        print(f"{base['model']['checkpoint']} is missing; train it first:\n  python -m "
              "optimizer.examples.train_mobilenet_fashion --out checkpoints/mobilenet_fashion.safetensors",
              file=sys.stderr)
        return 2
    speedup = args.speedup or next(s for s in base["stages"] if s["name"] == "prune")["with"]["speedup"]
    stages = stage_table(base)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or out / "stage-cache"
    env_line = describe(fingerprint(args.threads))
    print(f"Environment: {env_line}", flush=True)

    built: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        report = run_recipe(variant_recipe(base, stages, name, speedup, args.recipe_eval), out=out / name,
                            quiet=True, resume=True, cache=cache)
        final = report.stages[-1]
        stage_seconds = {s["name"]: round(float(s.get("seconds") or 0), 1) for s in report.stages}
        prune = next((s for s in report.stages if s["name"].startswith("prune")), None)
        pruning = (prune or {}).get("details", {}).get("pruning", {}) if prune else {}
        built[name] = {"artifact": Artifact.load(report.path / final["artifact"]), "report": report.path,
                       "macs": final.get("macs"), "pruning": pruning, "seconds": time.perf_counter() - t0,
                       "stage_seconds": stage_seconds,
                       "export": Artifact.load(report.path / report.stage("export")["artifact"])}
        print(f"  built {name} in {built[name]['seconds']:.0f} s "
              f"({sum(1 for s in report.stages if s.get('cached'))} of {len(report.stages)} stages from the cache)",
              flush=True)

    for item in args.run:
        name, _, folder = item.partition("=")
        if not name or not folder or name in built:
            parser.error(f"--run {item!r}: give NAME=DIR with a NAME not used by another variant")
        built[name] = finished_run(Path(folder))
        names.append(name)
        print(f"  took {name} from {folder} ({built[name]['seconds']:.0f} s when it ran)", flush=True)

    # Accuracy on the full test split: the unpruned FP32 model first (its ONNX export), then every final artifact.
    reference = built[next(n for n in names if "export" in built[n])]["export"]
    print(f"scoring the FP32 baseline and {len(names)} variants on {args.test_images} test images", flush=True)
    baseline = score_on_test_images(reference, args.test_images, args.score_threads)
    scores = {name: score_on_test_images(built[name]["artifact"], args.test_images, args.score_threads)
              for name in names}

    # Latency: fresh process per variant and trial, rotating order.
    loaded = load_recipe(variant_recipe(base, stages, "nncf-ov", speedup, LATENCY_SAMPLES))
    data = DataProvider(loaded, list(loaded.recipe.model.inputs)).eval()
    eval_npz = out / "latency_inputs.npz"
    np.savez(eval_npz, __labels__=data.labels, **data.inputs)
    plan = loaded.recipe.evaluate.latency.model_copy(update={"mode": "full", "threads": args.threads,
                                                             "trials": 1}).model_dump()
    p50s: dict[str, list[float]] = {n: [] for n in names}
    raws: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for trial in range(args.trials):
        order = names[trial % len(names):] + names[:trial % len(names)]
        for name in order:
            result = evaluate_artifact(built[name]["artifact"], stage=name, eval_npz=eval_npz,
                                       measurements_dir=out / "latency" / f"{name}-{trial}", threads=args.threads,
                                       latency=plan, accuracy_batch_size=8, seed=0, import_paths=[REPO],
                                       progress=Progress(quiet=True))
            p50s[name].append(result["latency"]["p50_ms"])
            raws[name].append(np.load(result["raw_times_file"], allow_pickle=False))
        print(f"  latency trial {trial + 1}/{args.trials} done", flush=True)

    reference_name = "nncf-ov" if "nncf-ov" in names else names[0]
    rows = []
    for name in names:
        pooled = summarize(np.concatenate(raws[name]))
        ratios = [r / c for r, c in zip(p50s[reference_name], p50s[name])]
        score = scores[name]
        test = mcnemar(baseline["correct"], score["correct"])
        pruning = built[name]["pruning"]
        latency_info = pruning.get("latency") or {}
        rows.append({
            "variant": name, "top1": score["value"], "ci95": score["ci95"],
            "drop_points": (baseline["value"] - score["value"]) * 100, "mcnemar_p": test.get("p_value") if test else None,
            "p50_ms": pooled["p50_ms"], "p50_ci95_ms": pooled["p50_ci95_ms"], "trial_p50_ms": p50s[name],
            "speedup": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
            "macs_ratio": pruning.get("macs_ratio"),
            "predicted_ms": latency_info.get("predicted_ms"), "table_measured_ms": latency_info.get("measured_ms"),
            "build_s": round(built[name]["seconds"], 1), "stage_seconds": built[name]["stage_seconds"],
            "prune_widths": {k: v["chosen"] for k, v in (latency_info.get("table") or {}).items()},
        })
    for row in rows:  # measured speedup against the MAC ratio, both relative to the unpruned INT8 model
        if row["macs_ratio"]:
            row["speedup_per_mac_ratio"] = row["speedup"] / row["macs_ratio"]
    by = {r["variant"]: r for r in rows}
    recovered = None
    if {"latency", "latency+rec"} <= set(by):
        lost = baseline["value"] - by["latency"]["top1"]
        if lost > 0:
            recovered = (by["latency+rec"]["top1"] - by["latency"]["top1"]) / lost

    lines = [f"Environment: {env_line}",
             f"Command: python benchmarks/latency_prune.py --speedup {speedup} --trials {args.trials} "
             f"--threads {args.threads} --test-images {args.test_images}",
             f"Baseline (unpruned FP32, its ONNX export): top-1 {baseline['value'] * 100:.2f} % "
             f"({baseline['ci95'][0] * 100:.2f}–{baseline['ci95'][1] * 100:.2f}) on {args.test_images} test images",
             "",
             "| variant | top-1 % (95% CI) | Δ top-1 pts | p50 ms (95% CI) | speedup vs nncf-ov | MAC ratio | "
             "speedup / MAC ratio | build s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mac = f"{r['macs_ratio']:.2f}×" if r["macs_ratio"] else "–"
        per = f"{r['speedup_per_mac_ratio']:.2f}" if r.get("speedup_per_mac_ratio") else "–"
        lines.append(f"| {r['variant']} | {r['top1'] * 100:.2f} ({r['ci95'][0] * 100:.2f}–{r['ci95'][1] * 100:.2f}) | "
                     f"{-r['drop_points']:+.2f} | {r['p50_ms']:.3f} ({r['p50_ci95_ms'][0]:.3f}–{r['p50_ci95_ms'][1]:.3f}) | "
                     f"{r['speedup']:.2f}× [{r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f}] | {mac} | {per} | "
                     f"{r['build_s']:.0f} |")
    if recovered is not None:
        lines += ["", f"Reconstruction alone (no gradient step) recovered {recovered * 100:.0f} % of the top-1 that "
                      "latency-allocated pruning lost."]
    lines += ["", f"Total benchmark time: {(time.perf_counter() - started) / 60:.1f} min"]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "latency_prune.md").write_text(text + "\n")
    (out / "latency_prune.json").write_text(json.dumps({
        "environment": env_line, "baseline_top1": baseline["value"], "baseline_ci95": baseline["ci95"],
        "rows": rows, "reconstruction_recovered_share": recovered, "speedup_target": speedup}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
