"""`dvc.yaml` source dependencies derived from the code, so that they cannot drift.

Each DVC stage runs ``python -m stages.<name>``; the Python files it depends on are the import
closure of ``stages/<name>.py`` within this repository (every ``import`` and ``from ... import``
anywhere in a file, function-local ones included, and the package ``__init__.py`` files that
hold code). The fold matrix of ``train`` and ``evaluate`` is ``range(split.num_folds)``.

``python -m stages._deps`` rewrites ``dvc.yaml`` in place (only the source lines of each
stage's ``deps`` and the fold matrices; data deps, params, outputs and comments are kept);
``--check`` changes nothing and exits 1, naming each stage and module, when ``dvc.yaml`` is out
of date. ``make repro`` runs it first; the test suite runs ``--check``.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

from pipeline.core.errors import PipelineError
from pipeline.core.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
SOURCE = re.compile(r"^\s+- (?:pipeline|stages)/\S*\s*$")  # a source dep: a file or folder of ours
MATRIX = re.compile(r"^(\s+fold: )\[[\d, ]*\](.*)$")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module ``name`` (``pipeline.priors.store``) in ``root``, if it is ours."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Names of this repository's modules that ``path`` imports (at any depth of its code)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.priors import store` imports the submodule `store`
            names = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}", root)
                     else node.module for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES and module_file(n, root))
    return found


def _has_code(init: Path) -> bool:
    """A package initialiser that does more than carry a docstring."""
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def source_deps(stage_module: str, root: Path = ROOT) -> list[str]:
    """Sorted repository-relative files that ``python -m <stage_module>`` imports."""
    seen: set[str] = set()
    todo = [stage_module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        todo.extend(imported_modules(module_file(name, root), root))
    files = {module_file(n, root) for n in seen}
    return sorted(str(f.relative_to(root)) for f in files if f.name != "__init__.py" or _has_code(f))


def stage_modules(dvc_yaml: str) -> dict[str, str]:
    """DVC stage name -> the ``stages.<name>`` module its command runs."""
    stages = yaml.safe_load(dvc_yaml)["stages"]
    found = {}
    for name, spec in stages.items():
        match = re.search(r"python -m (stages\.\w+)", spec["cmd"])
        if match:
            found[name] = match.group(1)
    return found


def render(dvc_yaml: str, num_folds: int, root: Path = ROOT) -> str:
    """``dvc_yaml`` with every stage's source deps and fold matrix derived from the code and params."""
    modules = stage_modules(dvc_yaml)
    lines, out = dvc_yaml.splitlines(keepends=True), []
    stage, in_deps = None, False
    for line in lines:
        header = re.match(r"^  (\w+):\s*$", line)
        if header:
            stage, in_deps = header.group(1), False
        if stage in modules and re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            out.extend(f"      - {f}\n" for f in source_deps(modules[stage], root))
            continue
        if in_deps and not line.startswith("      "):
            in_deps = False
        if in_deps and SOURCE.match(line):
            continue  # replaced by the derived list above
        matrix = MATRIX.match(line)
        if matrix:
            line = f"{matrix.group(1)}{list(range(num_folds))}{matrix.group(2)}\n"
        out.append(line)
    return "".join(out)


def differences(current: str, wanted: str) -> list[str]:
    """One line per stage whose deps or matrix differ: what is missing and what is extra."""
    def per_stage(text: str) -> dict[str, tuple[set[str], object]]:
        stages = yaml.safe_load(text)["stages"]
        return {name: ({d for d in spec.get("deps", []) if re.match(r"(pipeline|stages)/", d)},
                       spec.get("matrix")) for name, spec in stages.items()}

    have, want = per_stage(current), per_stage(wanted)
    problems = []
    for name, (deps, matrix) in want.items():
        missing, extra = sorted(deps - have[name][0]), sorted(have[name][0] - deps)
        if missing:
            problems.append(f"dvc.yaml: stage {name!r} misses {', '.join(missing)}")
        if extra:
            problems.append(f"dvc.yaml: stage {name!r} lists {', '.join(extra)}, which it does not import")
        if matrix != have[name][1]:
            problems.append(f"dvc.yaml: stage {name!r} matrix {have[name][1]} should be {matrix}")
    if not problems and current != wanted:
        problems.append("dvc.yaml: source deps are not in the derived order")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages._deps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if dvc.yaml is stale")
    parser.add_argument("--dvc-yaml", default=str(ROOT / "dvc.yaml"))
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = parser.parse_args(argv)
    path = Path(args.dvc_yaml)
    try:
        num_folds = load_params(args.params).split.num_folds
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    current = path.read_text()
    wanted = render(current, num_folds)
    if args.check:
        problems = differences(current, wanted)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `make dvc-deps` (python -m stages._deps) to update dvc.yaml", file=sys.stderr)
        return 1 if problems else 0
    if wanted != current:
        path.write_text(wanted)
        print(f"{path}: source deps and fold matrices updated from the code and params")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
