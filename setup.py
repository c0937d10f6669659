"""Builds flashquant's compiled extensions (everything else is in pyproject.toml).

* ``flashquant._C``      C++ CPU kernels + the op schemas (``TORCH_LIBRARY(flashquant, ...)``). Always built.
* ``flashquant._C_cuda`` CUDA kernels (``TORCH_LIBRARY_IMPL(flashquant, CUDA, ...)``). Built only when the
  installed torch has CUDA and a CUDA toolkit is found. ``FLASHQUANT_BUILD_CUDA=1`` forces it on (and fails
  loudly if it cannot be built), ``FLASHQUANT_BUILD_CUDA=0`` forces it off.

Nothing is downloaded during the build.
"""

import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit(
        "flashquant: torch must be installed before building (pip install torch, then "
        "pip install --no-build-isolation .)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_SOURCES = [
    "csrc/cpu/ops.cpp",
    "csrc/cpu/quant_gemv.cpp",
    "csrc/cpu/dequantize.cpp",
    "csrc/cpu/quant_gemm_amx.cpp",
    "csrc/cpu/kvcache_attention.cpp",
    "csrc/cpu/kvcache_append.cpp",
    "csrc/cpu/layer_ops.cpp",
    "csrc/cpu/mse_clip.cpp",
]
CUDA_SOURCES = ["csrc/cuda/ops_cuda.cpp", "csrc/cuda/quant_gemv.cu", "csrc/cuda/decode_attention.cu"]


def want_cuda() -> bool:
    flag = os.environ.get("FLASHQUANT_BUILD_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        print("flashquant: FLASHQUANT_BUILD_CUDA=0, skipping the CUDA extension")
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("1", "on", "true", "yes"):
        if not available:
            sys.exit(
                f"flashquant: FLASHQUANT_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, "
                f"CUDA_HOME={CUDA_HOME!r}: a CUDA build of torch and a CUDA toolkit are both required"
            )
        return True
    if not available:
        print(
            "flashquant: skipping the CUDA extension "
            f"(torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}); "
            "the C++ CPU extension, Triton and PyTorch paths are still built/available"
        )
    return available


def extensions():
    cxx = ["-O3", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP-based in torch
    exts = [
        CppExtension(
            "flashquant._C",
            CPU_SOURCES,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        exts.append(
            CUDAExtension(
                "flashquant._C_cuda",
                CUDA_SOURCES,
                include_dirs=[os.path.join(HERE, "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
