"""Loads the recipe's data splits once, on first use, checked against the model's inputs."""

from __future__ import annotations

from typing import Literal

from optimizer.data.datasets import ArrayData, load_dataset
from optimizer.errors import RecipeError
from optimizer.recipe import InputSpec, LoadedRecipe

Split = Literal["eval", "calibration", "train", "validation"]


class DataProvider:
    def __init__(self, loaded: LoadedRecipe, inputs: list[InputSpec], *, side: int | None = None):
        self._loaded = loaded
        self._inputs = inputs
        self._side = side
        """Images loaded at side × side instead of the recipe's size (an artifact served at another resolution)."""
        self._cache: dict[str, ArrayData] = {}
        self._at: dict[tuple[tuple[int, ...], ...], DataProvider] = {}

    def at_inputs(self, inputs: list[InputSpec]) -> "DataProvider":
        """The data as an artifact with these ``inputs`` takes it: this provider when their shapes are the ones it
        loads for; else (an input resolution changed by resize.input) the same splits with the images loaded
        again at the new height and width, properly resampled from the source images."""
        shapes = tuple(tuple(spec.shape) for spec in inputs)
        if shapes == tuple(tuple(spec.shape) for spec in self._inputs):
            return self
        if shapes not in self._at:
            from optimizer.measure.shape_sweep import image_side

            side = image_side(self._inputs, inputs)
            self._at[shapes] = DataProvider(self._loaded, list(inputs), side=side)
        return self._at[shapes]

    def has(self, split: Split) -> bool:
        return getattr(self._loaded.recipe.data, split) is not None

    def get(self, split: Split) -> ArrayData:
        if split not in self._cache:
            spec = getattr(self._loaded.recipe.data, split)
            if spec is None:
                raise RecipeError(f"data.{split}: this recipe needs a '{split}' data set; add data.{split}")
            if self._side is not None:
                from optimizer.measure.shape_sweep import IMAGE_KINDS, resized_spec

                if getattr(spec, "dataset", None) not in IMAGE_KINDS or getattr(spec, "resize", None) is None:
                    raise RecipeError(f"data.{split}: a stage serves the model at {self._side}×{self._side}, but only "
                                      f"image data sets with 'resize' ({', '.join(IMAGE_KINDS)}) can be loaded at "
                                      f"another size; add resize to data.{split} or drop the resize.input stage")
                spec = resized_spec(spec, self._side)
            self._cache[split] = load_dataset(
                spec,
                inputs=self._inputs,
                base_dir=self._loaded.base_dir,
                seed=self._loaded.recipe.seed,
                where=f"data.{split} ({spec.dataset})",
            )
        return self._cache[split]

    def eval(self) -> ArrayData:
        return self.get("eval")

    def calibration(self) -> ArrayData:
        return self.get("calibration")

    def train(self) -> ArrayData:
        return self.get("train")

    def validation(self) -> ArrayData:
        return self.get("validation")


class ProviderView:
    """A stand-in for a DataProvider whose split accessors all go through its own ``get``, so a wrapper that
    watches or records reads overrides that one method; everything else is the provider's."""

    def __init__(self, provider: DataProvider):
        self._provider = provider

    def get(self, split: str) -> ArrayData:
        return self._provider.get(split)  # type: ignore[arg-type]

    def eval(self) -> ArrayData:
        return self.get("eval")

    def calibration(self) -> ArrayData:
        return self.get("calibration")

    def train(self) -> ArrayData:
        return self.get("train")

    def validation(self) -> ArrayData:
        return self.get("validation")

    def __getattr__(self, name: str):
        return getattr(self._provider, name)
