"""The small GEMMs (csrc/kernels/cpu/isa/small_gemm.h): fp32 CPU steps of few rows multiply by the
weights in their row-major layout (gemm_nt forward up to 32 rows, gemm_nn backward up to 16; more
than 4 rows in groups of 4, execution/gemm.cpp) instead of calling at::mm. Row counts 1-4 and 5, 8,
13, 16, 24, 32, hidden and input sizes that leave vector remainders and weight-row remainders,
projections, packed batches that shrink to a few rows, and every cell, forward and backward, against
the fp64 reference, under every ISA the CPU has (the `cpu_isa` fixture; the baseline runs at::mm,
the same checks).

bf16: where ATen's bf16 GEMM is its fallback loops (no oneDNN bf16 GEMMs: CPUs without AVX-512),
the nt, nn and tn (rank update) GEMMs of few rows run in bf16 under avx2 (the elements widened in
the loads, fp32 sums, each output rounded once), instead of fp32 at::mm on fp32 copies of both
operands, made per step. Layers against the reference by the bf16 rule, the GEMMs' single
rounding, and that the steps of such a forward, and a bf16 cell's forward and backward, call no
ATen GEMM. The bf16 tests force the bf16 small GEMMs (the op _set_bf16_small_gemms) so that CPUs
whose ATen has oneDNN's bf16 GEMMs check them under avx2 too."""

import copy

import pytest
import torch

from fusedrnn import cells, functional, reference
from fusedrnn.testing import assert_close

pytestmark = pytest.mark.usefixtures("cpu_isa")

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def _weights(cell, I, H, proj):
    c = cells.CELLS[cell]
    Hout = proj or H
    u = lambda *s: torch.rand(*s, dtype=F64) - 0.5  # noqa: E731
    w = {
        "weight_ih": u(c.gates * H, I),
        "weight_hh": u(c.gates * H, Hout),
        "bias_ih": u(c.gates * H),
        "bias_hh": u(c.gates * H),
        "weight_ch": u(*c.weight_ch_shape(H)) if c.weight_ch else None,
        "weight_hr": u(proj, H) if proj else None,
    }
    return w


def _run(fn, cell, x, w, hx, cx, batch_sizes, dtype):
    leaves = [
        t.detach().to(F32).to(dtype).requires_grad_() if t is not None else None
        for t in (x, *w.values(), hx, cx)
    ]
    out, hy, cy = fn(cell, *leaves, batch_sizes)
    loss = out.sin().sum() + hy.cos().sum() + (cy.sin().sum() if cy is not None else 0)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [out, hy] + ([cy] if cy is not None else []) + list(grads)


@pytest.mark.parametrize("cell", list(cells.CELLS))
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 8, 13, 16, 24, 32])
@pytest.mark.parametrize("I,H", [(7, 5), (33, 17), (16, 48)])
def test_small_batches_match_the_reference(cell, B, I, H):
    T = 3  # fewer than 4 steps and 32 rows: the GEMM steps, not the tiles
    proj = 3 if cells.CELLS[cell].has_cell_state and H > 5 else 0
    w = _weights(cell, I, H, proj)
    x = torch.randn(T, B, I, dtype=F64)
    hx = torch.randn(B, proj or H, dtype=F64)
    cx = torch.randn(B, H, dtype=F64) if cells.CELLS[cell].has_cell_state else None
    got = _run(functional.rnn_layer, cell, x, w, hx, cx, None, F32)
    want = _run(reference.layer, cell, x, w, hx, cx, None, F64)
    for g, r in zip(got, want):
        # design.md §4's fp32 bound: every value is O(1) and a sum of at most ~50 O(1) terms
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_packed_batch_shrinking_to_few_rows(cell):
    """Steps of 6, 4, 3, 1 rows: the first runs at::mm / the tiled path, the others the small
    GEMMs, from a state whose row count changes between steps."""
    I, H = 9, 20
    w = _weights(cell, I, H, 0)
    batch_sizes = torch.tensor([6, 4, 3, 1, 1])
    x = torch.randn(int(batch_sizes.sum()), I, dtype=F64)
    hx = torch.randn(6, H, dtype=F64)
    cx = torch.randn(6, H, dtype=F64) if cells.CELLS[cell].has_cell_state else None
    got = _run(functional.rnn_layer, cell, x, w, hx, cx, batch_sizes, F32)
    want = _run(reference.layer, cell, x, w, hx, cx, batch_sizes, F64)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-5)  # as above


def test_one_step_cells_match_torch_nn():
    """The cells' single steps at B = 1 (the small GEMMs' main use) against torch.nn's cells."""
    import fusedrnn

    for ours, theirs in (
        (fusedrnn.LSTMCell, torch.nn.LSTMCell),
        (fusedrnn.GRUCell, torch.nn.GRUCell),
    ):
        t = theirs(37, 29)
        f = ours(37, 29)
        f.load_state_dict(t.state_dict())
        x = torch.randn(1, 37)
        a, b = t(x), f(x)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            # both fp32 with different summation orders: a few ulps of O(1) values
            torch.testing.assert_close(v, u, atol=2e-6, rtol=1e-5)


def _aten_bf16_gemm_is_fallback():
    """ATen's own check, which execution/gemm.cpp makes: without oneDNN's bf16 GEMMs, bf16
    at::mm is ATen's fallback loops."""
    op = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # absent without oneDNN
    return op is None or not op()


def _small_bf16_gemms(isa, forced):
    # AVX2's table has them (kernels/cpu/isa/fused_table.h); the baseline has no kernels at all
    return isa == "avx2" and (forced or _aten_bf16_gemm_is_fallback())


@pytest.fixture
def bf16_small_gemms(cpu_isa):
    """Forces the bf16 small GEMMs where the ISA has them (as ATen's fallback does), then
    restores the setting; yields whether this ISA runs them."""
    previous = torch.ops.fusedrnn._set_bf16_small_gemms(True)
    try:
        yield _small_bf16_gemms(cpu_isa, True)
    finally:
        torch.ops.fusedrnn._set_bf16_small_gemms(previous)


def _run_bf16(fn, cell, x, w, hx, cx, dtype):
    """fn's outputs and the gradients of every input, the inputs rounded to bf16 first (the same
    values for fused and reference), the gradients seeded with the same fixed fp64 weights of
    every output (as tests/test_fused_cpu.py's bf16 checks: a seed that does not depend on the
    forward's own rounding)."""
    r = lambda t: None if t is None else t.to(BF16).to(dtype).requires_grad_()  # noqa: E731
    leaves = [r(t) for t in (x, *w.values(), hx, cx)]
    out, hy, cy = fn(cell, *leaves, None)
    results = [o for o in (out, hy, cy) if o is not None]
    gen = torch.Generator().manual_seed(3)
    seed = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in results)
    grads = torch.autograd.grad(seed, [t for t in leaves if t is not None])
    return results + list(grads)


# Not the 5 units of the fp32 test: the bf16 rule compares maxima over a tensor, and over the few
# elements of a 5-unit layer's gradients the bf16 reference's own error can be a fraction of one
# rounding by chance (25 seeds of these cases at I = 7, H = 5: 3 of 7000 comparisons over the
# bound, the same 3 under the baseline ISA, whose GEMMs are fp32 at::mm). Vectors narrower than
# a register: test_bf16_small_gemm_rounds_once.
@pytest.mark.parametrize("cell", list(cells.CELLS))
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5, 13, 32])
@pytest.mark.parametrize("I,H", [(33, 17), (16, 48)])
def test_bf16_small_batches_match_the_reference(bf16_small_gemms, cell, B, I, H):
    """As the fp32 test above, in bf16: outputs, states and every gradient against the fp64
    reference by the bf16 rule (design.md §4: at most twice the error of the reference run in
    bf16, plus the bf16 floor). At B <= 4 the weight gradients' products over the initial state's
    rows are rank updates (at B = 1, over all 3 steps' rows too)."""
    T = 3  # the GEMM steps, not the tiles
    proj = 3 if cells.CELLS[cell].has_cell_state and H > 5 else 0
    w = _weights(cell, I, H, proj)
    x = torch.randn(T, B, I, dtype=F64)
    hx = torch.randn(B, proj or H, dtype=F64)
    cx = torch.randn(B, H, dtype=F64) if cells.CELLS[cell].has_cell_state else None
    got = _run_bf16(functional.rnn_layer, cell, x, w, hx, cx, BF16)
    lowp = _run_bf16(reference.layer, cell, x, w, hx, cx, BF16)
    want = _run_bf16(reference.layer, cell, x, w, hx, cx, F64)
    for i, (g, lo, r) in enumerate(zip(got, lowp, want)):
        assert_close(g, r, BF16, f"{cell} B={B} I={I} H={H} result {i}", lo)


def _bf16_ulp(v):
    """The spacing of bf16 numbers at |v| (8 significant bits); that of the smallest normal at 0."""
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0**-126)))
    return torch.pow(2.0, e - 7)


@pytest.mark.parametrize("nt", [True, False], ids=["nt", "nn"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 13, 16, 32])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("n,k", [(70, 1030), (300, 40), (5, 7)])
def test_bf16_small_gemm_rounds_once(bf16_small_gemms, cpu_isa, nt, m, beta, n, k):
    """C = beta C + A op(B) in bf16 through the step GEMM (the op `_raw_gemm`), m rows (nn: the
    backward's, at most 16 rows in the small GEMMs), with sums of 1030 terms and output columns
    that leave vector and weight-row remainders, more output columns than one block of the
    backward's buffer (256), and sizes below one vector: each result within
    one bf16 ulp of the exact value (one rounding is at most half an ulp; the other half covers
    the fp32 sum's own error, bounded by the second term). A sum rounded to bf16 more than once on
    its way (a partial sum stored in bf16 per block of weight rows) misses this by several ulps."""
    if not nt and m > 16:
        pytest.skip("the backward's small GEMMs take at most 16 rows")
    gen = torch.Generator().manual_seed(m)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(BF16)  # noqa: E731
    a, c = r(m, k), r(m, n)
    b = r(n, k) if nt else r(k, n)  # W (n x k) used transposed, or W (k x n)
    op_b = b.double().t() if nt else b.double()
    exact = a.double() @ op_b + (c.double() if beta else 0.0)
    scale = a.double().abs() @ op_b.abs() + (c.double().abs() if beta else 0.0)
    got = c.clone()
    ldb = k if nt else n
    torch.ops.fusedrnn._raw_gemm(got, a, b, m, n, k, k, ldb, n, False, nt, beta)
    err = (got.double() - exact).abs()
    # fp32 sums of 1030 terms: at most ~1030 x 2^-24 of the sum of magnitudes, 2^-14 with margin
    bound = _bf16_ulp(exact) + 2.0**-14 * scale
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{cpu_isa} m={m}: error {worst:.2f} x the bound"


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("m,n", [(70, 1030), (300, 40), (5, 7)])
def test_bf16_small_rank_update_rounds_once(bf16_small_gemms, cpu_isa, rank, beta, m, n):
    """C = beta C + A^T B in bf16, A (rank x m), B (rank x n): the weight gradients of a step of
    `rank` rows, or of a short call's rows in all, dW = dgates^T x (the op `_raw_gemm` with A
    transposed; under avx2 the bf16 rank update, of up to 4 rows or of many), rows whose length
    leaves a vector remainder and rows shorter than one vector: each result within one bf16 ulp
    of the exact value, as above (the fp32 sum of at most 17 terms is within 2^-14 of the sum of
    magnitudes with a wide margin)."""
    gen = torch.Generator().manual_seed(rank * 100 + m)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(BF16)  # noqa: E731
    a, b, c = r(rank, m), r(rank, n), r(m, n)
    exact = a.double().t() @ b.double() + (c.double() if beta else 0.0)
    scale = a.double().abs().t() @ b.double().abs() + (c.double().abs() if beta else 0.0)
    got = c.clone()
    torch.ops.fusedrnn._raw_gemm(got, a, b, m, n, rank, m, n, n, True, False, beta)
    err = (got.double() - exact).abs()
    bound = _bf16_ulp(exact) + 2.0**-14 * scale
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{cpu_isa} rank {rank}: error {worst:.2f} x the bound"


@pytest.mark.parametrize("kind", ["nt", "nn", "tn"])
def test_bf16_small_gemms_keep_nan(bf16_small_gemms, cpu_isa, kind):
    """A NaN in a row of A makes NaN of every output it is summed into, and of no other. The
    small GEMMs round each as c10::BFloat16 rounds a NaN (0x7FC0, whatever its payload: this
    one's would pass through the vectorised rounding as 0x7FC1), so that all their stores,
    vectorised or element-wise, give the same bits (ATen's conversion, on the other ISAs' route,
    gives 0xFFFF)."""
    m, n, k = (3, 40, 37) if kind != "tn" else (40, 37, 3)
    gen = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).to(BF16)  # noqa: E731
    nan = torch.tensor(0x7F81, dtype=torch.int16).view(BF16)  # a NaN, payload in the low bit
    if kind == "tn":
        a, b = r(k, m), r(k, n)  # C (m x n) = A^T B
        a[1, 5] = nan
        exact = a.double().t() @ b.double()
        args = (m, n, k, m, n, n, True, False)
    else:
        a, b = r(m, k), r(n, k) if kind == "nt" else r(k, n)
        a[1, 5] = nan
        exact = a.double() @ (b.double().t() if kind == "nt" else b.double())
        args = (m, n, k, k, k if kind == "nt" else n, n, False, kind == "nt")
    got = torch.zeros(m, n, dtype=BF16)
    torch.ops.fusedrnn._raw_gemm(got, a, b, *args, 0.0)
    assert torch.equal(got.isnan(), exact.isnan()), f"{cpu_isa} {kind}: NaN where not expected"
    nan_bits = got.view(torch.int16)[got.isnan()]
    assert nan_bits.numel() > 0, f"{cpu_isa} {kind}"
    if bf16_small_gemms:
        assert (nan_bits == 0x7FC0).all(), f"{cpu_isa} {kind}: NaN bits {nan_bits.unique()}"


def _aten_gemms(p):
    return sum(e.count for e in p.key_averages() if e.key in ("aten::mm", "aten::addmm"))


@pytest.mark.parametrize("forced", [False, True], ids=["as-built", "forced"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_small_steps_call_no_aten_gemm(cpu_isa, cell, forced):
    """A bf16 forward of 2 rows a step and 32 rows in all (input projection and steps of few
    rows): where the ISA has the bf16 small GEMMs (AVX2) and ATen's bf16 GEMM is its fallback (or
    they are forced), no aten::mm at all (each step's would convert the whole weight to fp32);
    elsewhere one per step at least, the GEMMs through ATen."""
    T, B, H = 16, 2, 24
    w = [None if v is None else v.to(BF16) for v in _weights(cell, H, H, 0).values()]
    x = torch.randn(T, B, H).to(BF16)
    hx = torch.zeros(B, H, dtype=BF16)
    cx = hx if cells.CELLS[cell].has_cell_state else None
    activities = [torch.profiler.ProfilerActivity.CPU]
    previous = torch.ops.fusedrnn._set_bf16_small_gemms(forced)
    try:
        with torch.no_grad(), torch.profiler.profile(activities=activities) as p:
            functional.rnn_layer(cell, x, *w, hx, cx, None)
    finally:
        torch.ops.fusedrnn._set_bf16_small_gemms(previous)
    mm = _aten_gemms(p)
    if _small_bf16_gemms(cpu_isa, forced):
        assert mm == 0, f"{cpu_isa}: {mm} ATen GEMMs"
    else:
        assert mm >= T, f"{cpu_isa}: {mm} ATen GEMMs, expected one a step at least"


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("module", ["LSTMCell", "GRUCell"])
def test_bf16_cell_training_step_calls_no_aten_gemm(bf16_small_gemms, cpu_isa, module, B):
    """A bf16 cell's forward and backward at B <= 4 rows under the bf16 small GEMMs: no ATen GEMM
    (the weight gradients are rank-B updates written in bf16, not an fp32 at::mm of the weight's
    shape converted after), and every gradient against torch.nn's cell in fp64 by the bf16 rule
    (its run in bf16 the low-precision reference)."""
    import fusedrnn

    torch.manual_seed(B)
    nn_cell = getattr(torch.nn, module)(40, 24).to(BF16)  # bf16 weights, the same in every run
    x, hx = torch.randn(B, 40).to(BF16), torch.randn(B, 24).to(BF16)
    lstm = module == "LSTMCell"
    states = (hx, torch.randn(B, 24).to(BF16)) if lstm else (hx,)
    seed = torch.randn(B, 24, dtype=F64)

    def grads(cell, dtype):
        cell = cell.to(dtype)
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *states)]
        inputs = (leaves[0], tuple(leaves[1:]) if lstm else leaves[1])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            out = cell(*inputs)
            h = out[0] if isinstance(out, tuple) else out
            (h.double() * seed).sum().backward()
        return [t.grad for t in (*leaves, *cell.parameters())], _aten_gemms(p)

    ours = getattr(fusedrnn, module)(40, 24).to(BF16)
    ours.load_state_dict(nn_cell.state_dict())
    got, mm = grads(ours, BF16)
    if bf16_small_gemms:
        assert mm == 0, f"{cpu_isa} {module}: {mm} ATen GEMMs"
    lowp, _ = grads(copy.deepcopy(nn_cell), BF16)
    want, _ = grads(copy.deepcopy(nn_cell), F64)
    for i, (g, lo, r) in enumerate(zip(got, lowp, want)):
        assert_close(g, r, BF16, f"{cpu_isa} {module} B={B} gradient {i}", lo)
