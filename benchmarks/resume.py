"""What --resume saves: the quick start run once from scratch, then again with --resume.

    python benchmarks/resume.py [--out runs/bench_resume] [--set key.path=value ...]

Both runs are the real command (``python -m optimizer run recipes/quickstart.yaml``) in a fresh process,
timed from start to exit, so imports and the checks before the first stage count too. The first run
starts from an empty output folder (and an empty stage cache); the second finds every stage in the cache,
checks its files against the cache's manifest and reuses artifacts and measurements. The script also checks
that the second report marks every stage cached and shows the same figures as the first.
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

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"


def timed_run(out: Path, extra: list[str]) -> tuple[float, dict]:
    command = [sys.executable, "-m", "optimizer", "run", str(RECIPE), "--out", str(out), "--quiet", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed with exit code {result.returncode}: {result.stderr.strip()[-500:]}")
    return seconds, json.loads((out / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_resume")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="recipe override for both runs, e.g. evaluate.latency.mode=quick")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)  # the first run must find no cache
    sets = [token for value in args.overrides for token in ("--set", value)]

    first_s, first = timed_run(out, sets)
    resumed_s, resumed = timed_run(out, sets + ["--resume"])

    from optimizer.measure.environment import describe

    cached = [stage["cached"] for stage in resumed["stages"]]
    same = all(a.get("latency") == b.get("latency") and a.get("accuracy") == b.get("accuracy")
               for a, b in zip(first["stages"], resumed["stages"]))
    print(f"Environment: {describe(first['environment'])}")
    print(f"recipe: {RECIPE.relative_to(REPO)}  stages: {', '.join(s['name'] for s in first['stages'])}"
          + (f"  overrides: {' '.join(args.overrides)}" if args.overrides else ""))
    print(f"first run (empty cache)   {first_s:8.1f} s")
    print(f"second run (--resume)     {resumed_s:8.1f} s   stages cached: {sum(cached)}/{len(cached)}"
          f"   same figures: {'yes' if same else 'NO'}")
    print(f"ratio first/resumed       {first_s / resumed_s:8.1f}x")
    return 0 if all(cached) and same else 1


if __name__ == "__main__":
    sys.exit(main())
