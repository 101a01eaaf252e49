"""Builds the RoIAlign extension (mrcnn._C) ahead of time, at install.

CPU kernels are always built. The CUDA kernels are built when a CUDA toolkit is
found (CUDA_HOME, or nvcc on PATH) unless MRCNN_WITH_CUDA=0; MRCNN_WITH_CUDA=1
makes a missing toolkit an error. TORCH_CUDA_ARCH_LIST picks the GPU
architectures; with no GPU visible and no list given we build for the common
data-centre and workstation parts (sm_80, sm_86, sm_89, sm_90 + PTX).
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("mrcnn", "ops", "csrc")


def _want_cuda() -> bool:
    flag = os.environ.get("MRCNN_WITH_CUDA", "auto").lower()
    have = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        if not have:
            raise RuntimeError(
                "MRCNN_WITH_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME) "
                "or torch is a CPU-only build")
        return True
    return have


def _cuda_library_includes() -> list:
    """ATen's CUDA headers include cuSPARSE/cuBLAS headers. A bare toolkit may lack them;
    torch's nvidia-* wheels ship them, so use those when the toolkit has none."""
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += glob.glob(os.path.join(base, "*", "include"))
    return sorted(d for d in found if glob.glob(os.path.join(d, "cusparse*.h")) or glob.glob(os.path.join(d, "cublas*.h")))


def extensions():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is chosen by torch
    define_macros = []
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
        sources += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        define_macros.append(("MRCNN_WITH_CUDA", None))
        # No --use_fast_math: approximate division flips RoIPool's bin edges and the adaptive
        # sampling count (tests/test_cuda_build.py reads the PTX); the kernels are memory-bound.
        ext = cpp_extension.CUDAExtension(
            "mrcnn._C", sources, define_macros=define_macros, include_dirs=_cuda_library_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "mrcnn._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
