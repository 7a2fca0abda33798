"""Everything that can be checked about a recipe without running it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import InputRejected, RecipeError
from optimizer.recipe import (
    FashionMnistData,
    ImageFolderData,
    LoadedRecipe,
    NpzData,
    PythonData,
)
from optimizer.registry import get_pass


@dataclass
class Check:
    what: str
    detail: str


def _data_root(spec, base: Path) -> Path | None:
    raw = getattr(spec, "root", None) or getattr(spec, "path", None)
    if raw is None:
        return None
    p = Path(raw).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def check_data_reachable(loaded: LoadedRecipe, split: str) -> str:
    from optimizer.data.idx import fashion_mnist_files
    from optimizer.registry import import_object

    spec = getattr(loaded.recipe.data, split)
    where = f"data.{split}"
    root = _data_root(spec, loaded.base_dir)
    if isinstance(spec, FashionMnistData):
        try:
            fashion_mnist_files(root, spec.split)
        except InputRejected as exc:
            raise RecipeError(f"{where}: {exc}") from None
        return f"fashion-mnist {spec.split} at {root}"
    if isinstance(spec, ImageFolderData):
        if not root.is_dir():
            raise RecipeError(f"{where}.root: folder {root} does not exist")
        return f"image folder {root}"
    if isinstance(spec, NpzData):
        if not root.is_file():
            raise RecipeError(f"{where}.path: file {root} does not exist")
        return f"npz {root}"
    if isinstance(spec, PythonData):
        if not callable(import_object(spec.dataset.removeprefix("python:"), where=f"{where}.dataset")):
            raise RecipeError(f"{where}.dataset: {spec.dataset} is not callable")
        return spec.dataset
    raise RecipeError(f"{where}: unsupported dataset")  # pragma: no cover


# The field a check's message starts with ('model.factory: ...', 'stages.1 (int8): ...'), for its line number.
_FIELD = re.compile(r"^((?:model|data|evaluate|budget|stages|python_path|publish|search)(?:\.[A-Za-z0-9_]+)*)[: ]")


def validate_recipe(loaded: LoadedRecipe, *, out: Path | None = None) -> list[Check]:
    """Raise RecipeError on the first problem (naming the recipe file and, where the message names a field, its
    line, as schema errors do); return what was checked otherwise."""
    try:
        return _validate(loaded, out)
    except RecipeError as exc:
        message = str(exc)
        if loaded.source is not None and not message.startswith(str(loaded.source)):
            field = _FIELD.match(message)
            line = None
            if field is not None:
                line = loaded.line_of(tuple(int(p) if p.isdigit() else p for p in field.group(1).split(".")))
            raise RecipeError(f"{loaded.source}{f':{line}' if line else ''}: {message}") from None
        raise


def _validate(loaded: LoadedRecipe, out: Path | None) -> list[Check]:
    recipe = loaded.recipe
    checks = [Check("schema", f"recipe '{recipe.name}', {len(recipe.stages)} stages")]
    model = recipe.model

    # The model source.
    if model.checkpoint is not None:
        checkpoint = loaded.resolve(model.checkpoint)
        if not checkpoint.is_file():
            raise RecipeError(f"model.checkpoint: {checkpoint} not found; train or copy it there, or pass --checkpoint")
        checks.append(Check("checkpoint", str(checkpoint)))
    if model.source_kind == "factory":
        if model.factory is None:
            raise RecipeError("model.factory: needed to build the architecture for a state-dict checkpoint")
        from optimizer.registry import import_object

        if not callable(import_object(model.factory, where="model.factory")):
            raise RecipeError(f"model.factory: '{model.factory}' is not callable")
        checks.append(Check("factory", model.factory))
        limit = check_position_limit(model)
        if limit is not None:
            checks.append(Check("dynamic axes", limit))
    elif model.factory is not None:
        raise RecipeError(f"model.factory: not used with a {model.source_kind} checkpoint; remove it")

    # A python: metric is called in every stage's measurement: a wrong name must fail here, before any stage runs.
    metric = recipe.evaluate.accuracy.metric
    if metric.startswith("python:"):
        from optimizer.registry import import_object

        if not callable(import_object(metric.removeprefix("python:"), where="evaluate.accuracy.metric")):
            raise RecipeError(f"evaluate.accuracy.metric: '{metric}' is not callable; name a function(outputs, labels)")
        checks.append(Check("metric", metric))

    # Forms chain, and data each pass needs exists.
    form = model.start_form
    chain = [form]
    needs: set[str] = {"eval"}
    for index, stage in enumerate(recipe.stages):
        pass_cls = get_pass(stage.pass_name, where=f"stages.{index}.pass")
        if form not in pass_cls.input_forms:
            raise RecipeError(
                f"stages.{index} ({stage.name}): pass '{pass_cls.name}' takes {'/'.join(pass_cls.input_forms)} "
                f"but receives {form} from {'the model' if index == 0 else recipe.stages[index - 1].name}; "
                "reorder the stages or add a conversion stage"
            )
        instance = pass_cls(pass_cls.Config.model_validate(stage.with_))
        earlier = {"baseline": chain[0], **{s.name: chain[i + 1] for i, s in enumerate(recipe.stages[:index])}}
        for ref in instance.stage_references():
            if ref not in earlier:
                raise RecipeError(f"stages.{index} ({stage.name}): '@{ref}' must name 'baseline' or an earlier stage "
                                  f"(earlier: {', '.join(earlier)})")
            if earlier[ref] != "torch":
                raise RecipeError(f"stages.{index} ({stage.name}): '@{ref}' is a {earlier[ref]} model; "
                                  "this pass needs a torch stage")
        # A pass may check its settings against the model's inputs (compile.openvino's shape buckets).
        check_inputs = getattr(instance, "check_inputs", None)
        if callable(check_inputs):
            try:
                check_inputs(list(model.inputs))
            except ValueError as exc:
                raise RecipeError(f"stages.{index} ({stage.name}): {exc}") from None
        # And against the recipe's data (resize.input: data it can load at another size).
        check_data = getattr(instance, "check_data", None)
        if callable(check_data):
            try:
                check_data(recipe.data)
            except ValueError as exc:
                raise RecipeError(f"stages.{index} ({stage.name}): {exc}") from None
        form = pass_cls.output_form_for(form)
        chain.append(form)
        for need in instance.required_data():
            if getattr(recipe.data, need) is None:
                raise RecipeError(f"stages.{index} ({stage.name}): pass '{pass_cls.name}' needs data.{need}; add it")
            needs.add(need)
    # No pass requires data.validation (accuracy control falls back to held-out calibration samples), so it is
    # checked whenever the recipe gives it: a wrong path must fail here, not halfway through a run.
    if recipe.data.validation is not None:
        needs.add("validation")
    checks.append(Check("forms", " -> ".join(chain)))
    checks.append(Check("latency runtime", _latency_runtime(loaded)))
    sweep = _shape_sweep(loaded, chain)
    if sweep is not None:
        checks.append(Check("shape sweep", sweep))

    for split in sorted(needs):
        checks.append(Check(f"data.{split}", check_data_reachable(loaded, split)))

    if out is not None:
        out = out.resolve()
        inputs = [loaded.resolve(model.checkpoint)] if model.checkpoint else []
        for split in needs:
            root = _data_root(getattr(recipe.data, split), loaded.base_dir)
            if root is not None:
                inputs.append(root)
        for source in inputs:
            if out == source or source in out.parents:
                raise RecipeError(f"--out {out}: the output folder is inside the input {source}; choose another")
            if out in source.parents:
                raise RecipeError(
                    f"--out {out}: the input {source} lies inside the output folder, which a run replaces; "
                    "copy the input elsewhere or choose another output folder"
                )
        checks.append(Check("output", str(out)))
    return checks


def position_limit(module: Any) -> tuple[int, str] | None:
    """The longest sequence a model's position table holds, and where it was read: a ``max_positions`` attribute
    of the model, or a Hugging Face config's ``max_position_embeddings`` (the smallest one found)."""
    found: list[tuple[int, str]] = []
    own = getattr(module, "max_positions", None)
    if isinstance(own, int):
        found.append((own, "max_positions"))
    for name, sub in module.named_modules():
        value = getattr(getattr(sub, "config", None), "max_position_embeddings", None)
        if isinstance(value, int):
            found.append((value, f"{name + '.' if name else ''}config.max_position_embeddings"))
    return min(found) if found else None


def check_position_limit(model: Any) -> str | None:
    """A dynamic axis of a token input (integer dtype) may not go past the model's position table: the exported
    graph would index beyond it. Builds the architecture (no weights), only when such an axis is declared."""
    token_axes = [(i, spec, axis, dyn) for i, spec in enumerate(model.inputs) for axis, dyn in spec.dynamic.items()
                  if not spec.dtype.startswith("float")]
    if not token_axes:
        return None
    from optimizer.models import build_architecture

    limit = position_limit(build_architecture(model.factory, dict(model.kwargs)))
    if limit is None:
        return f"{len(token_axes)} dynamic token axes; the model declares no position table"
    size, where = limit
    for i, spec, axis, dyn in token_axes:
        if dyn.max > size:
            raise RecipeError(f"model.inputs.{i}.dynamic.{axis}.max: {dyn.max} is beyond the model's position table "
                              f"of {size} positions ({where}); lower '{dyn.name}' max to {size} or less")
    return f"within the position table of {size} ({where})"


def validate_path(path: str | Path, overrides: list[str] | None = None) -> list[Check]:
    from optimizer.recipe import load_recipe

    return validate_recipe(load_recipe(path, overrides))


def _shape_sweep(loaded: LoadedRecipe, chain: list[str]) -> str | None:
    """evaluate.latency.shapes against the stages: a size a stage's artifact cannot take fails here (exit 2)."""
    from optimizer.measure.deploy_timing import deploy_timing
    from optimizer.measure.shape_sweep import check_shapes

    recipe = loaded.recipe
    timing = deploy_timing(recipe)
    forms = list(zip(["baseline"] + [stage.name for stage in recipe.stages], chain))
    return check_shapes(recipe, forms, timing.describe() if timing is not None else None)


def _latency_runtime(loaded: LoadedRecipe) -> str:
    """Where torch stages will be timed (evaluate.latency.runtime resolved); a RecipeError for 'deploy' on a recipe
    that ends on no runtime a throwaway export reaches."""
    from optimizer.measure.deploy_timing import deploy_timing

    recipe = loaded.recipe
    timing = deploy_timing(recipe)
    if timing is None:
        return f"{recipe.evaluate.latency.runtime}: torch stages timed on PyTorch eager"
    return (f"{recipe.evaluate.latency.runtime}: torch stages timed on {timing.describe()} through a throwaway "
            f"{timing.export['exporter']} export (opset {timing.export['opset']}), in their own precision")


# ------------------------------------------------------------------------------------- code a recipe imports


@dataclass
class CodeImport:
    """A module a recipe makes this process import: it runs with the user's rights."""

    module: str
    where: str
    """The recipe field that names it (model.factory, stages.0.pass, data.eval.dataset, ...)."""
    origin: str
    """Where it comes from: this package, a python_path folder, an installed package's file, or 'not found'."""


def recipe_imports(raw: dict[str, Any], base_dir: Path) -> list[CodeImport]:
    """Every module the recipe ``raw`` names for import (factories, passes, python: data sets and metrics, in any
    section), found without importing anything: nothing of it has run when this returns."""
    listed = raw.get("python_path")
    folders = [(base_dir / Path(f).expanduser()).resolve() for f in (listed if isinstance(listed, list) else [])
               if isinstance(f, str) and f]
    found: list[CodeImport] = []
    for where, module, kind in _named_code(raw, ()):
        found.append(CodeImport(module, where, kind or _origin(module, folders)))
    return found


def _named_code(value: Any, loc: tuple[str, ...]):
    """(field, module, origin or None) for each import the recipe names, in file order."""
    where = ".".join(loc)
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _named_code(item, (*loc, str(key)))
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from _named_code(item, (*loc, str(index)))
        return
    if not isinstance(value, str) or not loc:
        return
    if value.startswith("python:"):
        module = value.removeprefix("python:").partition(":")[0]
        if module:
            yield where, module, None
    elif loc[-1] == "factory" and ":" in value:
        yield where, value.partition(":")[0], None
    elif loc[-1] == "pass":
        yield from _pass_module(where, value)


def _pass_module(where: str, name: str):
    from importlib import metadata

    from optimizer.registry import BUILTIN_PASSES, ENTRY_POINT_GROUP, _registered

    if name in BUILTIN_PASSES:
        yield where, BUILTIN_PASSES[name].partition(":")[0], "built-in pass"
    elif name in _registered:
        yield where, _registered[name].__module__, "registered in this process"
    else:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == name:
                dist = getattr(entry, "dist", None)
                package = f"package {dist.name} {dist.version}" if dist is not None else "an installed package"
                yield where, entry.value.partition(":")[0], f"entry point of {package}"
                return


def _origin(module: str, folders: list[Path]) -> str:
    """Where the top-level package of ``module`` would be imported from, found the way import would look
    (python_path folders first, then sys.path) but without running it."""
    import sys
    from importlib.machinery import PathFinder

    top = module.partition(".")[0]
    if top == "optimizer":
        return "this package"
    if top in sys.builtin_module_names:
        return "built into Python"
    try:
        spec = PathFinder.find_spec(top, [str(f) for f in folders] + [p for p in sys.path if p])
    except (ImportError, ValueError, OSError):  # a name no import could take; loading the recipe reports it
        spec = None
    if spec is None:
        return "not found"
    location = spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]
    if any(Path(location).is_relative_to(folder) for folder in folders):
        return f"python_path: {location}"
    return str(location)
