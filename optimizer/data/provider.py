"""Loads the recipe's data splits once, on first use, checked against the model's inputs."""

from __future__ import annotations

from typing import Literal

from optimizer.data.datasets import ArrayData, load_dataset
from optimizer.errors import RecipeError
from optimizer.recipe import InputSpec, LoadedRecipe

Split = Literal["eval", "calibration", "train", "validation"]


class DataProvider:
    def __init__(self, loaded: LoadedRecipe, inputs: list[InputSpec]):
        self._loaded = loaded
        self._inputs = inputs
        self._cache: dict[str, ArrayData] = {}

    def has(self, split: Split) -> bool:
        return getattr(self._loaded.recipe.data, split) is not None

    def get(self, split: Split) -> ArrayData:
        if split not in self._cache:
            spec = getattr(self._loaded.recipe.data, split)
            if spec is None:
                raise RecipeError(f"data.{split}: this recipe needs a '{split}' data set; add data.{split}")
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
