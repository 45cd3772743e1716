"""Guards on the test suite itself.

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
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FACTORIES = {"randn", "rand", "zeros", "ones", "empty", "full", "tensor", "randint", "arange", "linspace",
             "eye", "randperm", "normal"}


def _test_files():
    return sorted(p for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)


def _is_cpu(node) -> bool:
    if isinstance(node, ast.Constant) and node.value == "cpu":
        return True
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device"
            and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "cpu")


def _forces_triton(fn: ast.FunctionDef) -> bool:
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


def _device_problems(fn: ast.FunctionDef):
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


@pytest.mark.parametrize("path", _test_files(), ids=lambda p: p.name)
def test_forced_triton_tests_use_the_kernel_device(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    forcing = [fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")
               and _forces_triton(fn)]
    for fn in forcing:
        problems += [f"{path.name}:{line} in {fn.name}: {what}" for line, what in _device_problems(fn)]
    if forcing:
        problems += [f"{path.name}:{line}: {what}" for line, what in _cpu_default_helpers(tree)]
    assert not problems, "tests that force DRP_BACKEND=triton must put their tensors on _helpers.DEVICE:\n" + \
        "\n".join(problems)


@pytest.mark.parametrize("path", _test_files(), ids=lambda p: p.name)
def test_test_files_do_not_import_each_other(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        bad += [f"{path.name}:{node.lineno}: {n}" for n in names if n.startswith("test_") or n == "conftest"]
    assert not bad, "import shared helpers from tests/_helpers.py instead:\n" + "\n".join(bad)


def test_the_device_check_catches_a_cpu_tensor():
    """The checker itself: a forced-triton test with a CPU tensor is reported, a DEVICE one is not."""
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
    assert all(_forces_triton(fn) for fn in fns.values())
    assert len(list(_device_problems(fns["test_bad"]))) == 4
    assert not list(_device_problems(fns["test_good"]))
