"""The fused fp32 CPU steps (csrc/cpu/fused_step.*, fused_tiles.h): one GEMM + cell pass per
step, tiled as 6 or 8 batch rows by 16 hidden units (AVX-512) or 5 rows by 8 units (AVX2). Every
tile shape (row and unit remainders), packed batches whose row count changes from step to step
in both directions, the projection and every cell against the fp64 reference, forward and
backward, under every ISA the CPU has (the `cpu_isa` fixture; baseline runs the GEMM + step
kernel path); and the unfused fp32 path (FUSEDRNN_CPU_FUSED=0) the same way."""

import os
import subprocess
import sys

import pytest
import torch

import fusedrnn
from fusedrnn import functional, reference
from fusedrnn.testing import (
    CELLS,
    LSTM_FAMILY,
    assert_close,
    cast_weights,
    cpu_flags,
    make_input,
    make_states,
    make_weights,
    max_err,
    run_layer,
    within_tolerance,
)

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("cpu_isa")


def test_fused_steps_reported(cpu_isa):
    """Every ISA but the baseline has fused steps (unless FUSEDRNN_CPU_FUSED=0)."""
    expected = cpu_isa != "baseline" and os.environ.get("FUSEDRNN_CPU_FUSED") != "0"
    assert fusedrnn.build_info()["cpu_fused_steps"] is expected
    assert fusedrnn.build_info()["cpu_isa"] == cpu_isa


def _leaves(x, w, hx, cx, dtype):
    """Copies in `dtype` (of the fp32-rounded values) that require grad."""

    def c(t):
        return None if t is None else t.detach().to(F32).to(dtype).requires_grad_()

    return c(x), {k: c(v) for k, v in w.items()}, c(hx), c(cx)


def _check(cell, B, H, I, proj, batch_sizes, reverse, with_state, long_sums=False, T=None):
    """Forward outputs and the gradients of every input, fp32 fused against the fp64 reference
    on the same (fp32-rounded) values. long_sums: the weight gradients are sums over so many rows
    (over a thousand) that fp32 rounding alone can exceed the 1e-5 of design.md §4; they are then
    held to the larger of that and twice the error of the reference loop run in fp32 (as are
    weight gradients that miss the rule, see below)."""
    # padded: enough steps for the fused path at every B (kernels/cpu/fused_step.h: at least 4 steps
    # and 32 rows; shorter calls run the unfused path)
    if T is None:
        T = len(batch_sizes) if batch_sizes is not None else max(6, -(-32 // B))
    bs = torch.tensor(batch_sizes, dtype=torch.int64) if batch_sizes is not None else None
    w64 = make_weights(cell, I, H, proj, True, scale=0.5)
    x64 = make_input(T, B, I, batch_sizes)
    Bn = batch_sizes[0] if batch_sizes is not None else B
    hx64, cx64 = make_states(cell, Bn, H, proj) if with_state else (None, None)
    results = {}
    # ref32: the reference loop in fp32, the comparator of the weight gradients below
    runs = [(F32, functional.rnn_layer), (F64, reference.layer), ("ref32", reference.layer)]
    for dtype, fn in runs:
        key = dtype
        dtype = F32 if dtype == "ref32" else dtype
        x, w, hx, cx = _leaves(x64, w64, hx64, cx64, dtype)
        out = run_layer(fn, cell, x, w, hx, cx, bs, reverse)
        torch.manual_seed(0)  # the same output gradients for both
        loss = sum(
            (o * torch.randn(o.shape, dtype=F64).to(dtype)).sum() for o in out if o is not None
        )
        loss.backward()
        grads = {
            "input": x.grad,
            "hx": hx.grad if hx is not None else None,
            "cx": cx.grad if cx is not None else None,
        }
        grads.update({k: v.grad for k, v in w.items() if v is not None})
        results[key] = (out, grads)
    (got, got_g), (ref, ref_g) = results[F32], results[F64]
    for name, g, r in zip(("output", "h_n", "c_n"), got, ref):
        if r is not None:
            assert_close(g, r, F32, f"{cell} B={B} H={H} {name}")
    for name, r in ref_g.items():
        if r is None:
            continue
        if name.startswith(("weight", "bias")) and (
            long_sums or not within_tolerance(got_g[name], r, F32)[0]
        ):
            # Weight gradients are sums over every step's rows of products carried back through
            # the recurrence: on some CPUs (an Intel Xeon with AVX-512: the working-memory cell's
            # weight_ih at B = 1, H = 70, 1.9e-5 against 1e-5) fp32 itself misses the
            # elementwise rule there, the reference loop in fp32 as much as the fused path. They
            # are then held to twice the error of that fp32 reference loop (and, for long sums,
            # at least the rule's bound on the largest value).
            err = max_err(got_g[name], r)
            err32 = max_err(results["ref32"][1][name], r)
            floor = 1e-5 * (1 + r.abs().max().item()) if long_sums else 0.0
            bound = max(2 * err32, floor)
            assert err <= bound, f"{cell} grad {name}: error {err:.3g} > {bound:.3g}"
        else:
            assert_close(got_g[name], r, F32, f"{cell} B={B} H={H} grad {name}")


# Rows per tile are 6 (4 gates) and 8 (3 gates) with AVX-512, 5 and 4 with AVX2: B covers whole
# tiles, every remainder of each. Panels are 16 units of every gate (forward) or 64 units (backward)
# with AVX-512, 8 and 32 with AVX2: H covers whole panels, a partial panel alone (5) and after whole
# ones (33, 70).
@pytest.mark.parametrize("H", [5, 16, 33, 70])
@pytest.mark.parametrize("B", [1, 5, 6, 7, 8, 11, 13, 17])
@pytest.mark.parametrize("cell", CELLS)
def test_tile_shapes(cell, B, H):
    _check(cell, B, H, I=9, proj=0, batch_sizes=None, reverse=False, with_state=True)


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("B", [32, 37])
@pytest.mark.parametrize("cell,proj", [(c, 0) for c in LSTM_FAMILY] + [("lstm", 3)])
def test_wide_short_forwards(cell, proj, B, T):
    """Fewer than 4 steps of at least 32 rows: the LSTM-family forward runs the tiles (a cell
    call at batch 32 included), the backward the GEMM steps (kernels/cpu/fused_step.h)."""
    _check(cell, B, 21, I=9, proj=proj, batch_sizes=None, reverse=False, with_state=True, T=T)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [(c, 4) for c in LSTM_FAMILY])
def test_packed_changing_row_counts(cell, proj, reverse):
    """Row counts 13, 13, 9, 7, 2, 1: tiles of a step end in the middle of the previous step's
    rows; reversed, the rows grow and new ones start from the initial state. (proj_size exists
    for the LSTM family only.)"""
    _check(
        cell,
        13,
        20,
        I=7,
        proj=proj,
        batch_sizes=[13, 13, 9, 7, 2, 1],
        reverse=reverse,
        with_state=True,
    )


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cell", CELLS)
def test_fused_steps_multithreaded(cell, dtype):
    """More than one thread splits each step's panels (8 or 16 units each) between them; the
    result is the one-thread result (each element is computed by one thread in the same order).
    80 units: 5 AVX-512 panels, which three threads cannot split into the panel pairs the bf16
    steps hand to their kernel together (gemm_panels), nor AVX2's 10 into groups of four."""
    old = torch.get_num_threads()
    x = torch.randn(4, 64, 32).to(dtype)
    w = cast_weights(make_weights(cell, 32, 80, 0, True, scale=0.3), dtype)
    try:
        torch.set_num_threads(1)
        one = run_layer(functional.rnn_layer, cell, x, w)
        torch.set_num_threads(3)
        three = run_layer(functional.rnn_layer, cell, x, w)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, three):
        if a is not None:
            assert torch.equal(a, b)


def test_unfused_fp32_path(cpu_isa):
    """FUSEDRNN_CPU_FUSED=0 (read once per process, hence a child process): fp32 goes through
    the separate GEMM + step kernel path, which the CUDA build shares, and still matches."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import fusedrnn, test_fused_cpu as t\n"
        "assert fusedrnn.build_info()['cpu_fused_steps'] is False\n"
        "for cell in t.CELLS:\n"
        "    t._check(cell, 7, 33, 9, 0, None, False, True)\n"
        "    t._check(cell, 13, 20, 7, 0, [13, 13, 9, 7, 2, 1], True, True)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FUSEDRNN_CPU_FUSED="0", FUSEDRNN_CPU_ISA=cpu_isa)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", [(c, 0) for c in CELLS] + [("lstm", 3)])
def test_backward_in_chunks(cell, proj, reverse):
    """More rows than the backward keeps per-row gradients for at a time (1024; fp32 and fp64
    on the CPU): the input and weight gradients add up over the chunks, the first step of a
    chunk reads the last gradients of the one before, and packed lengths put chunk boundaries
    between and inside runs of equal batch sizes."""
    batch_sizes = [8] * 110 + [5] * 120 + [2] * 100  # 1720 rows: two chunks
    _check(
        cell,
        8,
        6,
        I=4,
        proj=proj,
        batch_sizes=batch_sizes,
        reverse=reverse,
        with_state=True,
        long_sums=True,
    )


# ---- bf16 -----------------------------------------------------------------------------------


@pytest.fixture
def bf16_tiles():
    """bf16 calls run the tiles whatever the CPU (by default not where oneDNN's bf16 GEMMs run
    on AMX: kernels/cpu/isa.h)."""
    previous = torch.ops.fusedrnn._set_cpu_bf16_tiles("on")
    try:
        yield
    finally:
        torch.ops.fusedrnn._set_cpu_bf16_tiles(previous)


def _check_bf16(cell, B, H, I, batch_sizes=None, reverse=False, T=None):
    """A bf16 layer call long enough for the tiles (>= 4 steps, >= 32 rows): outputs and the
    gradients of every input against the fp64 reference, by the half types' rule of design.md
    §4 (at most twice the error of the reference run in bf16, plus the bf16 floor)."""
    if T is None:
        T = len(batch_sizes) if batch_sizes is not None else max(6, -(-32 // B))
    bs = torch.tensor(batch_sizes, dtype=torch.int64) if batch_sizes is not None else None
    w64 = make_weights(cell, I, H, 0, True, scale=0.5)
    x64 = make_input(T, B, I, batch_sizes)
    Bn = batch_sizes[0] if batch_sizes is not None else B
    hx64, cx64 = make_states(cell, Bn, H, 0)
    results = {}
    for name, fn, dtype in (
        ("fused", functional.rnn_layer, BF16),
        ("ref_bf16", reference.layer, BF16),
        ("ref64", reference.layer, F64),
    ):
        # the same bf16-rounded values for all three
        def leaf(t):
            return None if t is None else t.detach().to(BF16).to(dtype).requires_grad_()

        x, hx, cx = leaf(x64), leaf(hx64), leaf(cx64)
        w = {k: leaf(v) for k, v in w64.items()}
        out = run_layer(fn, cell, x, w, hx, cx, bs, reverse)
        gen = torch.Generator().manual_seed(3)
        sum(
            (o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
            for o in out
            if o is not None
        ).backward()
        grads = {"input": x.grad, "hx": hx.grad, "cx": cx.grad if cx is not None else None}
        grads.update({k: v.grad for k, v in w.items() if v is not None})
        results[name] = (out, grads)
    (got, got_g), (lowp, lowp_g), (ref, ref_g) = (
        results["fused"],
        results["ref_bf16"],
        results["ref64"],
    )
    for name, g, r, lo in zip(("output", "h_n", "c_n"), got, ref, lowp):
        if r is not None:
            assert_close(g, r, BF16, f"{cell} B={B} H={H} {name}", lo)
    for name, r in ref_g.items():
        if r is not None:
            assert_close(got_g[name], r, BF16, f"{cell} B={B} H={H} grad {name}", lowp_g[name])


# Tile remainders (rows, units), an odd and an even input size (the bf16 pairs of the dot-product
# kernels: an odd K pairs its last element with a zero).
@pytest.mark.parametrize("B,H,I", [(5, 5, 9), (7, 33, 10), (13, 70, 9), (6, 16, 1)])
@pytest.mark.parametrize("cell", CELLS)
def test_bf16_tiles(cell, B, H, I, bf16_tiles):
    _check_bf16(cell, B, H, I)


# Where the ISA has no bf16 dot product and a tile takes two passes (AVX2's 4-vector tiles: the
# LSTM family's forward steps, every backward step), the tile's bf16 rows are widened to floats
# into a buffer of 16384 floats (fused_tiles.h, kWidenFloats); sources of more columns than that
# buffer holds at the tile's height keep the widening in the broadcasts. I = 4100: the LSTM
# family's forward products with x_t and h_{t-1} are past it; H = 1100: the backward's products
# of the gate gradients (3H or 4H columns) with W_hh are past it. The other products of the same
# calls are widened or one-pass, so several ways run in one call.
@pytest.mark.parametrize("I,H", [(4100, 16), (8, 1100)], ids=["wide_input", "wide_hidden"])
@pytest.mark.parametrize("cell", CELLS)
def test_bf16_rows_past_the_widening_buffer(cell, I, H, bf16_tiles):
    _check_bf16(cell, 6, H, I)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_wm_weight_ch_gradient_large_gemm(dtype, bf16_tiles):
    """A working-memory backward whose weight_ch gradient GEMMs are large enough for oneDNN's
    matmul where the library takes it (execution/gemm.cpp: >= 2^22 multiply-adds; here
    2H x H x 1024 rows of a chunk): their operand dp_{i,f}^T is the transpose of a column block
    of the chunk's dp buffer, which gemm() hands to oneDNN as the transpose of a dense copy of
    the block's rows. Against the fp64 reference, every gradient."""
    B, H, I, T = 32, 64, 16, 32
    if dtype == BF16:
        _check_bf16("wm_lstm", B, H, I, T=T)
    else:
        _check("wm_lstm", B, H, I, 0, None, False, True, long_sums=True, T=T)


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_inference_equals_training_forward(cell, bf16_tiles):
    """A forward without grad stores no gates (the LSTM family's step kernels take their other
    branch, kernels/step_elements.h). Same cell math, so the outputs must be the same bits as
    those of a forward that saves its gates. 70 units: two 32-unit groups and a remainder; 13
    rows: two 6-row tiles and a 1-row tail."""
    _assert_inference_equals_training(cell, BF16, 13, 9, 70, T=6)


def _assert_inference_equals_training(cell, dtype, B, I, H, T=None, sizes=None, reverse=False):
    """A forward without grad and one whose weights require grad (which saves the workspace):
    the same outputs, bit for bit."""
    torch.manual_seed(0)
    w = {
        k: v.to(dtype)
        for k, v in make_weights(cell, I, H, 0, True, scale=0.5).items()
        if v is not None
    }
    x = make_input(T, B, I, sizes).to(dtype)
    bs = torch.tensor(sizes) if sizes is not None else None
    hx, cx = (None if t is None else t.to(dtype) for t in make_states(cell, B, H, 0))
    with torch.no_grad():
        inference = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, reverse)
    w = {k: v.requires_grad_() for k, v in w.items()}
    training = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, reverse)
    assert training[0].requires_grad
    for a, b in zip(inference, training):
        if a is not None:
            assert torch.equal(a, b.detach())


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_inference_equals_training_forward_over_input_chunks(cell, dtype, bf16_tiles):
    """The GRU's (and an unfused LSTM-family call's) input product x W_ih^T: in training every
    row's before the loop, in inference for spans of whole steps, both through the fused
    kernels' panel GEMM 128 rows at a time where they take the call (recurrence/buffers.h,
    InputProjection), so that each row's sums run in the same order: a packed call of 368 rows
    whose chunk boundaries fall inside steps gives the same bits both ways."""
    sizes = [40] * 3 + [37] * 4 + [20] * 5
    _assert_inference_equals_training(cell, dtype, 40, 9, 20, sizes=sizes, reverse=True)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
def test_bf16_packed_changing_row_counts(cell, reverse, bf16_tiles):
    _check_bf16(cell, 13, 20, 7, batch_sizes=[13, 13, 9, 7, 2, 1], reverse=reverse)


def test_bf16_tiles_choice(cpu_isa):
    """By default bf16 calls run the tiles unless oneDNN's bf16 GEMMs run on AMX (the CPU has
    AMX-BF16 and ONEDNN_MAX_CPU_ISA does not cap it): there ATen's GEMM per step is faster. The
    switch changes the path: the tiles round the step's pre-activations once, the GEMM per step
    its two products apiece, so the two results differ (both within the bf16 rule, above)."""
    ops = torch.ops.fusedrnn
    flags = cpu_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    amx = {"amx_bf16", "amx_tile"} <= flags and (
        not cap or cap.upper() in ("ALL", "DEFAULT") or "AMX" in cap.upper()
    )
    assert ops.cpu_onednn_bf16_amx() is amx
    previous = ops._set_cpu_bf16_tiles("auto")
    try:
        assert ops.cpu_bf16_tiles() is (not amx)
        fused = cpu_isa != "baseline" and os.environ.get("FUSEDRNN_CPU_FUSED") != "0"
        assert fusedrnn.build_info()["cpu_bf16_tiles"] is (fused and not amx)
        torch.manual_seed(0)
        lstm = fusedrnn.LSTM(24, 40).bfloat16()
        x = torch.randn(8, 8, 24).bfloat16()
        outs = {}
        for mode in ("on", "off"):
            ops._set_cpu_bf16_tiles(mode)
            assert ops.cpu_bf16_tiles() is (mode == "on")
            with torch.no_grad():
                outs[mode] = lstm(x)[0]
        assert torch.equal(outs["on"], outs["off"]) is not fused
    finally:
        ops._set_cpu_bf16_tiles(previous)
