"""The raw GEMM of the step loops (csrc/execution/step_device.h): C = beta * C + op(A) op(B) on
row-major matrices given by pointer, leading dimension and transpose flag, which the GEMM +
step kernel loops call once or twice per step, on the CPU through ATen and on CUDA through
cublasGemmEx (csrc/execution/cublas.cpp).

On the CPU: every transpose / beta / leading-dimension combination (the driver's among them)
through the op `_raw_gemm`, through ATen and through FUSEDRNN_CPU_STEP_GEMM=cublas_reference,
which runs the column-major arguments of the cuBLAS call through a reference GEMM with cuBLAS's
contract (its leading-dimension rules, C unread with beta 0); and every cell's layer, forward
and backward, padded and packed, with the projection, with the loops' GEMMs all taking that
cuBLAS mapping. tests/test_cuda.py runs the same GEMM cases on a GPU through cuBLAS itself."""

import pytest
import torch
from test_fused_cpu import _check

from fusedrnn.testing import CELLS, DRIVER_CALLS, LSTM_FAMILY, check_raw_gemm, raw_gemm_cases

ops = torch.ops.fusedrnn
F64 = torch.float64


@pytest.fixture(params=["aten", "cublas_reference"])
def step_gemm(request, monkeypatch):
    """The CPU's per-step GEMMs through ATen, or through the cuBLAS call's arguments
    (FUSEDRNN_CPU_STEP_GEMM is read per call)."""
    if request.param == "cublas_reference":
        monkeypatch.setenv("FUSEDRNN_CPU_STEP_GEMM", "cublas_reference")
    else:
        monkeypatch.delenv("FUSEDRNN_CPU_STEP_GEMM", raising=False)
    return request.param


@pytest.mark.parametrize(
    "dtype",
    [torch.float64, torch.float32, torch.bfloat16],
    ids=lambda d: str(d).replace("torch.", ""),
)
def test_raw_gemm_every_layout(step_gemm, dtype):
    gen = torch.Generator().manual_seed(0)
    for case in raw_gemm_cases():
        check_raw_gemm("cpu", dtype, case, gen)


def test_driver_calls_are_among_the_cases():
    """The transpose / beta combinations the loops use are in the grid above (with leading
    dimensions equal to the row length and past it)."""
    grid = {(ta, tb, beta) for _, _, _, ta, tb, beta, _ in raw_gemm_cases()}
    assert set(DRIVER_CALLS.values()) <= grid


def test_reference_refuses_what_cublas_refuses(monkeypatch):
    """The leading dimensions are checked before any call: below the stored row length is an
    internal error on every path."""
    c, a, b = torch.zeros(20), torch.zeros(20), torch.zeros(20)
    for env in ("aten", "cublas_reference"):
        monkeypatch.setenv("FUSEDRNN_CPU_STEP_GEMM", env)
        with pytest.raises(RuntimeError, match="leading dimensions"):
            ops._raw_gemm(c, a, b, 2, 3, 4, 3, 3, 3, False, False, 0.0)  # lda 3 < k 4
        with pytest.raises(RuntimeError, match="leading dimensions"):
            ops._raw_gemm(c, a, b, 2, 3, 4, 4, 3, 2, False, False, 0.0)  # ldc 2 < n 3


def test_raw_gemm_checks_its_buffers():
    with pytest.raises(RuntimeError, match="does not fit"):
        ops._raw_gemm(
            torch.zeros(5), torch.zeros(8), torch.zeros(12), 2, 3, 4, 4, 3, 3, False, False, 0.0
        )  # c needs 6 elements
    with pytest.raises(RuntimeError, match="dtype and device"):
        ops._raw_gemm(
            torch.zeros(6),
            torch.zeros(8, dtype=F64),
            torch.zeros(12),
            2,
            3,
            4,
            4,
            3,
            3,
            False,
            False,
            0.0,
        )


def test_gemm_backend_of_cpu_calls():
    assert ops._gemm_backend(torch.zeros(1)) == "cpu"


@pytest.fixture
def baseline_isa():
    """fp32 calls through the GEMM + step kernel loops (the baseline ISA has no fused steps)."""
    previous = ops._set_cpu_isa("baseline")
    try:
        yield
    finally:
        ops._set_cpu_isa(previous)


@pytest.mark.parametrize("layout", ["padded", "packed", "packed_reverse"])
@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [(c, 4) for c in LSTM_FAMILY])
def test_layers_through_the_cublas_arguments(baseline_isa, monkeypatch, cell, proj, layout):
    """Every GEMM of the loops, forward and backward, run as the column-major cuBLAS call the
    CUDA build makes (through the reference GEMM): outputs and every gradient against the fp64
    reference. Packed batches shrink (forward) or grow (reverse) from step to step."""
    monkeypatch.setenv("FUSEDRNN_CPU_STEP_GEMM", "cublas_reference")
    batch_sizes = None if layout == "padded" else [7, 7, 5, 4, 2, 1]
    _check(cell, 7, 11, 5, proj, batch_sizes, layout == "packed_reverse", True)
