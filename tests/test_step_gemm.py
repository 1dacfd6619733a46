"""The raw GEMM of the step loops (csrc/driver/step_device.h): C = beta * C + op(A) op(B) on
row-major matrices given by pointer, leading dimension and transpose flag, which the GEMM +
step kernel loops call once or twice per step, on the CPU through ATen and on CUDA through
cublasGemmEx (csrc/driver/cublas.cpp).

On the CPU: every transpose / beta / leading-dimension combination (the driver's among them)
through the op `_raw_gemm`, through ATen and through FUSEDRNN_CPU_STEP_GEMM=cublas_reference,
which runs the column-major arguments of the cuBLAS call through a reference GEMM with cuBLAS's
contract (its leading-dimension rules, C unread with beta 0); and every cell's layer, forward
and backward, padded and packed, with the projection, with the loops' GEMMs all taking that
cuBLAS mapping. tests/test_cuda.py runs the same GEMM cases on a GPU through cuBLAS itself."""
import itertools

import pytest
import torch

from test_fused_cpu import CELLS, LSTM_FAMILY, _check

ops = torch.ops.fusedrnn
F64 = torch.float64

# (m, n, k): single rows, columns and inner sizes, odd sizes, and k = 0 (C = beta * C)
SHAPES = [(1, 1, 1), (3, 5, 7), (17, 12, 9), (2, 33, 1), (5, 1, 16), (4, 6, 0)]
# The loops' own calls (driver/lstm.cpp, gru.cpp) as (trans_a, trans_b, beta), A the rows of a
# state or gradient buffer (row stride its width), B a weight: transposed in the forward, as
# stored in the backward, beta 1 where the step accumulates into the state's gradient.
DRIVER_CALLS = {
    "forward hg = h W_hh^T (LSTM family, GRU)": (False, True, 0.0),
    "forward p = c W_ch^T (WM)": (False, True, 0.0),
    "forward h = r W_hr^T (projection)": (False, True, 0.0),
    "backward dh = dgates W_hh (LSTM family)": (False, False, 0.0),
    "backward dr = dh W_hr (projection)": (False, False, 0.0),
    "backward dc += dp W_ch (WM)": (False, False, 1.0),
    "backward dh += dhg W_hh (GRU)": (False, False, 1.0),
}
TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # one rounding of an fp32 accumulation (two where ATen rounds op(A) op(B) before adding C)
    torch.bfloat16: dict(rtol=2 ** -6, atol=2 ** -6),
    torch.float16: dict(rtol=2 ** -9, atol=2 ** -9),
}


def raw_gemm_cases():
    """Every combination of shape, transposes, beta and padding of the leading dimensions."""
    for (m, n, k), ta, tb, beta, pad in itertools.product(
            SHAPES, (False, True), (False, True), (0.0, 1.0), (0, 3)):
        yield m, n, k, ta, tb, beta, pad


def check_raw_gemm(device, dtype, case, gen):
    """One _raw_gemm call on `device` against fp64 on the CPU: the m x n result, and the
    elements between the rows (leading dimension past the row) left exactly as they were."""
    m, n, k, ta, tb, beta, pad = case
    # at least the stored row length, and 1 (cuBLAS's rule), plus `pad`
    lda = max(m if ta else k, 1) + pad
    ldb = max(k if tb else n, 1) + pad
    ldc = max(n, 1) + pad
    a_rows, a_cols = (k, m) if ta else (m, k)
    b_rows, b_cols = (n, k) if tb else (k, n)

    def buffer(rows, ld):  # rows * ld elements, rounded to dtype; at least one
        return torch.randn(max(rows * ld, 1), generator=gen, dtype=F64).to(dtype).to(F64)

    def matrix(buf, rows, cols, ld):
        return buf[:rows * ld].view(rows, ld)[:, :cols] if rows * ld else buf[:0].view(rows, cols)

    a, b, c = buffer(a_rows, lda), buffer(b_rows, ldb), buffer(m, ldc)
    A, B = matrix(a, a_rows, a_cols, lda), matrix(b, b_rows, b_cols, ldb)
    op_a, op_b = (A.t() if ta else A), (B.t() if tb else B)
    expected = c.clone()
    matrix(expected, m, n, ldc).copy_(op_a @ op_b + (matrix(c, m, n, ldc) if beta else 0))
    got = c.to(dtype).to(device)
    if beta == 0.0 and dtype.is_floating_point:
        # with beta 0, C is not read: NaN there must not reach the result
        matrix(got, m, n, ldc).fill_(float("nan"))
    ops._raw_gemm(got, a.to(dtype).to(device), b.to(dtype).to(device), m, n, k, lda, ldb, ldc,
                  ta, tb, beta)
    got = got.cpu().to(F64)
    inside = torch.zeros(max(m * ldc, 1), dtype=torch.bool)
    matrix(inside, m, n, ldc).fill_(True)
    msg = f"{dtype} m={m} n={n} k={k} trans_a={ta} trans_b={tb} beta={beta} pad={pad}"
    assert torch.equal(got[~inside], c[~inside]), f"{msg}: wrote outside the matrix"
    torch.testing.assert_close(got[inside], expected[inside], **TOLERANCE[dtype], msg=msg)


@pytest.fixture(params=["aten", "cublas_reference"])
def step_gemm(request, monkeypatch):
    """The CPU's per-step GEMMs through ATen, or through the cuBLAS call's arguments
    (FUSEDRNN_CPU_STEP_GEMM is read per call)."""
    if request.param == "cublas_reference":
        monkeypatch.setenv("FUSEDRNN_CPU_STEP_GEMM", "cublas_reference")
    else:
        monkeypatch.delenv("FUSEDRNN_CPU_STEP_GEMM", raising=False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
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
        ops._raw_gemm(torch.zeros(5), torch.zeros(8), torch.zeros(12), 2, 3, 4, 4, 3, 3,
                      False, False, 0.0)  # c needs 6 elements
    with pytest.raises(RuntimeError, match="dtype and device"):
        ops._raw_gemm(torch.zeros(6), torch.zeros(8, dtype=F64), torch.zeros(12), 2, 3, 4, 4, 3,
                      3, False, False, 0.0)


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
