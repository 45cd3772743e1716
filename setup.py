"""Build for drp_kernels and its compiled part, ``drp_kernels._C``.

``pip install --no-build-isolation -e .`` compiles the C++ CPU sources always,
and the CUDA sources as well when the installed torch has CUDA and nvcc is found.

Environment switches:
  DRP_FORCE_CUDA=1   build the CUDA sources even if torch/nvcc detection says no
  DRP_SKIP_CUDA=1    never build the CUDA sources
  TORCH_CUDA_ARCH_LIST  honoured by torch.utils.cpp_extension (e.g. "8.0;9.0")
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    cxx_flags = ["-O3", "-std=c++17"]
    if _want_cuda():
        return [
            cpp_extension.CUDAExtension(
                name="drp_kernels._C",
                sources=cpp_sources + cu_sources,
                define_macros=[("DRP_WITH_CUDA", None)],
                extra_compile_args={
                    "cxx": cxx_flags + ["-fopenmp"],
                    "nvcc": ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"],
                },
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            name="drp_kernels._C",
            sources=cpp_sources,
            extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="drp_kernels",
    version="0.1.0",
    description="Fast kernels, training and honest evaluation for Deep Repulsive Prototypes",
    python_requires=">=3.10",
    packages=find_packages(include=["drp_kernels", "drp_kernels.*"])
    + find_packages(where="python", include=["drp_train", "drp_train.*"]),
    package_dir={"drp_train": "python/drp_train"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch", "triton", "numpy", "tqdm", "matplotlib"],
    entry_points={"console_scripts": ["drp = drp_train.cli:main"]},
    zip_safe=False,
)
