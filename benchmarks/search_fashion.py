"""optimizer search against the hand-written recipes, on the built-in Fashion-MNIST example.

    python benchmarks/search_fashion.py [--out runs/bench_search_fashion] [--trials 10] [--workers 2]
                                        [--distill-samples 5000] [--ray local]

1. The FP32 ONNX model's p50 (export only, all 10,000 test images, full latency); the latency budget is half of it.
2. ``optimizer search recipes/search_fashion.yaml --set budget.latency_p50_ms=<budget>``, timed from start to exit.
3. Every shipped hand-written recipe for this model, run with the same latency budget (``optimizer run``
   publishes its fastest stage within its budgets; exit 4 when none is within them).
4. The comparison: the search's artifact against every hand-written recipe that meets the budget (accuracy on the
   same 10,000 images, p50 on the same runtime settings), the trial count, the wall time, and what the shared
   stage cache saved (the trials' total time against as many runs with nothing cached).

Every command is the real one in a fresh process. Latency figures come from separate runs on a machine that may be
busy: the budget check uses each run's own p50. The hand-written recipes' distillation is capped at
``--distill-samples`` training images (the search recipe's own setting; 0: as shipped, one to three epochs over
60,000 images), so both sides get the same training budget and the benchmark fits in about an hour on 2 cores.
Run it from a checkout nobody edits meanwhile: the stage cache keys cover the package's code, so an edit during
the search makes later trials recompute what earlier ones cached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SEARCH_RECIPE = REPO / "recipes" / "search_fashion.yaml"
HAND_WRITTEN = ["quickstart", "cpu_openvino_int8", "prune_distill_int8", "prune_distill_int8_openvino"]


def command(args: list[str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "optimizer", *args], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    return result.returncode, time.perf_counter() - start, result.stderr.strip()


def fp32_onnx_p50(out: Path) -> float:
    """p50 of the example exported to ONNX, measured as the recipes measure (full latency, one thread)."""
    recipe = yaml.safe_load(SEARCH_RECIPE.read_text())
    recipe.pop("search")
    recipe["name"] = "fp32-onnx"
    recipe["model"]["checkpoint"] = str((SEARCH_RECIPE.parent / recipe["model"]["checkpoint"]).resolve())
    recipe["stages"] = [s for s in recipe["stages"] if s["name"] == "export"]
    recipe["publish"] = "last"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fp32_onnx.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = command(["run", str(path), "--out", str(out / "fp32_onnx"), "--quiet"])
    if code != 0:
        sys.exit(f"the FP32 ONNX run failed (exit {code}): {err[-400:]}")
    report = json.loads((out / "fp32_onnx" / "report.json").read_text())
    return report["stages"][-1]["latency"]["p50_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_search_fashion")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--distill-samples", type=int, default=5000,
                        help="cap of the hand-written recipes' distillation training images (0: as shipped)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray", help="run the search's trials on Ray ('local' or an address)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)  # nothing cached from an earlier benchmark

    fp32 = fp32_onnx_p50(out)
    budget = round(fp32 / 2, 4)
    print(f"FP32 ONNX p50 {fp32:.4f} ms -> budget.latency_p50_ms = {budget}", flush=True)

    search_args = ["search", str(SEARCH_RECIPE), "--out", str(out / "search"), "--trials", str(args.trials),
                   "--workers", str(args.workers), "--quiet", "--set", f"budget.latency_p50_ms={budget}"]
    search_args += ["--ray", args.ray] if args.ray else []
    code, search_s, err = command(search_args)
    if code not in (0, 4):
        sys.exit(f"optimizer search failed (exit {code}): {err[-400:]}")
    search = json.loads((out / "search" / "search.json").read_text())
    chosen = search["chosen"]

    rows = []
    for name in HAND_WRITTEN:
        run_out = out / "hand" / name
        path = REPO / "recipes" / f"{name}.yaml"
        sets = ["--set", f"budget.latency_p50_ms={budget}"]
        if args.distill_samples:
            stages = yaml.safe_load(path.read_text())["stages"]
            sets += [token for i, s in enumerate(stages) if s["pass"] == "distill.kd"
                     for token in ("--set", f"stages.{i}.with.train_samples={args.distill_samples}")]
        code, seconds, err = command(["run", str(path), "--out", str(run_out), "--quiet", *sets])
        manifest_path = run_out / "final" / "manifest.json"
        if code == 0 and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            rows.append((name, manifest["stage"], manifest["accuracy"]["value"], manifest["latency"]["p50_ms"],
                         manifest["latency"]["p50_ms"] <= budget, seconds))
        else:
            rows.append((name, "-", None, None, False, seconds))
            print(f"{name}: nothing within the budgets (exit {code}): {err.splitlines()[-1][:200] if err else ''}",
                  flush=True)

    print()
    print(f"budget: p50 <= {budget} ms (half the FP32 ONNX p50), accuracy drop <= "
          f"{search['budgets'].get('accuracy_drop', 0) * 100:.1f} points (the search's; each hand-written recipe keeps "
          "its own)")
    if args.distill_samples:
        print(f"distillation in the hand-written recipes capped at {args.distill_samples} training images")
    print(f"{'':32} {'stage':10} {'top-1 %':>8} {'p50 ms':>8} {'meets':>6} {'wall s':>8}")
    if chosen:
        print(f"{'search (trial ' + str(chosen['trial']) + ')':32} {chosen['stage']:10} {chosen['accuracy'] * 100:8.2f} "
              f"{chosen['p50_ms']:8.4f} {'yes':>6} {search_s:8.1f}")
        print(f"  {chosen['label']}")
    else:
        print(f"{'search':32} no trial within the budget {'':>6} {search_s:8.1f}")
    for name, stage, accuracy, p50, meets, seconds in rows:
        acc = f"{accuracy * 100:8.2f}" if accuracy is not None else f"{'-':>8}"
        lat = f"{p50:8.4f}" if p50 is not None else f"{'-':>8}"
        print(f"{name:32} {stage:10} {acc} {lat} {'yes' if meets else 'no':>6} {seconds:8.1f}")
    meeting = [r for r in rows if r[4]]
    if chosen:
        beaten = [r[0] for r in meeting if chosen["accuracy"] + 1e-12 < r[2]]
        print(f"\nsearch at least as accurate as every hand-written recipe meeting the budget: "
              f"{'yes' if not beaten else 'no (' + ', '.join(beaten) + ')'} ({len(meeting)} of {len(rows)} meet it)")
    cache = search["cache"]
    print(f"trials: {len(search['trials'])} ({sum(t['state'] == 'complete' for t in search['trials'])} complete, "
          f"{sum(t['state'] == 'fail' for t in search['trials'])} failed); full re-measures: {len(search['full'])}; "
          f"search wall time {search_s:.1f} s")
    if cache.get("without_cache_s"):
        print(f"stage cache: the trials took {cache['total_s']:.1f} s against {cache['without_cache_s']:.1f} s for the "
              f"same trials with nothing cached (saved {cache['saved_fraction'] * 100:.0f} %); "
              f"{cache['stages_cached']} stages reused, {cache['stages_run']} run")
    if cache.get("trials_times_full_run_s"):
        print(f"trials x one full run of the recipe as written ({cache['full_run_s']:.1f} s uncached): "
              f"{cache['trials_times_full_run_s']:.1f} s, against the search's {cache['total_s']:.1f} s of trials")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
