"""Build for drp_kernels and its compiled part, ``drp_kernels.ops._C`` (the kernels of ``csrc/``).

``pip install --no-build-isolation -e .`` compiles the C++ CPU sources always,
and the CUDA sources as well when the installed torch has CUDA and nvcc is found.

Environment switches:
  DRP_FORCE_CUDA=1   build the CUDA sources even if torch/nvcc detection says no
  DRP_SKIP_CUDA=1    never build the CUDA sources
  TORCH_CUDA_ARCH_LIST  honoured by torch.utils.cpp_extension (e.g. "8.0;9.0")

``python setup.py --print-nvcc-flags`` prints the nvcc flags of the CUDA sources (this file's
NVCC_FLAGS after torch's own common flags); .ci/nvcc_check.sh compiles with exactly those.
No fast-math: pgd_step_cuda.cu promises results exact to the reference (denormals, exact
compares and IEEE division/rounding), which --use_fast_math would break.

The package's metadata (name, version, dependencies, the extras gpu/test/bench, the `drp`
script) lives in pyproject.toml's [project] table; this file only adds the compiled extension.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


# Compiler flags of the extension: the single source (the CI nvcc check reads them from here).
CXX_FLAGS = ["-O3", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def nvcc_command_flags():
    """Every flag torch.utils.cpp_extension gives nvcc for our .cu sources, except the arch targets."""
    return list(cpp_extension.COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC", "-DDRP_WITH_CUDA"] + NVCC_FLAGS


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("DRP_SKIP_CUDA"):
        return False
    if _flag("DRP_FORCE_CUDA"):
        return True
    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def _extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx_flags = list(CXX_FLAGS)
    if _want_cuda():
        return [
            cpp_extension.CUDAExtension(
                name="drp_kernels.ops._C",
                sources=cpp_sources + cu_sources,
                define_macros=[("DRP_WITH_CUDA", None)],
                extra_compile_args={
                    "cxx": cxx_flags + ["-fopenmp"],
                    "nvcc": list(NVCC_FLAGS),
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            name="drp_kernels.ops._C",
            sources=cpp_sources,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]


if __name__ == "__main__" and sys.argv[1:] == ["--print-nvcc-flags"]:
    print(" ".join(nvcc_command_flags()))
    sys.exit(0)

setup(
    packages=find_packages(include=["drp_kernels", "drp_kernels.*"])
    + find_packages(where="python", include=["drp_train", "drp_train.*"]),
    package_dir={"drp_train": "python/drp_train"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
