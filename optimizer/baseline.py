"""The baseline artifact: the user's model, checked and re-saved in a safe form."""

from __future__ import annotations

import shutil
from pathlib import Path

from optimizer.artifact import Artifact
from optimizer.models import (
    build_architecture,
    copy_onnx_model,
    count_parameters,
    load_program,
    load_weights,
    read_state_dict,
)
from optimizer.recipe import LoadedRecipe


def onnx_parameter_count(path: Path) -> int:
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) > 0))


def make_baseline(loaded: LoadedRecipe, folder: Path) -> Artifact:
    """Write the baseline artifact into ``folder``.

    A state dict is loaded into the architecture (strictly, with weights_only=True) and saved again as
    safetensors, so no later stage or deployment ever reads the original pickle.
    """
    model = loaded.recipe.model
    folder.mkdir(parents=True, exist_ok=True)
    lineage = {"stage": "baseline", "source": str(loaded.resolve(model.checkpoint)) if model.checkpoint else None}
    if model.source_kind == "onnx":
        source = loaded.resolve(model.checkpoint)
        entry = copy_onnx_model(source, folder)
        facts = {"precision": "fp32", "params": onnx_parameter_count(entry)}
        return Artifact("onnx", folder, entry.name, list(model.inputs), lineage=lineage, facts=facts)
    if model.source_kind == "program":
        # Copy first, then check and load the copy: the file we checked is the file we load.
        shutil.copyfile(loaded.resolve(model.checkpoint), folder / "model.pt2")
        module = load_program(folder / "model.pt2")
        from optimizer.measure.complexity import count_macs

        facts = {"precision": "fp32", "params": count_parameters(module), "macs": count_macs(module, list(model.inputs))}
        return Artifact("torch", folder, "model.pt2", list(model.inputs), meta={"kind": "program"},
                        lineage=lineage, facts=facts)

    from optimizer.torch_structure import save_module_weights

    assert model.factory is not None  # validate_recipe guarantees it
    module = build_architecture(model.factory, model.kwargs)
    if model.checkpoint is not None:
        checkpoint = loaded.resolve(model.checkpoint)
        load_weights(module, read_state_dict(checkpoint), where=str(checkpoint))
    save_module_weights(module, folder / "model.safetensors")
    from optimizer.measure.complexity import count_macs

    facts = {"precision": "fp32", "params": count_parameters(module), "macs": count_macs(module, list(model.inputs))}
    meta = {"kind": "factory", "factory": model.factory, "kwargs": model.kwargs}
    return Artifact("torch", folder, "model.safetensors", list(model.inputs), meta=meta, lineage=lineage, facts=facts)
