"""fusedrnn: fused C++/CUDA kernels for LSTM, GRU, peephole-LSTM, working-memory-LSTM and
layer-normalised LSTM / GRU layers, drop-in for torch.nn.LSTM / torch.nn.GRU."""

import torch

from . import _ops, cells, functional, reference
from ._layer import backend
from ._version import __version__
from .convert import convert
from .modules import (
    GRU,
    LSTM,
    GRUCell,
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LSTMCell,
    PeepholeLSTM,
    PeepholeLSTMCell,
    WorkingMemoryLSTM,
    WorkingMemoryLSTMCell,
)

__all__ = [
    "LSTM",
    "GRU",
    "PeepholeLSTM",
    "WorkingMemoryLSTM",
    "LSTMCell",
    "GRUCell",
    "PeepholeLSTMCell",
    "WorkingMemoryLSTMCell",
    "LayerNormLSTM",
    "LayerNormGRU",
    "LayerNormLSTMCell",
    "LayerNormGRUCell",
    "cells",
    "functional",
    "reference",
    "convert",
    "backend",
    "build_info",
    "empty_cpu_cache",
]


def build_info() -> dict:
    """What this installation runs: the backend and which devices the compiled ops support."""
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "backend": backend(),
        "load_error": _ops.LOAD_ERROR,
        "cpu": False,
        "cuda": False,
        "cpu_fused_steps": False,
        "cpu_isa": None,
        "cpu_isa_best": None,
        "cpu_onednn_gemm": False,
        "cpu_onednn_fp32_gemm": False,
        "cpu_bf16_tiles": False,
        "cpu_onednn_bf16_amx": False,
        "cpu_pool_mb": 0,
    }
    if _ops.HAS_C:
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        info["cpu"] = has("fusedrnn::lstm_forward", "CPU")
        info["cuda"] = has("fusedrnn::lstm_forward", "CUDA")
        ops = torch.ops.fusedrnn
        # fp32 CPU steps as one GEMM + cell pass (every ISA but the baseline;
        # FUSEDRNN_CPU_FUSED=0 turns them off)
        info["cpu_fused_steps"] = ops.cpu_fused_steps()
        # the instruction set of the CPU kernels in use (FUSEDRNN_CPU_ISA forces a lower one)
        # and the best one this CPU and build have
        info["cpu_isa"] = ops.cpu_isa()
        info["cpu_isa_best"] = ops.cpu_isa_best()
        # whether large bf16 CPU GEMMs go through oneDNN (AVX-512 only) or at::mm, and the fp32
        # ones (not on Intel CPUs, where at::mm's MKL is faster; FUSEDRNN_CPU_GEMM=auto|aten|onednn)
        info["cpu_onednn_gemm"] = ops.cpu_onednn_gemm()
        info["cpu_onednn_fp32_gemm"] = ops.cpu_onednn_fp32_gemm()
        # bf16 CPU steps as the fused tiles: not where oneDNN's bf16 GEMMs run on AMX (faster
        # there); FUSEDRNN_CPU_BF16_TILES=auto|on|off
        info["cpu_bf16_tiles"] = ops.cpu_bf16_tiles() and info["cpu_fused_steps"]
        info["cpu_onednn_bf16_amx"] = ops.cpu_onednn_bf16_amx()
        # the most free memory the layers keep for their next CPU calls (FUSEDRNN_CPU_POOL_MB)
        info["cpu_pool_mb"] = ops.cpu_pool_stats()[0] >> 20
    return info


def empty_cpu_cache() -> None:
    """Returns the memory the layers keep for their next CPU calls to the system (as
    torch.cuda.empty_cache() does for CUDA's cache): the outputs, workspaces and scratch of
    earlier calls, up to FUSEDRNN_CPU_POOL_MB megabytes (docs/cpu_kernels.md). Tensors still
    alive keep theirs, which returns to the pool when they are freed."""
    if _ops.HAS_C:
        torch.ops.fusedrnn.cpu_pool_release()
