"""`dvc.yaml`'s source deps are each stage's import closure, and the check catches any drift."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from stages import _deps

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = (ROOT / "dvc.yaml").read_text()


def test_dvc_yaml_lists_exactly_what_each_stage_imports():
    assert _deps.differences(DVC_YAML, _deps.render(DVC_YAML, num_folds=4)) == []


def test_removing_an_imported_module_from_dvc_yaml_is_caught():
    """The drift the check exists for: `features` runs the CLIP trunk through pipeline/clip/dense.py."""
    assert "pipeline/clip/dense.py" in _deps.source_deps("stages.features")
    stale = re.sub(r"(  features:.*?)      - pipeline/clip/dense\.py\n", r"\1", DVC_YAML, count=1, flags=re.S)
    assert stale != DVC_YAML
    problems = _deps.differences(stale, _deps.render(stale, num_folds=4))
    assert problems == ["dvc.yaml: stage 'features' misses pipeline/clip/dense.py"]


def test_a_folder_or_unused_module_in_the_deps_is_caught():
    line = "      - stages/split.py\n"
    extra = DVC_YAML.replace(line, line + "      - pipeline/report\n", 1)
    problems = _deps.differences(extra, _deps.render(extra, num_folds=4))
    assert problems == ["dvc.yaml: stage 'split' lists pipeline/report, which it does not import"]


def test_the_fold_matrix_follows_split_num_folds():
    wanted = yaml.safe_load(_deps.render(DVC_YAML, num_folds=5))["stages"]
    assert wanted["train"]["matrix"]["fold"] == [0, 1, 2, 3, 4]
    assert wanted["evaluate"]["matrix"]["fold"] == [0, 1, 2, 3, 4]
    problems = _deps.differences(DVC_YAML, _deps.render(DVC_YAML, num_folds=5))
    change = "matrix {'fold': [0, 1, 2, 3]} should be {'fold': [0, 1, 2, 3, 4]}"
    assert problems == [f"dvc.yaml: stage {s!r} {change}" for s in ("train", "evaluate")]


def test_the_closure_follows_function_local_and_from_package_imports(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "sub").mkdir(parents=True)
    (tmp_path / "stages" / "__init__.py").write_text('"""Docstring only: not a dep."""\n')
    (tmp_path / "pipeline" / "__init__.py").write_text("import os\n")  # code: a dep
    (tmp_path / "pipeline" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "sub" / "a.py").write_text("def f():\n    import pipeline.sub.b\n")
    (tmp_path / "pipeline" / "sub" / "b.py").write_text("")
    (tmp_path / "pipeline" / "c.py").write_text("")
    (tmp_path / "stages" / "s.py").write_text("from pipeline.sub import a\nfrom pipeline import c\n"
                                              "import numpy\n")
    assert _deps.source_deps("stages.s", tmp_path) == [
        "pipeline/__init__.py", "pipeline/c.py", "pipeline/sub/a.py", "pipeline/sub/b.py", "stages/s.py"]


def test_no_stage_imports_another_stage():
    for stage in sorted((ROOT / "stages").glob("*.py")):
        imported = _deps.imported_modules(stage)
        others = {m for m in imported if m.startswith("stages.") and m != "stages._common"}
        assert not others, f"{stage.name} imports {others}"


def test_check_exits_nonzero_with_one_line_per_problem(tmp_path):
    stale = tmp_path / "dvc.yaml"
    stale.write_text(DVC_YAML.replace("      - pipeline/core/params.py\n", "", 1))
    done = subprocess.run([sys.executable, "-m", "stages._deps", "--check", "--dvc-yaml", str(stale),
                           "--params", str(ROOT / "params.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines()[0] == "dvc.yaml: stage 'prepare' misses pipeline/core/params.py"


def test_the_library_has_no_import_cycles():
    """Module imports (function-local ones included) of pipeline/ form a DAG."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "pipeline").rglob("*.py")}
    graph = {m: {i for i in _deps.imported_modules(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, module, nxt])
            if nxt not in state:
                visit(nxt, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_stages_holds_only_the_dvc_stages():
    """Everything under stages/ is a module dvc.yaml runs, or one of the helpers they share or the
    Makefile runs around them (the Prefect server, the remote check, the DVC repair)."""
    run = {module.split(".")[1] for module in _deps.stage_modules(DVC_YAML).values()}
    here = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert here - run == {"_common", "_deps", "_prefect_server", "_remote", "_repair"}
