"""The documentation cannot drift from the code: the recipe reference is regenerated and compared, links
resolve, the example pass of docs/writing_a_pass.md passes check_pass, and the figures docs/measurement.md
states are the code's."""

from __future__ import annotations

import difflib
import json
import re
import sys
import types
from pathlib import Path

import pytest

import optimizer.registry as registry
from optimizer.docs_gen import COMMAND, render
from optimizer.testing import RULES, check_pass
from tests.conftest import REPO, quickstart_dict

DOCS = REPO / "docs"
EXAMPLE_MARK = "<!-- example: fold_bn"


# ------------------------------------------------------------------------------------ recipe reference


def test_recipe_reference_is_up_to_date() -> None:
    committed = (DOCS / "recipes.md").read_text(encoding="utf-8")
    fresh = render()
    if committed != fresh:
        diff = "\n".join(list(difflib.unified_diff(committed.splitlines(), fresh.splitlines(), "docs/recipes.md",
                                                   "generated", lineterm=""))[:40])
        pytest.fail(f"docs/recipes.md differs from the schemas; regenerate it with `{COMMAND}`:\n{diff}")


def test_recipe_reference_lists_every_field_and_pass() -> None:
    from optimizer.recipe import recipe_json_schema

    text = render()
    schemas = [recipe_json_schema()]
    for name in registry.BUILTIN_PASSES:
        assert f"### `{name}`" in text
        schemas.append(registry.get_pass(name).Config.model_json_schema())
    for schema in schemas:
        for model in [schema, *schema.get("$defs", {}).values()]:
            for field in model.get("properties", {}):
                assert f"| `{field}` |" in text, f"field '{field}' of {model.get('title')} is not in the reference"


def test_recipe_reference_does_not_depend_on_the_environment(monkeypatch) -> None:
    before = render()
    monkeypatch.setenv("FASHION_MNIST_ROOT", "/somewhere/else")
    assert render() == before


def test_recipe_reference_anchors_resolve() -> None:
    text = render()
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, f"link to #{target} has no anchor"


# ------------------------------------------------------------------------------------ links


def _markdown_sources() -> list[tuple[str, Path, str]]:
    """(name, folder links are relative to, markdown text) of README, docs and the notebooks' text cells."""
    sources = [("README.md", REPO, (REPO / "README.md").read_text(encoding="utf-8"))]
    sources += [(f"docs/{p.name}", DOCS, p.read_text(encoding="utf-8")) for p in sorted(DOCS.glob("*.md"))]
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        sources.append((f"notebooks/{notebook.name}", notebook.parent, text))
    return sources


def _links(markdown: str) -> list[str]:
    # Links inside code are examples, not links.
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_relative_links_point_to_existing_files() -> None:
    broken = []
    checked = 0
    for name, folder, text in _markdown_sources():
        for target in _links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = target.split("#", 1)[0].split("?", 1)[0]
            checked += 1
            if not (folder / path).exists():
                broken.append(f"{name}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
    assert checked >= 5  # the pages do link to each other


# ------------------------------------------------------------------------------------ writing_a_pass.md


def _example_source() -> str:
    text = (DOCS / "writing_a_pass.md").read_text(encoding="utf-8")
    match = re.search(re.escape(EXAMPLE_MARK) + r".*?-->\n```python\n(.*?)```", text, flags=re.S)
    assert match, "docs/writing_a_pass.md lost its marked example block"
    return match.group(1)


@pytest.fixture
def example_module(monkeypatch) -> types.ModuleType:
    """The documented example pass, executed as a module of its own; registered only for this test."""
    monkeypatch.setattr(registry, "_registered", {})
    module = types.ModuleType("fold_bn_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(_example_source(), str(DOCS / "writing_a_pass.md"), "exec"), module.__dict__)
    return module


def test_documented_example_pass_keeps_the_contract(example_module, tiny_checkpoint: Path, tmp_path: Path) -> None:
    recipe = quickstart_dict(tiny_checkpoint, eval_samples=128)
    report = check_pass(example_module.FoldBatchNorm, source=recipe, work_dir=tmp_path)
    assert report.ok and report.checked == list(RULES)
    assert registry.get_pass("example.fold_bn") is example_module.FoldBatchNorm
    folded = report.output
    assert folded is not None and folded.meta == {"kind": "program"} and folded.entry == "model.pt2"
    # 9 conv + batch-norm pairs in the example network: each loses the BN's scale and shift, gains a bias.
    assert folded.facts["params"] == 173_842 - (24 * 3 + 48 * 3 + 96 * 3)


def test_notebook_02_defines_the_documented_pass() -> None:
    cells = json.loads((REPO / "notebooks" / "02_custom_pass.ipynb").read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]).strip() for c in cells if c["cell_type"] == "code"]
    assert _example_source().strip() in sources, "notebooks/02_custom_pass.ipynb and docs/writing_a_pass.md differ"


def test_every_contract_rule_is_documented() -> None:
    text = (DOCS / "writing_a_pass.md").read_text(encoding="utf-8")
    missing = [rule for rule in RULES if f"| `{rule}` |" not in text]
    assert not missing, f"rules missing from the table in docs/writing_a_pass.md: {missing}"


# ------------------------------------------------------------------------------------ measurement.md


def test_measurement_doc_states_the_codes_settings() -> None:
    from optimizer.measure.latency import UNSTABLE_RELATIVE_CI, TimingPlan
    from optimizer.recipe import LatencySpec

    text = " ".join((DOCS / "measurement.md").read_text(encoding="utf-8").split())
    quick = TimingPlan.from_spec({"mode": "quick"})
    spec = LatencySpec()

    def number(value: float) -> str:
        return f"{value:g}"

    expected = [
        f"wider than {number(UNSTABLE_RELATIVE_CI * 100)} % of the median",
        f"{number(quick.warmup_s)} s of warm-up",
        f"at least {quick.min_iterations} iterations and {number(quick.min_duration_s)} s",
        f"at most {number(quick.max_duration_s)} s",
        f"`trials` back-to-back blocks (default {spec.trials})",
        f"(default {spec.min_iterations} in all",
        f"(default {number(spec.min_duration_s)} s in all)",
        f"(default {number(spec.max_duration_s)} s)",
        f"(default {number(spec.warmup_s)} s)",
        f"(default {spec.throughput_batch_size};",
    ]
    missing = [phrase for phrase in expected if phrase not in text]
    assert not missing, f"docs/measurement.md no longer states: {missing}"
