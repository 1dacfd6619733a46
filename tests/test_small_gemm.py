"""The small GEMMs (csrc/kernels/cpu/isa/small_gemm.h): fp32 CPU steps of few rows multiply by the
weights in their row-major layout (gemm_nt forward up to 32 rows, gemm_nn backward up to 16; more
than 4 rows in groups of 4, execution/gemm.cpp) instead of calling at::mm. Row counts 1-4 and 5, 8,
13, 16, 24, 32, hidden and input sizes that leave vector remainders and weight-row remainders,
projections, packed batches that shrink to a few rows, and every cell, forward and backward, against
the fp64 reference, under every ISA the CPU has (the `cpu_isa` fixture; the baseline runs at::mm,
the same checks)."""

import pytest
import torch

from fusedrnn import cells, functional, reference

pytestmark = pytest.mark.usefixtures("cpu_isa")

F32, F64 = torch.float32, torch.float64


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
