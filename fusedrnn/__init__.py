"""fusedrnn: fused C++/CUDA kernels for LSTM, GRU, peephole-LSTM and working-memory-LSTM layers,
drop-in for torch.nn.LSTM / torch.nn.GRU."""
import torch

from . import _ops, functional, reference
from ._ops import backend
from .convert import convert
from .modules import (GRU, LSTM, GRUCell, LSTMCell, PeepholeLSTM, PeepholeLSTMCell,
                      WorkingMemoryLSTM, WorkingMemoryLSTMCell)

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "PeepholeLSTM", "WorkingMemoryLSTM", "LSTMCell", "GRUCell",
           "PeepholeLSTMCell", "WorkingMemoryLSTMCell", "functional", "reference", "convert",
           "backend", "build_info"]


def build_info() -> dict:
    """What this installation runs: the backend and which devices the compiled ops support."""
    info = {"version": __version__, "torch": torch.__version__, "backend": _ops.backend(),
            "load_error": _ops.LOAD_ERROR, "cpu": False, "cuda": False,
            "cpu_fused_steps": False}
    if _ops.HAS_C:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        info["cpu"] = has("fusedrnn::lstm_forward", "CPU")
        info["cuda"] = has("fusedrnn::lstm_forward", "CUDA")
        # fp32 CPU steps as one GEMM + cell pass (AVX-512 builds; FUSEDRNN_CPU_FUSED=0 turns off)
        info["cpu_fused_steps"] = torch.ops.fusedrnn.cpu_fused_steps()
    return info
