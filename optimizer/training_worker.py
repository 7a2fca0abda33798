"""One rank of a distributed ``distill.kd`` / ``finetune`` run, started by the pass through torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node N -m optimizer.training_worker REQUEST.json

The request (JSON, written by ``optimizer/passes/distill.py``) names the student artifact folder, the
teacher (as resolved by the pass: an artifact folder, a factory + checkpoint, or a checked ``.pt2``
copy), the training settings, the ``.npz`` of training and selection arrays, and where rank 0 writes the
weights (safetensors) and ``result.json``. Every rank runs the same loop (``optimizer.training.train``)
under DistributedDataParallel; progress goes to stdout from rank 0 as ``@@progress <fraction> <text>``.
An error is written to ``result.json`` by the rank that hit it (if rank 0 has not written one), with the
exit code of its class, and the rank exits non-zero so that torchrun stops the others.

Only rank 0's weights are saved, so before saving, every rank hashes its final state (parameters and
buffers, :func:`state_digest`) and the digests are gathered: ranks that ended on different weights (a
gradient that was not reduced, a keep/stop decision taken differently) would make the saved model one
rank's private result, so that is a stage error. The digests go into the result as ``rank_state_sha256``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from optimizer.training import DistInfo


def state_digest(module: "torch.nn.Module") -> str:
    """sha256 over the module's state (parameters and buffers): names, dtypes, shapes and bytes, in name order.

    Bit-for-bit, not within a tolerance: DDP averages the gradients before every step, so ranks that
    started from the same weights apply the same update and must stay identical."""
    import torch

    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # A byte view: numpy has no bfloat16, and the bytes are what must agree.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_digests(module: "torch.nn.Module", info: "DistInfo") -> list[str]:
    """Every rank's :func:`state_digest`, in rank order (a one-element list in a single process)."""
    mine = state_digest(module)
    if not info.distributed:
        return [mine]
    import torch.distributed as dist

    digests: list[str | None] = [None] * info.world_size
    dist.all_gather_object(digests, mine)
    return [str(d) for d in digests]


def _write_result(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def run(request: dict) -> dict:
    from optimizer.artifact import Artifact
    from optimizer.passes.distill import build_teacher, load_arrays
    from optimizer.runtimes.torch_eager import load_torch_module
    from optimizer.torch_structure import save_module_weights
    from optimizer.training import FeaturePair, KDSettings, TrainingConfig, finish_distributed, init_distributed, train

    cfg = TrainingConfig.model_validate(request["training"])
    info = init_distributed(cfg.device)
    try:
        student = load_torch_module(Artifact.load(request["student"]))
        teacher = build_teacher(request["teacher"]) if request.get("teacher") else None
        kd = None
        if request.get("kd"):
            raw = request["kd"]
            kd = KDSettings(temperature=raw["temperature"], alpha=raw["alpha"],
                            feature_layers=[FeaturePair.model_validate(p) for p in raw["feature_layers"]],
                            cache_teacher=bool(raw.get("cache_teacher", False)))
        train_data, selection = load_arrays(Path(request["data_npz"]))

        def progress(description: str, fraction: float | None = None) -> None:
            if info.is_main:
                print(f"@@progress {fraction or 0.0:.4f} {description}", flush=True)

        result = train(student, train_data, selection, cfg, seed=request["seed"], teacher=teacher, kd=kd,
                       progress=progress, dist_info=info, where=f"stage '{request['stage']}'")
        digests = gather_digests(student, info)
        if len(set(digests)) != 1:
            from optimizer.errors import StageError

            listed = ", ".join(f"rank {r} {d[:12]}" for r, d in enumerate(digests))
            raise StageError(f"stage '{request['stage']}': the {len(digests)} training processes ended with "
                             f"different weights ({listed}); the saved model would be rank 0's alone. "
                             "Train with processes: 1 and report this")
        if info.is_main:
            save_module_weights(student, Path(request["weights"]))
        return {**result.to_dict(), "rank_state_sha256": digests}
    finally:
        finish_distributed(info)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m torch.distributed.run ... -m optimizer.training_worker REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    result_path = Path(request["result_json"])
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = run(request)
    except Exception as exc:  # report the first failure with its exit code; torchrun stops the other ranks
        from optimizer.errors import OptimizerError

        code = exc.exit_code if isinstance(exc, OptimizerError) else 1
        message = str(exc) if isinstance(exc, OptimizerError) else \
            f"stage '{request.get('stage')}': training failed on rank {rank}: {type(exc).__name__}: {exc}"
        traceback.print_exc()
        if rank == 0 or not result_path.exists():
            _write_result(result_path, {"ok": False, "exit_code": code, "error": message})
        return code or 1
    if rank == 0:
        _write_result(result_path, {"ok": True, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
