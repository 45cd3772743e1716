"""`import drp_kernels` needs neither triton, tqdm nor matplotlib (a CPU-only install runs the
reference); forcing the Triton backend without triton fails with a clear error."""
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent('''
    import importlib.abc
    import os
    import sys

    BLOCKED = {"triton", "tqdm", "matplotlib"}

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Block())
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("DRP_BACKEND", None)

    import torch
    import drp_kernels
    from drp_kernels import reference

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, requires_grad=True)
    p = torch.randn(4, 5, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    for metric in ("linf", "l2", "cosine"):
        out = drp_kernels.proto_loss(z, p, y, metric=metric, ce_weight=0.5)
        ref = reference.proto_loss(z, p, y, metric=metric, ce_weight=0.5)
        assert torch.equal(out, ref), metric
        out.backward()
    e = drp_kernels.repulsion_energy(p, metric="cosine", kind="softmin")
    assert torch.equal(e, reference.repulsion_energy(p, metric="cosine", kind="softmin"))
    x = torch.rand(3, 1, 4, 4)
    drp_kernels.pgd_step_(x.clone(), x, torch.randn_like(x), 0.1, 0.05)

    os.environ["DRP_BACKEND"] = "triton"
    try:
        drp_kernels.proto_loss(z, p, y)
    except RuntimeError as exc:
        assert "triton" in str(exc) and "pip install" in str(exc), str(exc)
    else:
        raise AssertionError("DRP_BACKEND=triton without triton did not raise")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("OK")
''')


def test_import_and_reference_path_without_triton_tqdm_matplotlib():
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]
