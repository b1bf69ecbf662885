"""Builds gradnoise's compiled kernels.

Always: gradnoise._C, the C++ CPU kernels and the op schemas.
When torch has CUDA and a CUDA toolkit is found: gradnoise._C_cuda as well
(no GPU is needed to build it). GRADNOISE_NO_CUDA=1 skips it.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")

cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast",
             "-fno-math-errno", "-DNDEBUG"]

ext_modules = [
    CppExtension(
        "gradnoise._C",
        sources=[os.path.join(CSRC, "registration.cpp")]
        + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))),
        include_dirs=[os.path.join(HERE, CSRC)],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

if (torch.version.cuda and CUDA_HOME is not None
        and os.environ.get("GRADNOISE_NO_CUDA", "0") != "1"):
    ext_modules.append(
        CUDAExtension(
            "gradnoise._C_cuda",
            sources=sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
            + sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))),
            include_dirs=[os.path.join(HERE, CSRC)],
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension})
