"""Build of fusedrnn._C: the CPU kernels always, the CUDA kernels when torch has CUDA and a CUDA
toolkit is found (a GPU need not be present at build time).

Environment:
  FUSEDRNN_SKIP_CUDA=1    build the CPU extension only
  FUSEDRNN_FORCE_CUDA=1   fail unless the CUDA kernels are built
  FUSEDRNN_CPU_ARCH=...   -march for the whole extension (default: none, a portable build whose
                          AVX2 and AVX-512 kernels are chosen at run time; "native" ties the
                          build to the build machine's CPU)
  FUSEDRNN_DEBUG_INFO=1   keep debug info (-g; Python's own flags ask for it, and it makes the
                          library several times larger and its compile ~40% longer): off by default
  FUSEDRNN_QUICK_BUILD=1  a build that only checks that the sources compile, link and run (CI's
                          second and third environments): -O0, ~4x faster to compile, kernels many
                          times slower; never for use
  TORCH_CUDA_ARCH_LIST    CUDA architectures (torch's variable), e.g. "9.0"; without it and
                          without a visible GPU: DEFAULT_CUDA_ARCHS below
  MAX_JOBS                parallel compile jobs (ninja), as torch's cpp_extension reads it
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"  # when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _set_cuda_home():
    """torch takes CUDA_HOME (when unset) from the nvcc on PATH, two directories up. Where that
    nvcc is a wrapper script outside the toolkit (/usr/local/bin/nvcc), that directory has no
    CUDA headers: use /usr/local/cuda instead when it holds the toolkit. Must run before
    torch.utils.cpp_extension is imported (it reads CUDA_HOME at import)."""
    import shutil

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    header = os.path.join("include", "cuda_runtime_api.h")
    guessed = os.path.dirname(os.path.dirname(nvcc))
    if not os.path.exists(os.path.join(guessed, header)) and os.path.exists(
        os.path.join("/usr/local/cuda", header)
    ):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _extensions():
    _set_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    skip_cuda = _flag("FUSEDRNN_SKIP_CUDA")
    force_cuda = _flag("FUSEDRNN_FORCE_CUDA")
    with_cuda = not skip_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if force_cuda and not with_cuda:
        sys.exit(
            "FUSEDRNN_FORCE_CUDA=1 but the CUDA kernels cannot be built: torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}, FUSEDRNN_SKIP_CUDA={skip_cuda}"
        )

    arch = os.environ.get("FUSEDRNN_CPU_ARCH", "none")
    opt = "-O0" if _flag("FUSEDRNN_QUICK_BUILD") else "-O3"
    # (the flags below come after Python's own, so -g0 overrides the -g in them)
    debug = "-g" if _flag("FUSEDRNN_DEBUG_INFO") else "-g0"
    # -fno-trapping-math: the cell math's selects (cells/common.h) may then be computed on both
    # sides, which AVX2 code needs to vectorise a step kernel's loop (no masked FP ops there)
    cxx = [opt, debug, "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if arch != "none":
        cxx.append(f"-march={arch}")
    # Every .cpp under csrc/ (docs/design.md, "Layout"); kernels/cpu/isa/*.cpp compile their
    # kernels for AVX2 / AVX-512 through target pragmas, with the same flags as everything else
    # (kernels/cpu/isa/isa_begin.h)
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return [
            CppExtension(
                "fusedrnn._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx},
                py_limited_api=False,
            )
        ]

    # Headers that torch's CUDA headers include but a bare toolkit may lack (cusparse.h, ...)
    # ship with torch's pip dependencies under site-packages/nvidia/cu*/include.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to read the architecture from (a build machine, CI): torch's default would
        # fail. Build for the current data-centre and workstation generations, plus PTX.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    nvcc = [opt, "--expt-relaxed-constexpr", "-lineinfo"]
    return [
        CUDAExtension(
            "fusedrnn._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("FUSEDRNN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages(include=["fusedrnn", "fusedrnn.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
