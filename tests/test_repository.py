"""Guards on the repository's layout (static: nothing here runs a kernel).

* The op layer stays below the rest: no module in ``drp_kernels/ops/`` imports the package root
  (``from .. import x``, ``import drp_kernels``) or ``drp_kernels._backend``.
* The training layer uses the library's public API only: every import from ``drp_kernels`` in
  ``python/drp_train`` names a module without a private (``_``) part, each imported name is in that
  module's ``__all__``, and so is every attribute read through such a module.
* Committed results carry no absolute path: every string in every file below ``results/`` (JSON,
  JSON lines, text, and the plain data of the checkpoints) that names a file or folder is relative.
* Size limits: no module of ``drp_kernels/`` or ``python/`` over 450 lines; the README at most 200
  lines of at most 160 characters.
* The test-hygiene lint (``tools/check_test_hygiene.py``, run by ``make lint``) catches what it is for.
"""
import ast
import importlib
import importlib.util
import json
import re

import pytest
import torch

from _helpers import REPO

OPS = REPO / "drp_kernels" / "ops"
TRAIN = REPO / "python" / "drp_train"
RESULTS = REPO / "results"
MAX_MODULE_LINES = 450


def _imports(path):
    """(line, module or None, level, names) of every import statement of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, 0, [alias.asname or alias.name.split(".")[0]]
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.module, node.level, [a.name for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, node.args[0].value, 0, []


# ----------------------------------------------------------------------------- layering
def test_ops_import_neither_the_package_root_nor_the_backend_choice():
    bad = []
    for path in sorted(OPS.glob("*.py")):
        for line, module, level, names in _imports(path):
            if level == 0:
                absolute = module or ""
            elif level == 1:
                absolute = "drp_kernels.ops" + (f".{module}" if module else "")
            else:
                absolute = "drp_kernels" + (f".{module}" if module else "")
            if absolute == "drp_kernels" or absolute.startswith("drp_kernels._backend"):
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {absolute} {names}")
    assert not bad, "drp_kernels/ops/ holds kernels, launchers and registration only:\n" + "\n".join(bad)


def _public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split("."))


def _library_imports(path):
    """(line, drp_kernels module, names it binds: {local name: imported name, or None for the module})."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "drp_kernels":
                    yield node.lineno, alias.name, {alias.asname or "drp_kernels": None}
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "drp_kernels":
            yield node.lineno, node.module, {a.asname or a.name: a.name for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).split(".")[0] == "drp_kernels"):
            yield node.lineno, node.args[0].value, {}


def test_drp_train_uses_only_the_public_api_of_drp_kernels():
    bad = []
    for path in sorted(TRAIN.glob("*.py")):
        where = path.relative_to(REPO)
        modules = {}  # local name -> the drp_kernels module it is bound to
        for line, module, bound in _library_imports(path):
            if not _public(module):
                bad.append(f"{where}:{line}: imports the private module {module}")
                continue
            mod = importlib.import_module(module)
            for local, name in bound.items():
                if name is None:  # import drp_kernels[.x]: the name is the top package
                    modules[local] = module if local != "drp_kernels" else "drp_kernels"
                elif name not in getattr(mod, "__all__", ()):
                    bad.append(f"{where}:{line}: {name} is not in {module}.__all__")
                elif isinstance(getattr(mod, name), type(mod)):
                    modules[local] = f"{module}.{name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and not node.attr.startswith("__")):
                target = modules[node.value.id]
                if node.attr not in getattr(importlib.import_module(target), "__all__", ()):
                    bad.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} is not in {target}.__all__")
    assert not bad, "python/drp_train imports only the public API of drp_kernels:\n" + "\n".join(bad)


def test_the_import_walk_catches_a_private_import(tmp_path):
    """The walker itself: every kind of import it must see is seen."""
    src = tmp_path / "m.py"
    src.write_text("from .. import _C\nimport drp_kernels._backend\nfrom drp_kernels.attacks._common import margin\n"
                   "x = importlib.import_module('drp_kernels')\n")
    found = [(module, level) for _, module, level, _ in _imports(src)]
    assert found == [(None, 2), ("drp_kernels._backend", 0), ("drp_kernels.attacks._common", 0),
                     ("drp_kernels", 0)]
    library = [(module, bound) for _, module, bound in _library_imports(src)]
    assert library == [("drp_kernels._backend", {"drp_kernels": None}),
                       ("drp_kernels.attacks._common", {"margin": "margin"}), ("drp_kernels", {})]
    assert not _public("drp_kernels.attacks._common") and _public("drp_kernels.attacks")


# ----------------------------------------------------------------------------- committed results
_ABSOLUTE = re.compile(r"^(~/|/[^/\s]+/|[A-Za-z]:[\\/])")  # /a/..., ~/..., C:\... (not "/" or "8/255")
_TEXT = (".json", ".jsonl", ".md", ".txt", ".csv")


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def _result_files():
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and (p.suffix in _TEXT or p.suffix == ".pt"))


def _absolute_paths(path):
    if path.suffix == ".pt":
        values = [torch.load(path, map_location="cpu", weights_only=True)]
    elif path.suffix == ".json":
        values = [json.loads(path.read_text())]
    elif path.suffix == ".jsonl":
        values = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        values = path.read_text().split()
    return sorted({s for s in _strings(values) if _ABSOLUTE.match(s.strip("`'\"()[],"))})


def test_results_are_there():
    assert len(_result_files()) >= 10, "results/ lost its committed runs"


@pytest.mark.parametrize("path", _result_files(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_committed_results_carry_no_absolute_path(path):
    found = _absolute_paths(path)
    assert not found, f"{path.relative_to(REPO)} records absolute paths {found}: store them relative to the run folder"


def test_the_absolute_path_check_sees_json_and_text(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"out": "/tmp/runs/x", "data_dir": None, "n": [1, "a/b"]}))
    (tmp_path / "r.md").write_text("see `/home/me/run` and results/x, eps 8/255, a / b\n")
    assert _absolute_paths(tmp_path / "c.json") == ["/tmp/runs/x"]
    assert _absolute_paths(tmp_path / "r.md") == ["`/home/me/run`"]


# ----------------------------------------------------------------------------- sizes
def _modules():
    return sorted(list((REPO / "drp_kernels").rglob("*.py")) + list((REPO / "python").rglob("*.py")))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_modules_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {n} lines (at most {MAX_MODULE_LINES}): split it"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200): move detail next to what it describes"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 160]
    assert not long, f"README.md lines over 160 characters: {long}"


# ----------------------------------------------------------------------------- the hygiene lint
def _hygiene_tool():
    spec = importlib.util.spec_from_file_location("check_test_hygiene", REPO / "tools" / "check_test_hygiene.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_hygiene_lint_catches_a_cpu_tensor_and_a_cross_import(tmp_path):
    tool = _hygiene_tool()
    src = '''
def test_bad(triton_backend):
    x = torch.randn(3, 4)
    y = torch.zeros(2, device="cpu")
    z = torch.randn(3).cpu()

def test_good(triton_backend):
    x = torch.randn(3, 4, device=DEVICE)
    y = torch.randn(3, generator=g).to(DEVICE)
'''
    fns = {fn.name: fn for fn in ast.walk(ast.parse(src)) if isinstance(fn, ast.FunctionDef)}
    assert all(tool.forces_triton(fn) for fn in fns.values())
    assert len(list(tool.device_problems(fns["test_bad"]))) == 4
    assert not list(tool.device_problems(fns["test_good"]))
    tool.TESTS = tmp_path / "tests"
    (tool.TESTS / "kernels").mkdir(parents=True)
    bad = tool.TESTS / "kernels" / "test_x.py"
    bad.write_text("import test_y\nfrom conftest import thing\n" + src)
    problems = tool.problems_in(bad)
    assert sum("imports test_y" in p for p in problems) == 1 and sum("imports conftest" in p for p in problems) == 1
    assert sum("tests/kernels/test_x.py" in p for p in problems) == len(problems) == 6  # 4 device + 2 imports
    assert tool.test_files() == [bad]
