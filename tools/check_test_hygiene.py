"""Guards on the test suite itself, a lint step (``make lint``): ``python tools/check_test_hygiene.py``
prints every problem and exits 1 if there is one.

* Tests that force the Triton backend build their inputs on ``_helpers.DEVICE`` (CUDA when a GPU is
  present). On a GPU machine TRITON_INTERPRET is not set, so a CPU tensor reaching a forced Triton
  kernel fails there although the suite passes on a CPU-only machine. The check is static: inside
  every test that forces the backend (the ``triton_backend`` fixture, ``setenv("DRP_BACKEND",
  "triton")``, a helper called with "triton", or a ``backend`` parameter that takes "triton") no
  tensor is created without a device (unless it is moved with ``.to(...)`` at once), none is moved
  with ``.cpu()`` and no ``device="cpu"`` is written; helpers of such files default to ``DEVICE``.
* Test files never import each other or conftest: shared helpers live in ``tests/_helpers.py``.
"""
import ast
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
FACTORIES = {"randn", "rand", "zeros", "ones", "empty", "full", "tensor", "randint", "arange", "linspace",
             "eye", "randperm", "normal"}


def test_files():
    """Every test file below tests/."""
    return sorted(TESTS.rglob("test_*.py"))


def _is_cpu(node) -> bool:
    if isinstance(node, ast.Constant) and node.value == "cpu":
        return True
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device"
            and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "cpu")


def forces_triton(fn: ast.FunctionDef) -> bool:
    if any(a.arg == "triton_backend" for a in fn.args.args):
        return True
    for node in ast.walk(fn):
        # setenv("DRP_BACKEND", "triton"), or a helper called with the backend "triton"
        if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value == "triton"
                                              for a in list(node.args) + [k.value for k in node.keywords]):
            return True
    for dec in fn.decorator_list:
        if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "parametrize"
                and dec.args and isinstance(dec.args[0], ast.Constant) and "backend" in str(dec.args[0].value)
                and any(isinstance(n, ast.Constant) and n.value == "triton" for n in ast.walk(dec))):
            return True
    return False


def device_problems(fn: ast.FunctionDef):
    moved = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to":
            moved.add(id(node.func.value))
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "cpu" and not node.args:
            yield node.lineno, ".cpu()"
        for kw in node.keywords:
            if kw.arg == "device" and _is_cpu(kw.value):
                yield node.lineno, 'device="cpu"'
        if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch"
                and f.attr in FACTORIES and not any(kw.arg == "device" for kw in node.keywords)
                and id(node) not in moved):
            yield node.lineno, f"torch.{f.attr}(...) without device="


def _cpu_default_helpers(tree):
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            args = fn.args.args + fn.args.kwonlyargs
            defaults = [None] * (len(fn.args.args) - len(fn.args.defaults)) + list(fn.args.defaults) \
                + list(fn.args.kw_defaults)
            for a, d in zip(args, defaults):
                if a.arg == "device" and d is not None and _is_cpu(d):
                    yield fn.lineno, f"{fn.name}(device='cpu') default"


def problems_in(path: Path) -> list:
    """The hygiene problems of one test file, one line each."""
    name = path.relative_to(TESTS.parent).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    forcing = [fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")
               and forces_triton(fn)]
    for fn in forcing:
        problems += [f"{name}:{line} in {fn.name}: {what} (tests that force DRP_BACKEND=triton put their "
                     "tensors on _helpers.DEVICE)" for line, what in device_problems(fn)]
    if forcing:
        problems += [f"{name}:{line}: {what} (tests that force DRP_BACKEND=triton put their tensors on "
                     "_helpers.DEVICE)" for line, what in _cpu_default_helpers(tree)]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        problems += [f"{name}:{node.lineno}: imports {n} (import shared helpers from tests/_helpers.py)"
                     for n in names if n.startswith("test_") or n == "conftest"]
    return problems


def main() -> int:
    files = test_files()
    problems = [p for path in files for p in problems_in(path)]
    for line in problems:
        print(line)
    print(f"test hygiene: {len(files)} test files, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
