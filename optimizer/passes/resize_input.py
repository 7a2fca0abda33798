"""resize.input: serve a convolutional network at another input resolution.

Input size is one of the factors that set latency: MobileNetV2 on Fashion-MNIST costs about 4.5 times less at
96×96 than at 224×224 (benchmarks/mobilenet_resolution.py), at a price in accuracy this stage measures. The
weights stay as they are (every convolution and a global pooling take any size); what changes is the shape
of the artifact's image input, and with it the data every later stage sees: the eval, calibration and
training images are loaded again at the new size from the source images (the data set's ``resize``), so
accuracy at the new resolution is measured on properly resampled images, not on rescaled tensors. Because it
is a stage, the baseline stays at the recipe's own size and the accuracy budget counts from there; and
``size`` is a stage setting, so ``optimizer search`` can choose the resolution like any other parameter
(``optional: true`` lets it keep the original size).

Re-estimating BatchNorm statistics at the new size is ``recover.batchnorm`` placed after this stage (it then
reads the calibration images at the new size). On the MobileNetV2 example it lowers accuracy at every size
(README, "Input resolution"), so it is not done here.
"""

from __future__ import annotations

import shutil
from typing import Any

from pydantic import Field

from optimizer.artifact import Artifact
from optimizer.errors import StageError
from optimizer.passes.base import Pass, PassConfig, PassContext
from optimizer.recipe import InputSpec


class ResizeInputConfig(PassConfig):
    size: int = Field(ge=8, le=4096, description="The new height and width of the square image input, in pixels. "
                      "Needs eval (and calibration/train, where later stages read them) data sets with 'resize'.")


def image_input(inputs: list[InputSpec]) -> InputSpec:
    """The one square image input (batch, channels, height, width) the stage resizes; ValueError otherwise."""
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or not inputs[0].dtype.startswith("float"):
        raise ValueError("resize.input needs a model with one float image input of shape [batch, channels, height, "
                         f"width]; this one takes {[(s.name, s.shape, s.dtype) for s in inputs]}")
    spec = inputs[0]
    if spec.shape[2] != spec.shape[3]:
        raise ValueError(f"resize.input serves square images; input '{spec.name}' is {spec.shape[2]}×{spec.shape[3]}")
    if spec.dynamic:
        raise ValueError(f"resize.input: input '{spec.name}' declares dynamic axes; the resolution is then chosen per "
                         "call, drop the stage or the dynamic axes")
    return spec


class ResizeInput(Pass):
    name = "resize.input"
    summary = "Serve the model at another square input resolution; later stages see the data at that size."
    input_forms = ("torch",)
    output_form = "torch"
    needs = ("eval",)
    Config = ResizeInputConfig

    def check_inputs(self, inputs: list[InputSpec]) -> None:
        """Called by validation with the model's inputs: a model without one square image input fails first."""
        image_input(inputs)

    def check_data(self, data: Any) -> None:
        """Called by validation with the recipe's data: every split given must be loadable at another size."""
        from optimizer.measure.shape_sweep import IMAGE_KINDS

        for split in ("eval", "calibration", "train", "validation"):
            spec = getattr(data, split, None)
            if spec is not None and (getattr(spec, "dataset", None) not in IMAGE_KINDS
                                     or getattr(spec, "resize", None) is None):
                raise ValueError(f"resize.input loads data.{split} again at {self.config.size}×"  # type: ignore[attr-defined]
                                 f"{self.config.size} and can only do so for image data sets with 'resize' "  # type: ignore[attr-defined]
                                 f"({', '.join(IMAGE_KINDS)}); add resize to data.{split}")

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        import torch

        from optimizer.measure.complexity import count_macs
        from optimizer.runtimes.torch_eager import load_torch_module

        cfg: ResizeInputConfig = self.config  # type: ignore[assignment]
        stage = f"stage '{ctx.stage}'"
        try:
            spec = image_input(list(artifact.inputs))
        except ValueError as exc:
            raise StageError(f"{stage}: {exc}") from None
        if artifact.meta.get("kind") != "factory":
            raise StageError(f"{stage}: resize.input needs a torch model built from a factory (an exported program "
                             "is traced at one input size); put the stage before the ones that export it")
        resized = spec.model_copy(update={"shape": [*spec.shape[:2], cfg.size, cfg.size]})
        inputs = [resized if s.name == spec.name else s for s in artifact.inputs]

        # The images at the new size, one small batch: the model must take them (a flatten into a fixed-size
        # Linear does not) before any later stage spends time on it.
        ctx.progress.update(f"checking the model at {cfg.size}×{cfg.size}")
        module = load_torch_module(artifact)
        sample = ctx.data.at_inputs(inputs).eval().batch(0, 2)[spec.name]
        try:
            with torch.no_grad():
                module(torch.from_numpy(sample))
        except Exception as exc:  # whatever the model's own layers raise at a size they cannot take
            raise StageError(f"{stage}: the model does not take {cfg.size}×{cfg.size} images ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); choose a size it takes") from None

        # Same weights and structure: the files are copied as they are.
        for name in artifact.files or [artifact.entry]:
            target = ctx.work_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(artifact.path / name, target)
        result = self.new_artifact(artifact, ctx, entry=artifact.entry, meta=dict(artifact.meta),
                                   facts={"macs": count_macs(module, inputs)})
        result.inputs = inputs
        ctx.details["resize"] = {"input": spec.name, "from": list(spec.shape[2:]), "to": [cfg.size, cfg.size]}
        return result
