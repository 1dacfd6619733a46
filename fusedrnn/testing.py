"""Helpers of the fusedrnn test suite and of the GPU check: the tolerance rule of design.md §4,
the layer cases and the one way to run a layer, weights, inputs and module pairs to compare, and
the CPU's instruction sets.

Why a module of the package: the tests (run by pytest from the repository) and
``scripts/gpu_check_inline.py`` (the GPU check's inline stage, a plain script run outside
pytest) must check the same thing the same way. Both import fusedrnn already, built in place or
installed, so a module of fusedrnn is what both import without putting ``tests/`` on
``sys.path`` or making the tests a package that only runs from the repository root. It depends
on torch alone and is not imported by ``import fusedrnn`` (like ``torch.testing``).
``tests/conftest.py`` keeps the fixtures and hooks and imports what it needs from here.
"""

import itertools
import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import cells as _cells

# The tests' own table of the cells (independent of the library's).
CELLS = tuple(_cells.CELLS)
LSTM_FAMILY = _cells.LSTM_FAMILY
GATES = {name: c.gates for name, c in _cells.CELLS.items()}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)  # of the CPU tests
HALF_TYPES = (torch.bfloat16, torch.float16)


# ---- the tolerance rule (design.md §4) -------------------------------------------------------
#
# A result computed in `dtype` (outputs, states, gradients) against the reference computed in
# fp64:
#   fp64, fp32   |got - ref| <= TOL + TOL |ref| elementwise
#   bf16, fp16   max|got - ref| <= 2 max|lowp - ref| + FLOOR max|ref|, where lowp is the
#                reference itself computed in that dtype

# design.md §4 says 1e-10. Fused and reference evaluate the same expressions in a different
# summation order (one big GEMM vs per-step matmuls, fused bias add); each differs by a few ulps
# (~1e-16) and a handful of steps of recurrence amplify that by at most O(10).
FP64_TOL = 1e-10
# design.md §4 says 1e-5 relative. The absolute term of 1e-5 covers elements whose true value is
# near 0, where a relative bound is meaningless: every quantity here is O(1) (gates are bounded by
# sigmoid/tanh, inputs and weights are O(1), gradients are sums of a few dozen O(1) terms), so an
# fp32 rounding error (eps 1.2e-7) carried through ~10-term dot products and a few steps stays
# well below 1e-5 absolute.
FP32_TOL = 1e-5
TOL = {torch.float64: FP64_TOL, torch.float32: FP32_TOL}

# Floors of the half types' bound, relative to max|ref|: ~2.5 ulps of the dtype (bf16 eps 2^-8 =
# 3.9e-3, fp16 eps 2^-11). The reference in that dtype can happen to be (nearly) exact on a few
# elements or a small tensor, and the rounding of a single store is the least error any such
# result can be expected to have.
BF16_FLOOR = 1e-2
FP16_FLOOR = 1.25e-3
HALF_FLOOR = {torch.bfloat16: BF16_FLOOR, torch.float16: FP16_FLOOR}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, computed in fp64; 0 for empty tensors."""
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def within_tolerance(
    got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, lowp: Optional[torch.Tensor] = None
) -> Tuple[bool, str]:
    """The rule above for one tensor: `got` (a result computed in `dtype`, in any dtype now)
    against the fp64 reference `ref`; `lowp`, the reference computed in `dtype`, for the half
    types. A result must have the reference's shape and finite values. Returns whether the rule
    holds and the bound, in words."""
    if got.shape != ref.shape:
        return False, f"shape {tuple(ref.shape)} (got {tuple(got.shape)})"
    if not torch.isfinite(got).all():
        return False, "finite values"
    if dtype in TOL:
        tol = TOL[dtype]
        err = (got.detach().double() - ref.detach().double()).abs()
        return bool((err <= tol + tol * ref.detach().double().abs()).all()), f"{tol} + {tol}|ref|"
    if dtype not in HALF_TYPES:
        raise ValueError(f"dtype: expected float64, float32, bfloat16 or float16, got {dtype}")
    if lowp is None:
        raise ValueError("lowp: the half types' rule needs the reference run in that dtype")
    floor = HALF_FLOOR[dtype] * (ref.abs().max().item() if ref.numel() else 0.0)
    bound = 2 * max_err(lowp, ref) + floor
    return max_err(got, ref) <= bound, (
        f"{bound:.3e} = 2 x the {dtype} reference's {max_err(lowp, ref):.3e} + floor {floor:.3e}"
    )


def assert_close(
    got: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    msg: str = "",
    lowp: Optional[torch.Tensor] = None,
) -> None:
    """Asserts `within_tolerance`; for the half types `got` is the result itself, of `dtype`."""
    if dtype in HALF_TYPES:
        assert got.dtype == dtype, f"{msg}: dtype {got.dtype}"
    ok, bound = within_tolerance(got, ref, dtype, lowp)
    if not ok:
        detail = f"max abs err {max_err(got, ref):.3g}" if got.shape == ref.shape else "mismatch"
        raise AssertionError(f"{msg}: {detail}, bound {bound}")


# ---- one layer ---------------------------------------------------------------------------------

# The weights of one layer (direction) in the positional order of the ops and of
# fusedrnn.functional.rnn_layer / fusedrnn.reference.layer.
WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch", "weight_hr")


def layer_args(w: dict) -> list:
    """Weights (by name; absent ones None or missing) in the positional order of the ops."""
    return [w.get(k) for k in WEIGHT_NAMES]


def run_layer(fn, cell: str, x, w: dict, hx=None, cx=None, batch_sizes=None, reverse=False):
    """Calls `fn` (fusedrnn.functional.rnn_layer or fusedrnn.reference.layer) on one layer:
    input `x`, weights `w` by name, initial states, packed batch sizes, direction."""
    return fn(
        cell,
        x,
        *layer_args(w),
        hx,
        cx if _cells.CELLS[cell].has_cell_state else None,
        batch_sizes,
        reverse,
    )


class LayerCase(NamedTuple):
    """fp64 CPU leaves (by argument name), batch_sizes, reverse and the output cotangents."""

    leaves: Dict[str, torch.Tensor]
    batch_sizes: Optional[torch.Tensor]
    reverse: bool
    cotangents: list


def make_layer_args(
    cell: str,
    layout: str,
    T: int = 8,
    B: int = 17,
    I: int = 15,
    H: int = 33,
    proj: int = 0,
    bias: bool = True,
    seed: int = 0,
) -> LayerCase:
    """The inputs of one layer call. layout "time_major" is a (T, B, I) input with initial
    states; "packed_reverse" a packed input of non-increasing batch sizes run in reverse.
    The default sizes are odd, and large enough that the max error of the half types is a
    stable statistic (on a few hundred elements the ratio of two max errors is noisy)."""
    if cell not in CELLS:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    if layout not in ("time_major", "packed_reverse"):
        raise ValueError(f"layout: expected 'time_major' or 'packed_reverse', got {layout!r}")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def uniform(*shape):  # torch's RNN initialisation, uniform in +-1/sqrt(H)
        return (torch.rand(*shape, generator=g, dtype=f64) * 2 - 1) / math.sqrt(H)

    def normal(*shape):
        return torch.randn(*shape, generator=g, dtype=f64)

    G = GATES[cell]
    H_out = proj or H
    leaves: Dict[str, torch.Tensor] = {}
    batch_sizes, reverse = None, False
    if layout == "packed_reverse":
        sizes = [max(1, B - (B * k) // T) for k in range(T)]  # non-increasing, sizes[0] = B
        batch_sizes = torch.tensor(sizes, dtype=torch.int64)
        reverse = True
        leaves["input"] = normal(sum(sizes), I)
    else:
        leaves["input"] = normal(T, B, I)
    leaves["weight_ih"] = uniform(G * H, I)
    leaves["weight_hh"] = uniform(G * H, H_out)
    if bias:
        leaves["bias_ih"] = uniform(G * H)
        leaves["bias_hh"] = uniform(G * H)
    if _cells.CELLS[cell].weight_ch is not None:
        leaves["weight_ch"] = uniform(*_cells.CELLS[cell].weight_ch_shape(H))
    if proj:
        leaves["weight_hr"] = uniform(proj, H)
    leaves["hx"] = 0.5 * normal(B, H_out)
    if _cells.CELLS[cell].has_cell_state:
        leaves["cx"] = 0.5 * normal(B, H)
    rows = leaves["input"].shape[:-1]
    cotangents = [normal(*rows, H_out), normal(B, H_out)]
    if _cells.CELLS[cell].has_cell_state:
        cotangents.append(normal(B, H))
    return LayerCase(leaves, batch_sizes, reverse, cotangents)


def layer_results(
    fn, cell: str, args: LayerCase, device: str, dtype: torch.dtype, noncontiguous: bool = False
) -> Dict[str, torch.Tensor]:
    """`run_layer` of fn on args moved to device and dtype, and its backward; returns the
    outputs and the gradient of every leaf, as fp64 CPU tensors keyed by name."""
    xs = {k: v.detach().to(device, dtype).requires_grad_() for k, v in args.leaves.items()}
    if noncontiguous:  # the same values, through a transposed (batch-first) buffer
        x = xs["input"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        assert not x.is_contiguous()
        xs["input"] = x
    out, hy, cy = run_layer(
        fn, cell, xs["input"], xs, xs["hx"], xs.get("cx"), args.batch_sizes, args.reverse
    )
    outs = [out, hy] + ([cy] if cy is not None else [])
    grads = torch.autograd.grad(
        outs, list(xs.values()), [c.to(device, dtype) for c in args.cotangents]
    )
    result = {"output": out, "h_n": hy}
    if cy is not None:
        result["c_n"] = cy
    result.update({"grad_" + k: v for k, v in zip(xs, grads)})
    return {k: v.detach().to("cpu", torch.float64) for k, v in result.items()}


# ---- weights and inputs of the op tests ------------------------------------------------------


def make_weights(
    cell: str,
    I: int,
    H: int,
    P: int = 0,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
    scale: float = 1.0,
    requires_grad: bool = False,
) -> Dict[str, Optional[torch.Tensor]]:
    """Random weights of one layer/direction of `cell`, keyed by the op's argument names.

    Absent parameters are None. Values are uniform in +-scale (default 1, larger than torch's
    +-1/sqrt(H) init so the gates are driven away from 0.5 and saturation is exercised).
    """
    G = GATES[cell]
    H_out = P if P > 0 else H

    def u(*shape):
        t = (torch.rand(*shape, dtype=torch.float64) * 2 - 1) * scale
        return t.to(dtype).requires_grad_(requires_grad)

    w = {
        "weight_ih": u(G * H, I),
        "weight_hh": u(G * H, H_out),
        "bias_ih": u(G * H) if bias else None,
        "bias_hh": u(G * H) if bias else None,
        "weight_ch": None,
        "weight_hr": None,
    }
    if _cells.CELLS[cell].weight_ch is not None:
        w["weight_ch"] = u(*_cells.CELLS[cell].weight_ch_shape(H))
    if P > 0:
        assert cell in LSTM_FAMILY
        w["weight_hr"] = u(P, H)
    return w


def cast(t, dtype):
    return None if t is None else t.detach().to(dtype)


def cast_weights(w: dict, dtype: torch.dtype, requires_grad: bool = False) -> dict:
    return {
        k: (None if v is None else v.detach().to(dtype).requires_grad_(requires_grad))
        for k, v in w.items()
    }


def make_states(cell, B, H, P=0, dtype=torch.float64):
    H_out = P if P > 0 else H
    hx = torch.randn(B, H_out, dtype=torch.float64).to(dtype)
    cx = (
        torch.randn(B, H, dtype=torch.float64).to(dtype)
        if _cells.CELLS[cell].has_cell_state
        else None
    )
    return hx, cx


def make_input(T, B, I, batch_sizes=None, dtype=torch.float64):
    """(T, B, I) input, or packed (sum(batch_sizes), I) when batch_sizes is given."""
    if batch_sizes is not None:
        return torch.randn(int(sum(batch_sizes)), I, dtype=torch.float64).to(dtype)
    return torch.randn(T, B, I, dtype=torch.float64).to(dtype)


# ---- module-level helpers ----------------------------------------------------------------------


def copy_params(src: nn.Module, dst: nn.Module) -> None:
    """Load `src`'s state_dict into `dst`, asserting identical key names (in order) and shapes."""
    sd = src.state_dict()
    dst_sd = dst.state_dict()
    assert list(sd.keys()) == list(dst_sd.keys())
    for k in sd:
        assert sd[k].shape == dst_sd[k].shape, k
    dst.load_state_dict(sd)


def make_pair(torch_cls, fused_cls, *args, dtype=torch.float64, **kwargs):
    """(torch module, fused module) with the same arguments and the torch module's weights."""
    ref = torch_cls(*args, dtype=dtype, **kwargs)
    fused = fused_cls(*args, dtype=dtype, **kwargs)
    copy_params(ref, fused)
    return ref, fused


def unpack_output(out):
    """Tensor view of a module output (PackedSequence -> its data)."""
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return out.data
    return out


def flatten_result(res):
    """(output, h_n[, c_n]) tensors of a sequence module's return value."""
    output, state = res
    tensors = [unpack_output(output)]
    if isinstance(state, tuple):
        tensors += list(state)
    else:
        tensors.append(state)
    return tensors


def backward_random_functional(tensors, seed):
    """Backward of a fixed random linear functional of every tensor (weights drawn from a
    generator seeded with `seed`, in fp64, cast to each tensor's dtype), so that every output
    contributes to every gradient."""
    gen = torch.Generator().manual_seed(seed)
    sum(
        (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
        for t in tensors
    ).backward()


def input_state_param_grads(module, input_leaf, state_leaves):
    """The gradients after a backward, by name: "input", "state0".., then every parameter."""
    grads = {"input": input_leaf.grad}
    for i, s in enumerate(state_leaves):
        grads[f"state{i}"] = s.grad
    for name, p in module.named_parameters():
        grads[name] = p.grad
    return grads


def compare_modules(ref, fused, inp, hx, dtype, check_grads=True):
    """Forward both modules on clones of `inp`/`hx`; compare outputs, final states and the
    gradients of the input, the initial state and every parameter (by name)."""

    def clone_in(x):
        if isinstance(x, nn.utils.rnn.PackedSequence):
            data = x.data.detach().clone().requires_grad_(check_grads)
            return nn.utils.rnn.PackedSequence(
                data, x.batch_sizes, x.sorted_indices, x.unsorted_indices
            ), data
        t = x.detach().clone().requires_grad_(check_grads)
        return t, t

    def clone_state(s):
        if s is None:
            return None, []
        if isinstance(s, tuple):
            ts = tuple(t.detach().clone().requires_grad_(check_grads) for t in s)
            return ts, list(ts)
        t = s.detach().clone().requires_grad_(check_grads)
        return t, [t]

    results = []
    for m in (ref, fused):
        m.zero_grad(set_to_none=True)
        x, leaf = clone_in(inp)
        h, h_leaves = clone_state(hx)
        res = m(x) if h is None else m(x, h)
        tensors = flatten_result(res)
        grads = None
        if check_grads:
            backward_random_functional(tensors, seed=1234)
            grads = input_state_param_grads(m, leaf, h_leaves)
        results.append((tensors, grads))
    (t_ref, g_ref), (t_fus, g_fus) = results
    assert len(t_ref) == len(t_fus)
    for i, (a, b) in enumerate(zip(t_fus, t_ref)):
        assert a.dtype == b.dtype, f"output {i}: dtype {a.dtype} vs {b.dtype}"
        assert_close(a, b, dtype, f"output {i}")
    if check_grads:
        assert g_ref.keys() == g_fus.keys()
        for k in g_ref:
            assert g_ref[k] is not None and g_fus[k] is not None, f"grad of {k} missing"
            assert_close(g_fus[k], g_ref[k], dtype, f"grad of {k}")
    return results


# ---- the CPU's instruction sets ----------------------------------------------------------------

# The CPU instruction sets of the vectorised kernels (csrc/kernels/cpu/isa.h). Tests that take the
# `cpu_isa` fixture (tests/conftest.py) run once under each ISA this CPU has (the lower ones
# forced), so that an AVX-512 machine tests the AVX2 and baseline kernels too; the session fails
# if such tests ran but not under every ISA the CPU has (a build that lost its AVX2 kernels, say),
# see pytest_sessionfinish there.
ISAS = ("baseline", "avx2", "avx512", "avx512_bf16")


def cpu_flags() -> set:
    """The CPU's feature flags, read from /proc/cpuinfo (independent of the library)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isas_of_cpu() -> list:
    """The ISAs of ISAS this CPU supports (the library needs AVX2 + FMA, AVX512F/BW/VL/DQ, and
    for avx512_bf16 also AVX512_BF16)."""
    f = cpu_flags()
    out = ["baseline"]
    if {"avx2", "fma"} <= f:
        out.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= f:
            out.append("avx512")
            if "avx512_bf16" in f:
                out.append("avx512_bf16")
    return out


# --- the raw GEMM of the step loops (tests/test_step_gemm.py, tests/test_cuda.py) ----------

F64 = torch.float64
# (m, n, k): single rows, columns and inner sizes, odd sizes, and k = 0 (C = beta * C); on the
# CPU (execution/gemm.cpp) m of 5-32 runs the small GEMMs in groups of 4 rows (13, 16, 29), and
# k <= 4 (under avx2 k <= 16) with m > 4 and A transposed the rank-k update (the weight gradients
# of a step of a few rows, or of a short call's rows), with n across and off a vector's width
RAW_GEMM_SHAPES = [
    (1, 1, 1),
    (3, 5, 7),
    (17, 12, 9),
    (2, 33, 1),
    (5, 1, 16),
    (4, 6, 0),
    (37, 19, 1),
    (23, 40, 3),
    (9, 16, 4),
    (13, 40, 33),
    (16, 19, 8),
    (29, 21, 18),
    (40, 70, 13),
]
# The loops' own calls (recurrence/lstm.cpp, gru.cpp) as (trans_a, trans_b, beta), A the rows of a
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
RAW_GEMM_TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    # one rounding of an fp32 accumulation (two where ATen rounds op(A) op(B) before adding C)
    torch.bfloat16: dict(rtol=2**-6, atol=2**-6),
    torch.float16: dict(rtol=2**-9, atol=2**-9),
}


def raw_gemm_cases():
    """Every combination of shape, transposes, beta and padding of the leading dimensions."""
    for (m, n, k), ta, tb, beta, pad in itertools.product(
        RAW_GEMM_SHAPES, (False, True), (False, True), (0.0, 1.0), (0, 3)
    ):
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
        return buf[: rows * ld].view(rows, ld)[:, :cols] if rows * ld else buf[:0].view(rows, cols)

    a, b, c = buffer(a_rows, lda), buffer(b_rows, ldb), buffer(m, ldc)
    A, B = matrix(a, a_rows, a_cols, lda), matrix(b, b_rows, b_cols, ldb)
    op_a, op_b = (A.t() if ta else A), (B.t() if tb else B)
    expected = c.clone()
    matrix(expected, m, n, ldc).copy_(op_a @ op_b + (matrix(c, m, n, ldc) if beta else 0))
    got = c.to(dtype).to(device)
    if beta == 0.0 and dtype.is_floating_point:
        # with beta 0, C is not read: NaN there must not reach the result
        matrix(got, m, n, ldc).fill_(float("nan"))
    torch.ops.fusedrnn._raw_gemm(
        got, a.to(dtype).to(device), b.to(dtype).to(device), m, n, k, lda, ldb, ldc, ta, tb, beta
    )
    got = got.cpu().to(F64)
    inside = torch.zeros(max(m * ldc, 1), dtype=torch.bool)
    matrix(inside, m, n, ldc).fill_(True)
    msg = f"{dtype} m={m} n={n} k={k} trans_a={ta} trans_b={tb} beta={beta} pad={pad}"
    assert torch.equal(got[~inside], c[~inside]), f"{msg}: wrote outside the matrix"
    torch.testing.assert_close(got[inside], expected[inside], **RAW_GEMM_TOLERANCE[dtype], msg=msg)
