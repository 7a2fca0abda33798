"""Input-size sweeps (``evaluate.latency.shapes``): which axes a size sets, what may be swept, and the data.

A size is given to every axis the recipe declares dynamic (``model.inputs[].dynamic``): the sequence length of
a Transformer, the height and width of a CNN. A recipe that declares none may still sweep the resolution of a
single 4-D image input, on torch stages only: an exported or compiled artifact takes other sizes only on the
axes declared dynamic, so a sweep that would hand one a shape it cannot take is refused when the recipe is
validated (exit 2), not halfway through a run.

The data at each size: an image data set with ``resize`` is loaded again at that size (so accuracy at each
resolution is measured on properly resampled images, and BatchNorm statistics can be re-estimated there);
anything else is the eval samples fitted to the size (token sequences cut or padded with zeros, images
resampled), for latency only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optimizer.errors import RecipeError

if TYPE_CHECKING:
    from optimizer.data.provider import DataProvider
    from optimizer.passes.recover import RecoverBatchNormConfig
    from optimizer.recipe import InputSpec, LoadedRecipe, Recipe

# Samples kept for a latency-only point: enough for a round-robin over varied inputs.
LATENCY_SAMPLES = 256
IMAGE_KINDS = ("fashion-mnist", "image-folder", "npz")


@dataclass(frozen=True)
class SweptAxes:
    axes: dict[str, tuple[int, ...]]
    """Input name -> the axes a size sets."""
    declared: bool
    """Whether the axes are the recipe's declared dynamic axes (else the resolution of an image input)."""
    low: int
    high: int
    """The sizes every swept axis accepts (the tightest declared bounds; 1..any for undeclared axes)."""

    def describe(self) -> str:
        axes = "; ".join(f"{name} axes {', '.join(map(str, a))}" for name, a in self.axes.items())
        return f"{axes} ({'declared dynamic' if self.declared else 'image resolution, torch stages only'})"


def swept_axes(inputs: list["InputSpec"]) -> SweptAxes | None:
    """The axes ``evaluate.latency.shapes`` sets, or None when the model has none to sweep."""
    declared = {spec.name: tuple(sorted(spec.dynamic)) for spec in inputs if spec.dynamic}
    if declared:
        bounds = [(d.min, d.max) for spec in inputs for d in spec.dynamic.values()]
        return SweptAxes(declared, True, max(b[0] for b in bounds), min(b[1] for b in bounds))
    if len(inputs) == 1 and len(inputs[0].shape) == 4 and inputs[0].dtype.startswith("float"):
        return SweptAxes({inputs[0].name: (2, 3)}, False, 1, 1 << 30)
    return None


def check_shapes(recipe: "Recipe", forms: list[tuple[str, str]], torch_timed_on: str | None) -> str | None:
    """Refuse a sweep the recipe's stages cannot run (RecipeError, exit 2); a line for ``optimizer validate``.

    ``forms``: (stage, the form of its artifact) from the baseline on. ``torch_timed_on``: the deployment runtime
    torch stages are timed on through a throwaway export (None: PyTorch eager, which takes any size the model
    takes)."""
    latency = recipe.evaluate.latency
    if not latency.shapes:
        return None
    axes = swept_axes(recipe.model.inputs)
    if axes is None:
        raise RecipeError("evaluate.latency.shapes: the model declares no dynamic axis to sweep; declare the axes a "
                          "size sets in model.inputs[].dynamic (e.g. {1: {name: seq, min: 8, max: 128}})")
    for index, size in enumerate(latency.shapes):
        if not axes.low <= size <= axes.high:
            raise RecipeError(f"evaluate.latency.shapes.{index}: {size} lies outside the declared dynamic bounds "
                              f"{axes.low}..{axes.high} of model.inputs; widen the bounds or drop the size")
    if not axes.declared:
        # Only PyTorch eager takes another resolution than the one the artifact was exported or compiled at.
        static = [(name, f"produces a {form} artifact") for name, form in forms if form != "torch"]
        if torch_timed_on is not None and any(form == "torch" for _, form in forms):
            static.insert(0, (next(name for name, form in forms if form == "torch"),
                              f"is timed through a throwaway export on {torch_timed_on}"))
        if static:
            name, what = static[0]
            shape = recipe.model.inputs[0].shape
            other = next((s for s in latency.shapes if s != shape[2] or s != shape[3]), None)
            if other is not None:
                # Timing torch stages on PyTorch eager is a way out only when no stage leaves torch.
                eager = (" or time the torch stages on PyTorch eager (evaluate.latency.runtime: native)"
                         if all(form == "torch" for _, form in forms) else "")
                raise RecipeError(
                    f"evaluate.latency.shapes: stage '{name}' {what} with the static input shape {shape}, which "
                    f"cannot take size {other}; declare axes 2 and 3 of model.inputs[0] dynamic "
                    f"(dynamic: {{2: {{name: height, min: {min(latency.shapes)}, max: {max(latency.shapes)}}}, "
                    f"3: {{name: width, min: {min(latency.shapes)}, max: {max(latency.shapes)}}}}}){eager}")
    if latency.shape_batchnorm:
        if recipe.evaluate.accuracy.metric == "agreement":
            raise RecipeError("evaluate.latency.shape_batchnorm: the statistics only change accuracy, which a sweep "
                              "does not score under metric: agreement (it pairs with the baseline's outputs at its "
                              "own size); drop shape_batchnorm")
        if not latency.shape_accuracy:
            raise RecipeError("evaluate.latency.shape_batchnorm: the statistics only change accuracy, which "
                              "shape_accuracy: false leaves unmeasured; drop one of the two")
        if recipe.data.calibration is None:
            raise RecipeError("evaluate.latency.shape_batchnorm: re-estimating BatchNorm statistics at each size "
                              "needs data.calibration; add it")
        if resizable(recipe, calibration=True) is None:
            raise RecipeError("evaluate.latency.shape_batchnorm: needs eval and calibration data the toolkit can "
                              "load at each size (an image data set with 'resize', sweeping the resolution)")
    how = ("accuracy and latency at each size on the eval data loaded at that size"
           if scores_sizes(recipe) else "latency at each size")
    return f"sizes {', '.join(map(str, latency.shapes))} on {axes.describe()}: {how}"


def resizable(recipe: "Recipe", *, calibration: bool = False) -> str | None:
    """The input whose images the eval data (and, with ``calibration``, the calibration data) loads at any size:
    an image data set with ``resize``, the sweep setting that input's height and width. None otherwise."""
    axes = swept_axes(recipe.model.inputs)
    if axes is None or len(axes.axes) != 1:
        return None
    (name, swept), = axes.axes.items()
    if swept != (2, 3):
        return None
    specs = [recipe.data.eval] + ([recipe.data.calibration] if calibration else [])
    if all(getattr(s, "dataset", None) in IMAGE_KINDS and getattr(s, "resize", None) is not None for s in specs):
        return name
    return None


def resized_spec(spec: Any, size: int) -> Any:
    """A data spec that loads images at ``size`` × ``size``: the crop set to the size and the resize scaled with
    it, or, without a crop, the shorter side resized to the size."""
    if spec.crop is not None:
        return spec.model_copy(update={"crop": size, "resize": max(size, round(spec.resize * size / spec.crop))})
    return spec.model_copy(update={"resize": size})


def image_side(before: list["InputSpec"], after: list["InputSpec"]) -> int:
    """The new side of the one square image input whose height and width changed between ``before`` and
    ``after`` (resize.input); RecipeError for any other change of shape."""
    changed = [(b, a) for b, a in zip(before, after) if list(b.shape) != list(a.shape)]
    if (len(before) != len(after) or len(changed) != 1 or len(changed[0][1].shape) != 4
            or list(changed[0][0].shape[:2]) != list(changed[0][1].shape[:2])
            or changed[0][1].shape[2] != changed[0][1].shape[3]):
        raise RecipeError("the inputs changed shape in a way the data cannot follow (only the height and width of "
                          f"one square image input can change): {[s.shape for s in before]} -> "
                          f"{[s.shape for s in after]}")
    return int(changed[0][1].shape[2])


def sized_inputs(inputs: list["InputSpec"], axes: SweptAxes, size: int) -> list["InputSpec"]:
    """The input specs with the swept axes set to ``size``."""
    out = []
    for spec in inputs:
        shape = list(spec.shape)
        for axis in axes.axes.get(spec.name, ()):
            shape[axis] = size
        out.append(spec.model_copy(update={"shape": shape, "dynamic": {}}))
    return out


def fit_arrays(arrays: dict[str, np.ndarray], axes: SweptAxes, size: int) -> dict[str, np.ndarray]:
    """Eval samples fitted to ``size`` on the swept axes, for timing: integer and boolean inputs (token ids,
    masks) cut or padded with zeros; float images resampled (bilinear, antialiased); other float inputs cut or
    padded with zeros."""
    out = {}
    for name, array in arrays.items():
        swept = axes.axes.get(name, ())
        if not swept:
            out[name] = array
        elif array.dtype.kind == "f" and swept == (2, 3) and array.ndim == 4:
            import torch
            import torch.nn.functional as F

            resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(array)), size=(size, size),
                                    mode="bilinear", antialias=True, align_corners=False)
            out[name] = np.ascontiguousarray(resized.numpy())
        else:
            for axis in swept:
                have = array.shape[axis]
                if have >= size:
                    array = np.take(array, np.arange(size), axis=axis)
                else:
                    pad = [(0, 0)] * array.ndim
                    pad[axis] = (0, size - have)
                    array = np.pad(array, pad)
            out[name] = np.ascontiguousarray(array)
    return out


def scores_sizes(recipe: "Recipe") -> bool:
    """Whether the measurement process scores accuracy at each size: the eval data loads at any size and the
    metric needs no baseline outputs (agreement pairs with the baseline's at its own size, which a sweep lacks)."""
    return (recipe.evaluate.latency.shape_accuracy and recipe.evaluate.accuracy.metric != "agreement"
            and resizable(recipe) is not None)


def batchnorm_settings() -> "RecoverBatchNormConfig":
    """How a sweep re-estimates BatchNorm statistics at each size: recover.batchnorm's defaults."""
    from optimizer.passes.recover import RecoverBatchNormConfig

    return RecoverBatchNormConfig()


def write_points(loaded: "LoadedRecipe", data: "DataProvider", folder: Path) -> list[dict[str, Any]]:
    """One .npz per size and what the measurement process needs to know of each.

    Each .npz holds only what that process reads: at a size accuracy is scored at, the eval set loaded at that
    size with its labels and, for BatchNorm re-estimation, the calibration samples it reads; at any other size,
    ``LATENCY_SAMPLES`` eval samples fitted to the size for timing."""
    from optimizer.data.datasets import load_dataset

    recipe = loaded.recipe
    latency = recipe.evaluate.latency
    axes = swept_axes(recipe.model.inputs)
    if not latency.shapes or axes is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    scored = scores_sizes(recipe)
    points = []
    for size in latency.shapes:
        inputs = sized_inputs(list(recipe.model.inputs), axes, size)
        arrays: dict[str, np.ndarray] = {}
        if scored:
            spec = resized_spec(recipe.data.eval, size)
            eval_data = load_dataset(spec, inputs=inputs, base_dir=loaded.base_dir, seed=recipe.seed,
                                     where=f"evaluate.latency.shapes ({size}): data.eval")
            arrays.update(eval_data.inputs, __labels__=eval_data.labels)
            source = f"data.eval loaded at {size}×{size}"
            if latency.shape_batchnorm:
                spec = resized_spec(recipe.data.calibration, size)
                calibration = load_dataset(spec, inputs=inputs, base_dir=loaded.base_dir, seed=recipe.seed,
                                           where=f"evaluate.latency.shapes ({size}): data.calibration")
                # Re-estimation reads the first samples only (recover.batchnorm's budget): no more are stored.
                keep = batchnorm_settings().samples(len(calibration))
                arrays.update({f"__bn__{name}": array[:keep] for name, array in calibration.inputs.items()})
        else:
            eval_data = data.eval()
            arrays.update(fit_arrays(eval_data.batch(0, min(len(eval_data), LATENCY_SAMPLES)), axes, size))
            source = ("eval samples resampled" if resizable(recipe) is not None or not axes.declared
                      else "eval samples cut or padded with zeros") + f" to {size}"
        path = folder / f"size-{size}.npz"
        np.savez(path, **arrays)
        points.append({"size": size, "npz": str(path), "accuracy": scored, "source": source,
                       "shape": {spec.name: spec.shape for spec in inputs}})
    return points


def merge_points(scored: list[dict[str, Any]] | None, timed: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Each size's accuracy from ``scored`` and its latency from ``timed``: the two halves of one process's sweep
    (scored before the timing lock, timed under it), or of a stage measured by two processes (accuracy on the
    torch model, timing on its throwaway export)."""
    by_size = {p["size"]: dict(p) for p in scored or []}
    for point in timed or []:
        merged = by_size.setdefault(point["size"], {})
        for key, value in point.items():
            if key == "error" and merged.get("error"):
                if value != merged["error"]:
                    merged["error"] = f"{merged['error']}; {value}"
            elif key not in ("accuracy", "batchnorm") or key not in merged:
                merged[key] = value
    return [by_size[size] for size in sorted(by_size)]
