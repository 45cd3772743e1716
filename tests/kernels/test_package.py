import subprocess
import sys

import drp_kernels


def test_public_api_is_exported():
    for name in drp_kernels.__all__:
        assert hasattr(drp_kernels, name), name


def test_drp_cli_help():
    out = subprocess.run([sys.executable, "-m", "drp_train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: drp" in out.stdout
