"""The recipe: what a user writes, validated before anything runs.

A recipe is YAML, loaded with ``yaml.safe_load`` (a Python tag is an error, never code), checked against
the pydantic models below, and then checked as a whole: pass names resolve, each stage's input form is
the previous stage's output form, files and data exist. Every error names the file, the field path and,
where the YAML gives it, the line; an unknown name gets a "did you mean".
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from optimizer.errors import RecipeError
from optimizer.search.space import SearchSection

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
STAGE_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
RESERVED_STAGE_NAMES = {"baseline", "final"}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------------------------- model


class DynamicAxis(StrictModel):
    """A non-batch input dimension that may vary at run time, within bounds (e.g. a sequence length)."""

    name: str = Field(min_length=1, description="Symbolic name; inputs that share a name share the length "
                                                "(input_ids and attention_mask: 'seq').")
    min: int = Field(ge=1, description="Smallest size the deployed model must accept.")
    max: int = Field(ge=1, description="Largest size the deployed model must accept.")

    @model_validator(mode="after")
    def _ordered(self) -> "DynamicAxis":
        if self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class InputSpec(StrictModel):
    """One model input. The first dimension is the batch and stays dynamic in exported models."""

    name: str = "input"
    shape: list[int] = Field(min_length=1, description="Shape with the batch first, e.g. [1, 1, 28, 28]. For a "
                                                       "dynamic axis, the size used where one fixed shape is needed.")
    dtype: Literal["float32", "float16", "int64", "int32", "uint8", "bool"] = "float32"
    dynamic: dict[int, DynamicAxis] = Field(
        default_factory=dict,
        description="Non-batch axes that vary, by axis index, with bounds, e.g. {1: {name: seq, min: 1, max: 128}}. "
                    "Empty (default): every axis but the batch is fixed.")

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(d <= 0 for d in shape):
            raise ValueError("every dimension must be a positive integer")
        return shape

    @model_validator(mode="after")
    def _dynamic_axes_fit(self) -> "InputSpec":
        for axis, spec in self.dynamic.items():
            if not 1 <= axis < len(self.shape):
                raise ValueError(f"dynamic axis {axis} of input '{self.name}' is not one of its non-batch axes "
                                 f"1..{len(self.shape) - 1} (axis 0, the batch, is always dynamic)")
            if not spec.min <= self.shape[axis] <= spec.max:
                raise ValueError(f"input '{self.name}': shape[{axis}] = {self.shape[axis]} lies outside its dynamic "
                                 f"bounds {spec.min}..{spec.max}")
        return self


class ModelSpec(StrictModel):
    """Where the model comes from: an architecture plus weights, a torch.export program, or ONNX."""

    factory: str | None = Field(
        default=None,
        description="Import path 'module:callable' that builds the architecture, "
        "e.g. 'torchvision.models:resnet18' or 'my_pkg.models:Net'.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    checkpoint: str | None = Field(
        default=None,
        description="Weights: .safetensors, or a .pt/.pth state dict (loaded with weights_only=True); "
        "a whole program from torch.export.save (.pt2); or an .onnx model. Relative to the recipe file.",
    )
    inputs: list[InputSpec] = Field(min_length=1, description="Model inputs, in call order.")

    @model_validator(mode="before")
    @classmethod
    def _single_input(cls, data: Any) -> Any:
        # `input:` (one mapping) is the common case; `inputs:` (a list) serves multi-input models.
        if isinstance(data, dict) and "input" in data:
            if "inputs" in data:
                raise ValueError("give either 'input' or 'inputs', not both")
            data = dict(data)
            data["inputs"] = [data.pop("input")]
        return data

    @model_validator(mode="after")
    def _shared_axes_agree(self) -> "ModelSpec":
        # One symbolic name is one length: its bounds and default size must be the same in every input.
        seen: dict[str, tuple[int, int, int, str]] = {}
        for spec in self.inputs:
            for axis, dyn in spec.dynamic.items():
                mine = (dyn.min, dyn.max, spec.shape[axis], spec.name)
                other = seen.setdefault(dyn.name, mine)
                if other[:3] != mine[:3]:
                    raise ValueError(f"dynamic axis '{dyn.name}' has bounds {other[0]}..{other[1]} (size {other[2]}) "
                                     f"in input '{other[3]}' but {mine[0]}..{mine[1]} (size {mine[2]}) in "
                                     f"'{spec.name}'; a shared name must have the same bounds and size")
        return self

    @field_validator("factory")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
            raise ValueError(f"'{value}' is not an import path 'module:callable'")
        return value

    @property
    def source_kind(self) -> Literal["factory", "program", "onnx"]:
        suffix = Path(self.checkpoint).suffix.lower() if self.checkpoint else ""
        if suffix == ".onnx":
            return "onnx"
        if suffix == ".pt2":
            return "program"
        return "factory"

    @property
    def start_form(self) -> str:
        return "onnx" if self.source_kind == "onnx" else "torch"


# ---------------------------------------------------------------------------------------------- data


class ImageTransform(StrictModel):
    resize: int | None = Field(default=None, ge=1, description="Resize the shorter side to this many pixels.")
    crop: int | None = Field(default=None, ge=1, description="Center-crop to a square of this size.")
    channels: Literal[1, 3] | None = Field(default=None, description="Convert to 1 (gray) or 3 (RGB) channels.")
    mean: list[float] | None = Field(
        default=None, min_length=1, description="Per-channel mean subtracted after scaling to [0, 1]."
    )
    std: list[float] | None = Field(
        default=None, min_length=1, description="Per-channel standard deviation divided by (each greater than 0)."
    )

    @field_validator("std")
    @classmethod
    def _positive_std(cls, values: list[float] | None) -> list[float] | None:
        # A zero would fill the data with inf and NaN, which only the first forward pass would reveal.
        if values is not None and any(not v > 0 for v in values):
            raise ValueError("every standard deviation must be greater than 0")
        return values

    def transforms_images(self) -> bool:
        """Whether any option changes pixel values or image size (a layout change alone does neither)."""
        return any(getattr(self, name) is not None for name in ("resize", "crop", "channels", "mean", "std"))


class _DataCommon(StrictModel):
    samples: int | None = Field(
        default=None, ge=1, description="Use this many samples, drawn with the recipe's seed (default: all)."
    )


class FashionMnistData(_DataCommon, ImageTransform):
    dataset: Literal["fashion-mnist"]
    split: Literal["train", "test"] = "test"
    root: str = Field(
        default_factory=lambda: os.environ.get("FASHION_MNIST_ROOT", DEFAULT_FASHION_MNIST_ROOT),
        description="Folder with the four IDX .gz files (default: $FASHION_MNIST_ROOT, else the folder the "
        "Debian package dataset-fashion-mnist installs).",
    )


class ImageFolderData(_DataCommon, ImageTransform):
    dataset: Literal["image-folder"]
    root: str = Field(description="Folder with one sub-folder of images per class (sorted names = labels).")


class NpzData(_DataCommon, ImageTransform):
    """Arrays saved with numpy.savez. The image options (`resize`, `crop`, `channels`, `mean`, `std`) and
    `layout` apply to the single input of an image model: uint8 pixels are scaled to [0, 1] first, as the
    image data sets do, float arrays are taken as already in [0, 1], and [N, H, W] counts as one channel."""

    dataset: Literal["npz"]
    path: str = Field(description="An .npz file (loaded with allow_pickle=False).")
    inputs: dict[str, str] | str = Field(
        default="x", description="Array key of the input, or a mapping input name -> key for several inputs."
    )
    labels: str = Field(default="y", description="Array key of the integer labels.")
    layout: Literal["nchw", "nhwc"] = Field(
        default="nchw",
        description="Layout of the stored images: 'nhwc' (channels last) is transposed to the NCHW the model takes.",
    )

    @model_validator(mode="after")
    def _image_options_need_one_input(self) -> "NpzData":
        if isinstance(self.inputs, dict) and len(self.inputs) > 1:
            used = [n for n in ("resize", "crop", "channels", "mean", "std") if getattr(self, n) is not None]
            used += ["layout"] if self.layout != "nchw" else []
            if used:
                raise ValueError(f"'{used[0]}' applies to the single input of an image model, and 'inputs' names "
                                 f"{len(self.inputs)}; prepare these arrays before saving them, or drop '{used[0]}'")
        return self


class PythonData(_DataCommon):
    dataset: str = Field(pattern=r"^python:[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


def _dataset_tag(value: Any) -> str | None:
    kind = value.get("dataset") if isinstance(value, dict) else getattr(value, "dataset", None)
    if isinstance(kind, str) and kind.startswith("python:"):
        return "python"
    return kind


DatasetSpec = Annotated[
    Union[
        Annotated[FashionMnistData, Tag("fashion-mnist")],
        Annotated[ImageFolderData, Tag("image-folder")],
        Annotated[NpzData, Tag("npz")],
        Annotated[PythonData, Tag("python")],
    ],
    Discriminator(
        _dataset_tag,
        custom_error_type="unknown_dataset",
        custom_error_message="unknown dataset kind; use fashion-mnist, image-folder, npz or python:module:callable",
    ),
]
DATASET_KINDS = ["fashion-mnist", "image-folder", "npz", "python:module:callable"]


class DataSection(StrictModel):
    eval: DatasetSpec = Field(description="Evaluation data: accuracy of every stage is measured on it.")
    calibration: DatasetSpec | None = Field(default=None, description="Calibration data for quantization.")
    train: DatasetSpec | None = Field(default=None, description="Training data for distillation and fine-tuning.")
    validation: DatasetSpec | None = Field(
        default=None,
        description="Held-out data for choices a pass makes by accuracy (quantize.nncf's accuracy control), so the "
        "eval figure stays unbiased; without it, accuracy control uses calibration samples calibration does not use.",
    )


# -------------------------------------------------------------------------------------------- evaluate


BUILTIN_METRICS = ("top1", "top5", "agreement")
METRIC_PATTERN = r"python:[A-Za-z_][\w.]*:[A-Za-z_][\w.]*"
# Metrics whose per-sample score is right or wrong: their value is a fraction, shown in percent.
FRACTION_METRICS = ("top1", "top5")


class AccuracySpec(StrictModel):
    metric: str = Field(
        default="top1",
        description="What 'accuracy' means: 'top1' or 'top5' (the label is the arg-max, or among the 5 largest "
        "outputs); 'agreement' (similarity to the baseline's outputs on the same sample, no labels needed; see "
        "`agreement`); or 'python:module:function', called as function(outputs, labels) with numpy arrays (the "
        "model's first output for the whole eval set, and the labels) and returning one float per sample.",
    )
    agreement: Literal["top1", "cosine"] | None = Field(
        default=None,
        description="For metric 'agreement': 'top1' (default; the arg-max class matches the baseline's, for "
        "classifiers) or 'cosine' (cosine similarity of each sample's flattened output to the baseline's, for "
        "embeddings).",
    )
    higher_is_better: bool = Field(
        default=True,
        description="For a python: metric: false when a smaller score is better (an error, a loss); the budget "
        "then limits the metric's rise. The built-in metrics are all higher-is-better.",
    )
    batch_size: int = Field(default=256, ge=1, description="Batch size used to run the eval set.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value in BUILTIN_METRICS or re.fullmatch(METRIC_PATTERN, value):
            return value
        hint = suggest(value, BUILTIN_METRICS).removeprefix("; ") if not value.startswith("python:") else ""
        raise ValueError(f"'{value}' is not a metric{f' ({hint})' if hint else ''}; use top1, top5, agreement or "
                         "python:module:function")

    @model_validator(mode="after")
    def _settings_fit_the_metric(self) -> "AccuracySpec":
        # A setting the metric ignores would silently measure something else than the user asked for.
        if self.agreement is not None and self.metric != "agreement":
            raise ValueError(f"'agreement' applies to metric 'agreement', not '{self.metric}'; remove it or set "
                             "metric: agreement")
        if not self.higher_is_better and not self.metric.startswith("python:"):
            raise ValueError(f"'higher_is_better: false' applies to a python: metric; '{self.metric}' is "
                             "higher-is-better by definition")
        return self

    @property
    def is_fraction(self) -> bool:
        """Whether the metric is a share of samples (shown in percent, a budget of 0.01 is one point)."""
        return self.metric in FRACTION_METRICS or (self.metric == "agreement" and self.agreement != "cosine")

    def settings(self) -> dict[str, Any]:
        """What the measurement process needs to score a stage."""
        return {"metric": self.metric, "agreement": self.agreement, "higher_is_better": self.higher_is_better}


class LatencySpec(StrictModel):
    threads: int = Field(default=1, ge=1, description="Threads for every runtime, the same for every stage.")
    batch_size: int = Field(default=1, ge=1, description="Batch size of the single-stream latency measurement.")
    throughput_batch_size: int = Field(default=32, ge=1, description="Batch size of the offline measurement.")
    warmup_s: float = Field(default=1.0, ge=0, description="Warm-up time; at least 10 iterations always run.")
    min_iterations: int = Field(default=1000, ge=10, description="Timed iterations, at least.")
    min_duration_s: float = Field(default=3.0, ge=0, description="Timed seconds, at least.")
    max_duration_s: float = Field(default=60.0, gt=0, description="Stop timing after this long, whatever the count.")
    mode: Literal["full", "quick"] = Field(
        default="full", description="'quick' uses few iterations (for tests); its figures are labelled as such."
    )
    trials: int = Field(
        default=3, ge=1, le=20,
        description="The timed iterations are split into this many back-to-back trials; their medians are "
        "reported, and a spread between them wider than 10 % marks the figure unstable.",
    )
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Batch-size sweep, e.g. [1, 8, 32]: latency and throughput per batch size (empty: no sweep).",
    )
    inputs: Literal["fixed", "eval"] = Field(
        default="fixed",
        description="What the single-stream latency is timed on. 'fixed': one batch of eval samples drawn by seed, "
        "run again and again. 'eval': the eval samples in turn, round-robin in an order drawn by seed, so p50, p90 "
        "and p99 are over the inputs users send (different lengths, different content) rather than over one of "
        "them. The report says which was used.",
    )
    shapes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Input-size sweep, e.g. [96, 128, 160, 224] or [16, 32, 64]: p50 latency (with its interval) of "
        "every stage at each size, each size given to every axis declared in model.inputs[].dynamic (sequence "
        "length, image height and width). Without declared axes, a single 4-D image input's height and width, on "
        "torch stages only (an exported artifact takes other sizes only on declared dynamic axes; a size a stage "
        "cannot take fails validation). An image data set with 'resize' is loaded again at each size, and accuracy "
        "is measured there too (see shape_accuracy). Empty (default): no sweep.",
    )
    shape_accuracy: bool = Field(
        default=True,
        description="With shapes: measure accuracy at each size where the eval data can be loaded at that size (an "
        "image data set with 'resize'). false: latency only, on a few eval samples fitted to each size.",
    )
    shape_batchnorm: bool = Field(
        default=False,
        description="With shapes: re-estimate the BatchNorm statistics of torch stages at each size on "
        "data.calibration loaded at that size (up to 640 samples, as recover.batchnorm does) before measuring "
        "accuracy there; the stage's artifact is not changed. Exported artifacts have their statistics folded in "
        "and keep them.",
    )
    runtime: Literal["native", "deploy", "auto"] = Field(
        default="auto",
        description="Where torch stages are timed. 'native': PyTorch eager. 'deploy': on the runtime of the "
        "recipe's final artifact (onnxruntime for ONNX, OpenVINO with the compile stage's precision hint), through "
        "a throwaway export of the stage in its own precision (FP32); accuracy is still measured on the torch "
        "model. 'auto': deploy when the last stage produces ONNX or OpenVINO, else native.",
    )


class OnnxRuntimeSpec(StrictModel):
    providers: list[Literal["cpu", "cuda", "tensorrt"]] = Field(
        default_factory=lambda: ["cpu"], min_length=1,
        description="Execution providers for ONNX stages, in order of preference (CPU is always the fallback "
        "for unsupported nodes). 'cuda' and 'tensorrt' need onnxruntime-gpu and an NVIDIA GPU; a missing one "
        "is an error, never a silent CPU run.",
    )


class EvaluateSection(StrictModel):
    accuracy: AccuracySpec = Field(default_factory=AccuracySpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    onnxruntime: OnnxRuntimeSpec = Field(default_factory=OnnxRuntimeSpec)
    profile: bool = Field(
        default=False,
        description="Profile every stage on its runtime (PyTorch profiler, onnxruntime profiling, OpenVINO "
        "performance counters): time per operator type and the top operators, in the report.",
    )


class Budget(StrictModel):
    accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        description="Largest allowed drop of the accuracy metric versus the baseline: for top1, top5 and top-1 "
        "agreement a fraction (0.01 = 1 point, at most 1); for cosine agreement and python: metrics in the "
        "metric's own units (a rise, when lower is better).",
    )
    latency_p50_ms: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Largest allowed median single-stream latency in milliseconds (the measured p50 at "
        "evaluate.latency.batch_size). Not a gate on each stage, since the stages before the fast ones are "
        "slower by design: a stage over it is not within budget, so it is never recommended or published under "
        "publish: recommended; a run in which no publishable stage meets it fails its gate (exit 4).",
    )
    latency_p90_ms: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Largest allowed 90th-percentile single-stream latency in milliseconds; judged like "
        "latency_p50_ms.",
    )


# -------------------------------------------------------------------------------------------- stages


class Stage(StrictModel):
    name: str = Field(pattern=STAGE_NAME_PATTERN, description="Unique stage name; its folder in artifacts/.")
    pass_name: str = Field(alias="pass", description="Registered pass name, or 'python:module:Class'.")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="The pass's configuration.")
    budget: Budget | None = Field(default=None, description="Overrides the recipe's budget for this stage.")
    intermediate: bool = Field(
        default=False,
        description="A result that a later stage repairs, such as pruning before distillation: its output may "
        "legitimately collapse to one class, so the constant-prediction gate does not stop the run there (it is "
        "still measured and reported).",
    )

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in RESERVED_STAGE_NAMES:
            raise ValueError(f"'{value}' is reserved; choose another stage name")
        return value


class Recipe(StrictModel):
    name: str = Field(description="A short name for this recipe; shown in the report.")
    description: str | None = None
    seed: int = Field(default=0, description="Seed for data subsets, calibration and measurement inputs.")
    python_path: list[str] = Field(
        default_factory=list,
        description="Folders (relative to the recipe file) put at the front of Python's import path before "
        "anything the recipe names is imported: for its python: passes, data sets and metrics and its model "
        "factory, instead of setting PYTHONPATH. The measurement processes get them too. Code found there runs "
        "with your rights: see the README's Safety section.",
    )
    model: ModelSpec
    data: DataSection
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    budget: Budget = Field(default_factory=Budget)
    publish: Literal["recommended", "last"] = Field(
        default="recommended",
        description="Which stage's artifact goes to final/. 'recommended': the one the report recommends, the "
        "fastest stage within all its budgets (accuracy and latency), where a later stage whose p50 is not "
        "significantly slower wins the tie; the baseline and intermediate stages are never published, and when no "
        "other stage is within its budget nothing is (exit 4, the previous final/ stays). 'last': the last stage, "
        "whenever every stage passed its gates (latency budgets then only inform the report).",
    )
    stages: list[Stage] = Field(min_length=1)
    search: SearchSection | None = Field(
        default=None,
        description="What `optimizer search` may change: optional stages, alternative passes, parameters of any "
        "stage's `with` keys, and the screening data (`optimizer run` ignores it).",
    )

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "Recipe":
        seen: set[str] = set()
        for index, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages.{index}.name: '{stage.name}' is used twice; stage names must be unique")
            seen.add(stage.name)
        return self

    @model_validator(mode="after")
    def _fraction_budgets(self) -> "Recipe":
        # The budget's bound depends on the metric: a share of samples cannot drop by more than all of it.
        accuracy = self.evaluate.accuracy
        if not accuracy.is_fraction:
            return self
        budgets = [("budget", self.budget)] + [(f"stages.{i}.budget", s.budget) for i, s in enumerate(self.stages)]
        for where, budget in budgets:
            if budget is not None and budget.accuracy_drop is not None and budget.accuracy_drop > 1:
                raise ValueError(f"{where}.accuracy_drop: {budget.accuracy_drop:g} is more than all of metric "
                                 f"'{accuracy.metric}', a fraction (0.01 = 1 point); give a value from 0 to 1")
        return self

    def budget_for(self, stage: Stage) -> Budget:
        """The budget a stage is held to: each field the stage's own ``budget:`` sets, else the recipe's."""
        if stage.budget is None:
            return self.budget
        own = stage.budget.model_dump(exclude_none=True)
        return self.budget.model_copy(update=own)


# -------------------------------------------------------------------------------------------- loading


class LoadedRecipe:
    """A validated recipe plus where it came from (paths in it are relative to its folder)."""

    def __init__(self, recipe: Recipe, source: Path | None, raw: dict[str, Any], node: yaml.Node | None = None):
        self.recipe = recipe
        self.source = source
        self.raw = raw
        self.node = node
        """The YAML node tree of the recipe file (None for a mapping, or after --set): it knows line numbers."""

    def line_of(self, loc: tuple[Any, ...]) -> int | None:
        """The line in the recipe file of the field at ``loc`` (e.g. ('model', 'factory')), when known."""
        return _line_of(self.node, loc)

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, path: str | Path) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "optimizer recipe"
    return schema


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is read as YAML (so numbers, lists and booleans work)."""
    if "=" not in text:
        raise RecipeError(f"--set {text}: expected key.path=value, e.g. stages.0.with.opset=17")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text}: the key path is empty or has an empty part")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {text}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return raw
    data = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else [_pair(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            node = _descend(node, part, ".".join(parts[: depth + 1]))
        last = parts[-1]
        if isinstance(node, list):
            index = _list_index(node, last, key)
            node[index] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {'.'.join(parts)}: '{'.'.join(parts[:-1])}' is not a mapping or a list")
    return data


def _pair(text: str) -> tuple[str, Any]:
    parts, value = parse_override(text)
    return ".".join(parts), value


def _descend(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if isinstance(node, dict):
        if part not in node or node[part] is None:
            node[part] = {}
        return node[part]
    raise RecipeError(f"--set {where}: cannot descend into a {type(node).__name__}")


def _list_index(node: list[Any], part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"--set {where}: '{part}' is not an index of a list of {len(node)} items")
    return int(part)


def read_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Read a recipe file with safe_load; also return the node tree, which knows line numbers."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {exc.start}); a recipe is YAML text") from None
    try:
        raw = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise RecipeError(
            f"{path}:{line}: tag not allowed ({exc.problem}); recipes are plain YAML, never code"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with at least 'name', 'model', 'data' and 'stages'")
    return raw, node


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (or of its closest parent that exists)."""
    line = None
    for part in loc:
        if node is None:
            break
        if isinstance(node, yaml.MappingNode):
            found = None
            for key_node, value_node in node.value:
                if key_node.value == str(part):
                    found = (key_node, value_node)
                    break
            if found is None:
                break
            line = found[0].start_mark.line + 1
            node = found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _known_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """All field names and aliases reachable from a pydantic model (for "did you mean")."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        names.add(field.alias or field_name)
        for sub in _models_in(field.annotation):
            names |= _known_names(sub, seen)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    found: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in getattr(annotation, "__args__", ()) or ():
        found.extend(_models_in(arg))
    for meta in getattr(annotation, "__metadata__", ()) or ():
        found.extend(_models_in(meta))
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not annotation:
        found.extend(_models_in(origin))
    return found


def suggest(name: str, candidates: list[str] | set[str]) -> str:
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def format_validation_error(
    exc: ValidationError,
    *,
    where: str,
    node: yaml.Node | None,
    prefix: tuple[Any, ...] = (),
    known: set[str] | None = None,
) -> str:
    """One line for the first error; later ones are counted so the user fixes them in order."""
    # An unknown key is often a misspelled required one: report it first, with its suggestion.
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    # The discriminated union puts the tag into loc ('fashion-mnist'); users never wrote it.
    loc = prefix + tuple(p for p in first["loc"] if p not in ("fashion-mnist", "image-folder", "npz", "python"))
    path = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(node, loc)
    location = f"{where}:{line}" if line else where
    if first["type"] == "extra_forbidden":
        hint = suggest(str(loc[-1]), known or set())
        message = f"unknown key '{loc[-1]}'{hint or '; see `optimizer schema` for the allowed keys'}"
    elif first["type"] == "missing":
        message = "required field is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "unknown_dataset":
            given = first.get("input", {}).get("dataset") if isinstance(first.get("input"), dict) else None
            if isinstance(given, str):
                message = f"unknown dataset kind '{given}'{suggest(given, DATASET_KINDS)}"
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{location}: {path}: {message}{more}"


def load_recipe(
    source: str | Path | dict[str, Any] | Recipe,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    before_imports: Callable[[dict[str, Any], Path], None] | None = None,
) -> LoadedRecipe:
    """Load and validate a recipe from a path, a mapping or a Recipe; apply ``--set`` overrides.

    Validates the schema and every stage's pass configuration; `optimizer.validate` checks the rest.
    ``before_imports(raw, base_dir)`` is called once the schema is valid and before any code the recipe names is
    imported (`optimizer validate` lists that code there).
    """
    from optimizer.registry import get_pass  # the registry imports pass modules; keep this module light

    path: Path | None = None
    node: yaml.Node | None = None
    if isinstance(source, Recipe):
        raw = source.model_dump(by_alias=True, exclude_none=True)
    elif isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        path = Path(source).resolve()
        raw, node = read_yaml(path)
    where = str(path) if path else "recipe"
    raw = apply_overrides(raw, overrides)
    if overrides:
        node = None  # line numbers no longer match the file for overridden values

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(
            format_validation_error(exc, where=where, node=node, known=_known_names(Recipe))
        ) from None

    add_python_path(recipe, path.parent if path else Path.cwd(), where, node)
    if path is not None and recipe.python_path:
        # Recipes rebuilt from this mapping (a search's trials) are loaded without the file: keep the folders
        # the file meant, not folders relative to wherever that happens.
        raw["python_path"] = [str(folder) for folder in python_path_folders(recipe, path.parent)]
    if before_imports is not None:
        before_imports(raw, path.parent if path else Path.cwd())
    for index, stage in enumerate(recipe.stages):
        line = _line_of(node, ("stages", index, "pass"))
        pass_cls = get_pass(stage.pass_name, where=f"{where}{f':{line}' if line else ''}: stages.{index}.pass")
        try:
            config = pass_cls.Config.model_validate(stage.with_)
        except ValidationError as exc:
            raise RecipeError(
                format_validation_error(
                    exc,
                    where=where,
                    node=node,
                    prefix=("stages", index, "with"),
                    known=_known_names(pass_cls.Config),
                )
            ) from None
        stage.with_ = config.model_dump(mode="json")
    if recipe.search is not None:
        from optimizer.search.space import check_space

        check_space(recipe, where=where, node=node)
    return LoadedRecipe(recipe, path, raw, node)


def python_path_folders(recipe: Recipe, base_dir: Path) -> list[Path]:
    """The recipe's python_path folders, resolved against the recipe's folder."""
    return [(base_dir / Path(folder).expanduser()).resolve() for folder in recipe.python_path]


def add_python_path(recipe: Recipe, base_dir: Path, where: str, node: yaml.Node | None) -> None:
    """Put the recipe's python_path folders at the front of sys.path (once each), as PYTHONPATH would, before
    any of its passes, data sets, metrics or factory is imported. A missing folder is a recipe error: it is
    almost always a wrong relative path, and the import error it would cause later names no folder."""
    import importlib
    import sys

    added = False
    for index, folder in enumerate(python_path_folders(recipe, base_dir)):
        if not folder.is_dir():
            line = _line_of(node, ("python_path", index))
            raise RecipeError(f"{where}{f':{line}' if line else ''}: python_path.{index}: folder {folder} does not "
                              "exist; give folders relative to the recipe file")
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
            added = True
    if added:
        importlib.invalidate_caches()  # a folder created after the import system last looked is seen
