"""Baseline vs pruned vs pruned+finetuned vs pruned+distilled on the built-in example, in one run.

    python benchmarks/prune_distill.py [--epochs 1] [--trials 3] [--out runs/bench_prune_distill]

Each variant is produced by the toolkit's own passes (prune.structured, finetune, distill.kd, export.onnx)
with the settings of recipes/prune_distill_int8.yaml; finetune and distill get the same number of epochs.
Accuracy is top-1 on the 10,000 Fashion-MNIST test images. Latency is onnxruntime batch-1 p50, measured
for every variant in a fresh process, in rotating order over several trials so that drift of the machine
hits every variant alike; the table shows the median of the trials' p50s and its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "prune_distill_int8.yaml"


def variant_recipes(epochs: int, seed: int = 0) -> dict[str, dict]:
    base = yaml.safe_load(RECIPE.read_text())
    base["seed"] = seed  # the order of training batches (fine-tuning and distillation alike)
    base["model"]["checkpoint"] = str((RECIPE.parent / base["model"]["checkpoint"]).resolve())
    base["budget"] = {}
    stages = {s["name"]: s for s in base["stages"]}
    prune = {k: v for k, v in stages["prune"].items() if k != "budget"}
    distill = copy.deepcopy(stages["distill"])
    distill["with"]["epochs"] = epochs
    finetune = {"name": "finetune", "pass": "finetune",
                "with": {k: v for k, v in distill["with"].items() if k not in ("teacher", "temperature", "alpha")}}
    export = stages["export"]
    chains = {
        "baseline": [export],
        # Measured as it is: the pruned network before any training may predict one class everywhere.
        "pruned": [prune, {**export, "intermediate": True}],
        "pruned+finetuned": [prune, finetune, export],
        "pruned+distilled": [prune, distill, export],
    }
    recipes = {}
    for name, chain in chains.items():
        recipe = copy.deepcopy(base)
        recipe["name"] = f"bench-{name.replace('+', '-')}"
        recipe["stages"] = copy.deepcopy(chain)
        recipe["evaluate"]["latency"]["mode"] = "quick"  # re-measured below, alternating, in full mode
        recipes[name] = recipe
    return recipes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs for finetune and for distill (the same)")
    parser.add_argument("--trials", type=int, default=3, help="latency trials per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the recipes' seed: batch order of both trainings")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_prune_distill")
    args = parser.parse_args(argv)

    from optimizer import Artifact, run_recipe
    from optimizer.data.provider import DataProvider
    from optimizer.measure.environment import describe, fingerprint
    from optimizer.measure.evaluate import evaluate_artifact
    from optimizer.progress import Progress
    from optimizer.recipe import load_recipe

    rows: dict[str, dict] = {}
    for name, recipe in variant_recipes(args.epochs, args.seed).items():
        print(f"building {name} ...", file=sys.stderr, flush=True)
        report = run_recipe(recipe, out=args.out / name.replace("+", "-"), quiet=True)
        torch_stage = [s for s in report.stages if s["form"] == "torch"][-1]
        onnx_stage = report.stages[-1]
        rows[name] = {
            "top1": onnx_stage["accuracy"]["value"],
            "ci95": onnx_stage["accuracy"]["ci95"],
            "macs": torch_stage["macs"],
            "params": torch_stage["params"],
            "onnx": Artifact.load(report.path / onnx_stage["artifact"]),
            "p50s": [],
        }

    # The same eval inputs for every variant's latency, measured in rotating order.
    loaded = load_recipe(variant_recipes(args.epochs, args.seed)["baseline"])
    data = DataProvider(loaded, list(loaded.recipe.model.inputs)).eval()
    work = args.out / ".latency"
    work.mkdir(parents=True, exist_ok=True)
    eval_npz = work / "eval.npz"
    np.savez(eval_npz, __labels__=data.labels[:500], **{k: v[:500] for k, v in data.inputs.items()})
    plan = loaded.recipe.evaluate.latency.model_copy(update={"mode": "full", "threads": args.threads}).model_dump()
    names = list(rows)
    progress = Progress(quiet=True)
    for trial in range(args.trials):
        order = names[trial % len(names):] + names[: trial % len(names)]
        for name in order:
            print(f"latency trial {trial + 1}/{args.trials}: {name}", file=sys.stderr, flush=True)
            result = evaluate_artifact(
                rows[name]["onnx"], stage=name, eval_npz=eval_npz, measurements_dir=work / f"{name}-{trial}",
                threads=args.threads, latency=plan, accuracy_batch_size=256, seed=0, import_paths=[REPO],
                progress=progress,
            )
            rows[name]["p50s"].append(result["latency"]["p50_ms"])

    base = rows["baseline"]
    base_p50 = statistics.median(base["p50s"])
    print()
    print(f"Environment: {describe(fingerprint(threads=args.threads))}")
    print(f"finetune and distill: {args.epochs} epochs each; latency: onnxruntime batch 1, {args.trials} trials, "
          "median of per-trial p50s [min-max]")
    header = f"{'variant':<18} {'top-1 %':>17} {'MMACs':>7} {'MACs ratio':>10} {'params':>9} {'p50 ms':>22} {'p50 ratio':>9}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        p50 = statistics.median(row["p50s"])
        low, high = row["ci95"]
        print(f"{name:<18} {row['top1'] * 100:6.2f} ({low * 100:.2f}–{high * 100:.2f}) {row['macs'] / 1e6:7.2f} "
              f"{base['macs'] / row['macs']:9.2f}× {row['params']:9,} "
              f"{p50:8.3f} [{min(row['p50s']):.3f}–{max(row['p50s']):.3f}] {p50 / base_p50:8.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
