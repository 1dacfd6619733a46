"""The environment record of a run (machine, versions, build, threads, the repository's commit)
and the TF32 switches both sides of a comparison run under.

(Named ``env`` after the results' ``"env"`` key; a module named ``environment`` would share its
name with the function ``fusedrnn.bench.environment``.)
"""

import contextlib
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch

import fusedrnn


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git(args: List[str], cwd: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", cwd] + args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision() -> Dict[str, Optional[object]]:
    """The commit of the repository fusedrnn is imported from (None when it is not in one)."""
    pkg = os.path.dirname(os.path.abspath(fusedrnn.__file__))
    if _git(["ls-files", "--error-unmatch", "__init__.py"], pkg) is None:
        return {"revision": None, "dirty": None}
    rev = _git(["rev-parse", "HEAD"], pkg)
    status = _git(["status", "--porcelain", "--untracked-files=no"], pkg)
    return {"revision": rev, "dirty": None if status is None else bool(status)}


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    cuda = device.type == "cuda"
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # a CPU-only build without the cuDNN library
        cudnn = None
    git = git_revision()
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu_capability": (
            ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None
        ),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "fusedrnn": fusedrnn.__version__,
        "fusedrnn_path": os.path.dirname(os.path.abspath(fusedrnn.__file__)),
        "git_revision": git["revision"],
        "git_dirty": git["dirty"],
        "backend": fusedrnn.backend(),
        "build_info": fusedrnn.build_info(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# --- TF32 ------------------------------------------------------------------------------------

TF32_NOTE = (
    "TF32 in float32 matrix products, the same on both sides: cuDNN "
    "(torch.backends.cudnn.allow_tf32: torch.nn.LSTM/GRU) and cuBLAS "
    "(torch.backends.cuda.matmul.allow_tf32: fused's GEMMs, the eager and compiled "
    "loops); off unless --tf32. torch's own defaults differ (cuDNN on, cuBLAS off), "
    "which would let torch.nn run TF32 against fused in full fp32"
)


def tf32_state() -> Dict[str, object]:
    """The TF32 switches in effect: the two legacy flags and, where this torch has them, the
    fp32_precision settings they map to."""
    b = torch.backends
    state: Dict[str, object] = {
        "cudnn_allow_tf32": bool(b.cudnn.allow_tf32),
        "cuda_matmul_allow_tf32": bool(b.cuda.matmul.allow_tf32),
    }
    for key, getter in (
        ("cudnn_rnn_fp32_precision", lambda: b.cudnn.rnn.fp32_precision),
        ("cuda_matmul_fp32_precision", lambda: b.cuda.matmul.fp32_precision),
    ):
        try:
            state[key] = getter()
        except (AttributeError, RuntimeError):  # an older torch without fp32_precision
            pass
    return state


@contextlib.contextmanager
def tf32(enabled: bool):
    """Sets cuDNN's and cuBLAS's TF32 flags both to `enabled` for the block, then restores them."""
    if not isinstance(enabled, bool):
        raise TypeError(f"tf32: expected a bool, got {type(enabled).__name__} {enabled!r}")
    b = torch.backends
    old_cudnn, old_matmul = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    b.cudnn.allow_tf32 = enabled
    b.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        b.cudnn.allow_tf32 = old_cudnn
        b.cuda.matmul.allow_tf32 = old_matmul
