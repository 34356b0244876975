"""Build and install ctpo_megatron.

The `csrc/` extension (module `ctpo_megatron._C`) is always built for CPU; CUDA sources are
added when torch is a CUDA build and a CUDA toolkit is found (a GPU is not needed to compile).
Environment switches:
  CTPO_FORCE_CPU=1   skip the CUDA sources even when a toolkit is present
  CTPO_SKIP_EXT=1    build no extension (ctpo_megatron.ops then uses its pure-torch path)
  DEBUG=1            compile with -O0 -g
Install with `pip install --no-build-isolation -e .` so the build uses the environment's torch.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

NAME = "ctpo_megatron"
ROOT = os.path.dirname(os.path.abspath(__file__))

INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.16,<0.17",
    "numpy",
    "hydra-core>=1.3,<1.4",
    "pybind11",
    "transformers",
    "safetensors",
    "tokenizers",
    "psutil",  # megatron's dist-checkpoint writer processes need it
    "aiohttp",
    "msgspec",
    "tensorboard",
    "matplotlib",
    "pyarrow",
    "tqdm",
    "math-verify",
]
EXTRAS = {
    # GPU clusters (NVIDIA containers usually ship TE and apex already).
    "gpu": ["transformer-engine[pytorch]", "sglang[all]>=0.5.23", "sglang-router"],
    "test": ["pytest", "pytest-timeout", "wandb"],
    # Weights & Biases logging (trainer.loggers=[jsonl,tensorboard,wandb]).
    "wandb": ["wandb"],
}


def _cuda_skip_reason() -> str | None:
    """None when the CUDA sources are built, else a token compiled into build_info()."""
    if os.environ.get("CTPO_FORCE_CPU") == "1":
        return "forced"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    # is_available() is False on GPU-less build nodes; what matters is a CUDA torch + nvcc.
    if torch.version.cuda is None:
        return "torch_cpu"
    if CUDA_HOME is None:
        return "no_nvcc"
    return None


def _extensions():
    if os.environ.get("CTPO_SKIP_EXT") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # at::parallel_for is inline: without -fopenmp our kernels would run on one thread. The
    # soname matches torch's bundled libgomp, so the process keeps one OpenMP runtime.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # The CPU loss kernel's elementwise loop vectorizes only when the compiler may if-convert
    # float selects (no FP-exception or errno side effects; values are unchanged).
    vectorize = ["-fno-math-errno", "-fno-trapping-math"]
    if sys.platform.startswith("linux"):
        vectorize.append("--param=max-tree-if-conversion-phi-args=32")
    extra = {"cxx": list(opt) + openmp + vectorize}
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    skip = _cuda_skip_reason()
    if skip is None:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = opt + ["-DCTPO_WITH_CUDA", "--expt-relaxed-constexpr"]
        extra["cxx"] = extra["cxx"] + ["-DCTPO_WITH_CUDA"]
        ext = CUDAExtension(f"{NAME}._C", sources, include_dirs=include_dirs,
                            extra_compile_args=extra, extra_link_args=openmp, py_limited_api=False)
    else:
        extra["cxx"] = extra["cxx"] + [f"-DCTPO_CUDA_SKIPPED={skip}"]
        ext = CppExtension(f"{NAME}._C", sources, include_dirs=include_dirs,
                           extra_compile_args=extra, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name=NAME,
    version="0.1.0",
    description="CTPO (Cumulative Token Policy Optimization) RL training on Megatron-core",
    packages=find_packages(include=[NAME, f"{NAME}.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    include_package_data=True,
)
