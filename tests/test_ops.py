"""Op-level tests: torch.ops.fusedrnn.* and fusedrnn.functional.rnn_layer against
fusedrnn.reference.layer (design.md §1, §3, §4)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrnn
from fusedrnn import cells, functional, reference
from fusedrnn.testing import (
    CELLS,
    DTYPES,
    LSTM_FAMILY,
    WEIGHT_NAMES,
    assert_close,
    cast,
    cast_weights,
    layer_args,
    make_input,
    make_states,
    make_weights,
    run_layer,
)

F64 = torch.float64
F32 = torch.float32
BF16 = torch.bfloat16

# Default shapes of the op tests: small and all different so that a transposed dimension shows.
T, B, I, H, P = 4, 3, 6, 5, 2
PACKED = [3, 3, 2, 1]  # batch sizes of a packed batch of lengths (4, 3, 2)


def _dname(d):
    return str(d).replace("torch.", "")


def _cell_proj_cases():
    return [(c, p) for c in CELLS for p in ((0, P) if c in LSTM_FAMILY else (0,))]


def _case(cell, proj, packed, bias, with_state, dtype=F64, T_=T, B_=B, I_=I, H_=H, scale=1.0):
    """(x, weights, hx, cx, batch_sizes) in `dtype`; values are exactly representable in it."""
    bs = (
        torch.tensor(PACKED if B_ == 3 and T_ == 4 else [B_] * T_, dtype=torch.int64)
        if packed
        else None
    )
    w = cast_weights(make_weights(cell, I_, H_, proj, bias, scale=scale), dtype)
    x = make_input(T_, B_, I_, bs.tolist() if packed else None, dtype)
    Bn = bs[0].item() if packed else B_
    hx, cx = make_states(cell, Bn, H_, proj, dtype) if with_state else (None, None)
    return x, w, hx, cx, bs


def _ref64(cell, x, w, hx, cx, bs, reverse):
    """fp64 reference on the (cast) values of the inputs."""
    return run_layer(
        reference.layer,
        cell,
        cast(x, F64),
        cast_weights(w, F64),
        cast(hx, F64),
        cast(cx, F64),
        bs,
        reverse,
    )


def _check_results(cell, got, ref64, dtype, ref_lowp=None):
    names = ("output", "h_n", "c_n")
    if cell not in LSTM_FAMILY:
        assert got[2] is None
    for name, g, r, rl in zip(names, got, ref64, ref_lowp or (None,) * 3):
        if r is None:
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert_close(g, r, dtype, name, rl)


def test_backend_is_fused():
    """The compiled ops are what this environment runs (a silent fallback would make every
    comparison below compare the reference with itself)."""
    assert fusedrnn.backend() == "fused", fusedrnn._ops.LOAD_ERROR
    assert fusedrnn.build_info()["cpu"] is True
    for cell in CELLS:
        assert hasattr(torch.ops.fusedrnn, f"{cell}_forward")
        assert hasattr(torch.ops.fusedrnn, f"{cell}_backward")


# ---- forward against the fp64 reference ---------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("cell,proj", _cell_proj_cases(), ids=lambda v: str(v))
def test_forward_matches_reference(cell, proj, dtype, packed, reverse, bias, with_state):
    x, w, hx, cx, bs = _case(cell, proj, packed, bias, with_state, dtype)
    got = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, reverse)
    ref = _ref64(cell, x, w, hx, cx, bs, reverse)
    H_out = proj or H
    rows = sum(PACKED) if packed else None
    assert got[0].shape == ((rows, H_out) if packed else (T, B, H_out))
    assert got[1].shape == (PACKED[0] if packed else B, H_out)
    if cell in LSTM_FAMILY:
        assert got[2].shape == (PACKED[0] if packed else B, H)
    ref_lowp = None
    if dtype == BF16:
        ref_lowp = run_layer(reference.layer, cell, x, w, hx, cx, bs, reverse)
    _check_results(cell, got, ref, dtype, ref_lowp)
    # the raw op gives the same tensors as the functional wrapper
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward")
    if cell not in LSTM_FAMILY:
        raw = op(x, *layer_args(w)[:4], hx, bs, reverse)
        assert torch.equal(raw[0], got[0]) and torch.equal(raw[1], got[1])
    else:
        raw = op(x, *layer_args(w), hx, cx, bs, reverse)
        for a, b in zip(raw[:3], got):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F64, F32], ids=_dname)
@pytest.mark.parametrize("cell", CELLS)
def test_inputs_not_modified(cell, dtype):
    """The ops do not write into their inputs (the states are updated in copies)."""
    x, w, hx, cx, bs = _case(cell, 0, True, True, True, dtype)
    before = [t.clone() for t in [x, hx, cx] + layer_args(w) if t is not None]
    out = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, False)
    out[0].sum()  # touch
    after = [t for t in [x, hx, cx] + layer_args(w) if t is not None]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=_dname)
@pytest.mark.parametrize("cell", CELLS)
def test_forward_vectorised_body_and_tail(cell, dtype, cpu_isa):
    """H = 37: the unit loop runs whole vectors (8/16 lanes) plus a remainder; the step kernels
    of every ISA the CPU has (kernels/cpu/step_loops.h, compiled per ISA), every dtype."""
    proj = 3 if cell in LSTM_FAMILY else 0
    x, w, hx, cx, bs = _case(cell, proj, True, True, True, dtype, H_=37, scale=0.3)
    got = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, True)
    ref = _ref64(cell, x, w, hx, cx, bs, True)
    ref_lowp = run_layer(reference.layer, cell, x, w, hx, cx, bs, True) if dtype == BF16 else None
    _check_results(cell, got, ref, dtype, ref_lowp)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_multithreaded(cell):
    """Enough rows per step that the step kernel runs in parallel over the batch
    (grain = 16384 / H rows), with two threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Hh, Bb = 256, 160  # grain 64 rows -> 3 tasks per step
        x, w, hx, cx, bs = _case(
            cell, 0, False, True, True, F32, T_=2, B_=Bb, I_=8, H_=Hh, scale=0.1
        )
        got = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, False)
        torch.set_num_threads(1)
        one = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, False)
    finally:
        torch.set_num_threads(old)
    ref = _ref64(cell, x, w, hx, cx, bs, False)
    _check_results(cell, got, ref, F32)
    _check_results(cell, one, ref, F32)


# ---- special shapes and layouts --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32], ids=_dname)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 3, 5), (1, 4, 2, 1), (5, 1, 3, 5), (3, 2, 1, 7)],
    ids=lambda s: "T%dB%dI%dH%d" % s,
)
def test_odd_shapes(cell, dtype, shape, cpu_isa):
    """Sequence length 1, batch 1, hidden 1, input 1, odd sizes; forward and gradients, under
    every ISA the CPU has."""
    T_, B_, I_, H_ = shape
    proj = 0 if (cell not in LSTM_FAMILY or H_ < 3) else H_ - 2
    x, w, hx, cx, bs = _case(cell, proj, False, True, True, dtype, T_=T_, B_=B_, I_=I_, H_=H_)
    _check_forward_and_grads(cell, x, w, hx, cx, bs, False, dtype)


def _check_forward_and_grads(cell, x, w, hx, cx, bs, reverse, dtype, views=None):
    """Forward and the gradients of every input of the fused layer against the fp64 reference
    (autograd through reference.layer). `views` maps a leaf name ("x", "hx", "cx" or a weight
    name) to a differentiable function applied to the leaf before the fused call only (used to
    hand the op strided tensors)."""
    views = views or {}
    leaves = {"x": x, "hx": hx, "cx": cx, **w}
    fused_leaves = {
        k: (v.detach().clone().requires_grad_() if v is not None else None)
        for k, v in leaves.items()
    }
    ref_leaves = {
        k: (cast(v, F64).requires_grad_() if v is not None else None) for k, v in leaves.items()
    }

    def run(fn, lv):
        wd = {k: lv[k] for k in WEIGHT_NAMES}
        return run_layer(fn, cell, lv["x"], wd, lv["hx"], lv["cx"], bs, reverse)

    fused_in = {
        k: (views[k](v) if k in views and v is not None else v) for k, v in fused_leaves.items()
    }
    for k in views:
        if fused_in[k] is not None:
            assert not fused_in[k].is_contiguous(), k
    got = run(functional.rnn_layer, fused_in)
    ref = run(reference.layer, ref_leaves)
    _check_results(cell, got, ref, dtype)
    gen = torch.Generator().manual_seed(7)
    cot = [torch.randn(r.shape, generator=gen, dtype=F64) if r is not None else None for r in ref]
    sum((g * c.to(g.dtype)).sum() for g, c in zip(got, cot) if g is not None).backward()
    sum((r * c).sum() for r, c in zip(ref, cot) if r is not None).backward()
    for k in leaves:
        if leaves[k] is None:
            continue
        assert fused_leaves[k].grad is not None, f"no gradient for {k}"
        assert_close(fused_leaves[k].grad, ref_leaves[k].grad, dtype, f"grad {k}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_non_contiguous_inputs(cell, packed):
    """Strided input (transposed view / every other column), transposed weights, strided
    states: same results as on contiguous copies, gradients included."""
    proj = P if cell in LSTM_FAMILY else 0
    x, w, hx, cx, bs = _case(cell, proj, packed, True, True, F64)

    def every_other_column(t):  # a (rows, I) view with column stride 2
        return torch.stack([t, torch.full_like(t, float("nan"))], -1).flatten(-2)[:, ::2]

    def transposed(t):  # same values, column-major strides
        return t.t().contiguous().t()

    def batch_major(t):  # (T, B, I) view of a (B, T, I) tensor
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    views = {"x": every_other_column if packed else batch_major, "hx": transposed, "cx": transposed}
    views.update({k: transposed for k, v in w.items() if v is not None and v.dim() == 2})
    strided = {
        k: (views[k](v) if k in views and v is not None else v)
        for k, v in dict(x=x, hx=hx, cx=cx, **w).items()
    }
    assert torch.equal(strided["x"], x) and not strided["x"].is_contiguous()
    got = run_layer(
        functional.rnn_layer,
        cell,
        strided["x"],
        {k: strided[k] for k in WEIGHT_NAMES},
        strided["hx"],
        strided["cx"],
        bs,
        False,
    )
    exp = run_layer(functional.rnn_layer, cell, x, w, hx, cx, bs, False)
    for a, b in zip(got, exp):
        if b is not None:
            assert_close(a, b, F64)
    _check_forward_and_grads(cell, x, w, hx, cx, bs, True, F64, views)


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_grad_output(cell):
    """The gradient of the output arriving as a strided tensor (output used through a
    transpose) gives the same gradients as the reference."""
    x, w, hx, cx, bs = _case(cell, 0, False, True, True, F64)
    xl = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    out = functional.rnn_layer(cell, xl, *layer_args(w), hx, cx)[0]
    ref = reference.layer(cell, xr, *layer_args(w), hx, cx)[0]
    cot = torch.randn(B, T, out.shape[-1], dtype=F64)
    (out.transpose(0, 1) * cot).sum().backward()
    (ref.transpose(0, 1) * cot).sum().backward()
    assert_close(xl.grad, xr.grad, F64, "grad x")


@pytest.mark.parametrize("which", ["hx_only", "cx_only"])
@pytest.mark.parametrize("cell", LSTM_FAMILY)
def test_one_initial_state_only(cell, which):
    """hx given and cx None (zeros), or the other way round: forward and gradients."""
    x, w, hx, cx, bs = _case(cell, P, True, True, True, F64)
    if which == "hx_only":
        cx = None
    else:
        hx = None
    _check_forward_and_grads(cell, x, w, hx, cx, bs, False, F64)


@pytest.mark.parametrize("cell", CELLS)
def test_only_state_gradients(cell):
    """Loss on h_n / c_n only (no gradient flows into `output`)."""
    x, w, hx, cx, bs = _case(cell, 0, True, True, True, F64)
    for which in ((1,), (2,) if cell in LSTM_FAMILY else (1,)):
        xl, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = functional.rnn_layer(cell, xl, *layer_args(w), hx, cx, bs)
        ref = reference.layer(cell, xr, *layer_args(w), hx, cx, bs)
        sum(got[i].sum() for i in which).backward()
        sum(ref[i].sum() for i in which).backward()
        assert_close(xl.grad, xr.grad, F64, f"grad x from outputs {which}")


# ---- gradients -----------------------------------------------------------------------------


def _grad_cases():
    out = []
    for cell in CELLS:
        for packed in (False, True):
            for reverse in (False, True):
                for proj in (0, 2) if cell in LSTM_FAMILY else (0,):
                    out.append((cell, packed, reverse, proj))
    return out


@pytest.mark.parametrize("cell,packed,reverse,proj", _grad_cases(), ids=lambda v: str(v))
def test_gradcheck_fp64(cell, packed, reverse, proj):
    """torch.autograd.gradcheck of the fused layer w.r.t. input, hx, cx and every weight."""
    T_, B_, I_, H_ = 3, 2, 2, 3
    bs = torch.tensor([2, 2, 1]) if packed else None
    w = make_weights(cell, I_, H_, proj, True, F64, requires_grad=True)
    x = make_input(T_, B_, I_, [2, 2, 1] if packed else None).requires_grad_()
    hx, cx = make_states(cell, B_, H_, proj)
    hx.requires_grad_()
    names = (
        ["x", "hx"]
        + (["cx"] if cell in LSTM_FAMILY else [])
        + [k for k in WEIGHT_NAMES if w[k] is not None]
    )
    tensors = (
        [x, hx]
        + ([cx.requires_grad_()] if cell in LSTM_FAMILY else [])
        + [w[k] for k in WEIGHT_NAMES if w[k] is not None]
    )

    def fn(*args):
        d = dict(zip(names, args))
        wd = {k: d.get(k) for k in WEIGHT_NAMES}
        out = functional.rnn_layer(cell, d["x"], *layer_args(wd), d["hx"], d.get("cx"), bs, reverse)
        return tuple(o for o in out if o is not None)

    # Central differences with eps = 1e-6 on O(1) functions: truncation error ~eps^2 = 1e-12,
    # rounding error ~1e-16 / eps = 1e-10. atol 1e-7 / rtol 1e-5 (tighter than gradcheck's
    # defaults 1e-5 / 1e-3) leave ~1000x room over both and still catch a wrong term.
    assert torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("cell,packed,reverse,proj", _grad_cases(), ids=lambda v: str(v))
def test_gradients_fp32_vs_fp64_reference(cell, packed, reverse, proj):
    """fp32 fused gradients of every input against fp64 reference autograd (design.md §4 fp32)."""
    x, w, hx, cx, bs = _case(cell, proj, packed, True, True, F32, scale=0.5)
    _check_forward_and_grads(cell, x, w, hx, cx, bs, reverse, F32)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradients_fp64_vs_reference(cell, bias):
    """fp64 fused gradients against reference autograd at 1e-10, no-bias included."""
    proj = P if cell in LSTM_FAMILY else 0
    for packed in (False, True):
        x, w, hx, cx, bs = _case(cell, proj, packed, bias, True, F64)
        _check_forward_and_grads(cell, x, w, hx, cx, bs, packed, F64)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradients_bf16(cell, packed, cpu_isa):
    """bf16 gradients of every input: error against fp64 reference autograd at most twice that
    of the reference autograd run in bf16, plus the bf16 floor of the tolerance rule; under every
    ISA the CPU has."""
    proj = P if cell in LSTM_FAMILY else 0
    x, w, hx, cx, bs = _case(cell, proj, packed, True, True, BF16, scale=0.5)
    leaves = {"x": x, "hx": hx, "cx": cx, **w}
    grads = {}
    for name, fn, dt in (
        ("fused", functional.rnn_layer, BF16),
        ("ref_bf16", reference.layer, BF16),
        ("ref64", reference.layer, F64),
    ):
        lv = {
            k: (cast(v, dt).requires_grad_() if v is not None else None) for k, v in leaves.items()
        }
        out = run_layer(
            fn,
            cell,
            lv["x"],
            {k: lv[k] for k in WEIGHT_NAMES},
            lv["hx"],
            lv["cx"],
            bs,
            reverse=True,
        )
        gen = torch.Generator().manual_seed(3)
        sum(
            (o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
            for o in out
            if o is not None
        ).backward()
        grads[name] = {k: v.grad for k, v in lv.items() if v is not None}
    for k in grads["ref64"]:
        assert_close(grads["fused"][k], grads["ref64"][k], BF16, f"grad {k}", grads["ref_bf16"][k])


@pytest.mark.parametrize("dtype", [F64, F32], ids=_dname)
@pytest.mark.parametrize("cell", CELLS)
def test_nan_and_saturation(cell, dtype):
    """NaN in the input propagates to exactly the elements where the reference has NaN;
    huge and infinite pre-activations saturate the gates as in the reference (no overflow
    to NaN in the fused exp/tanh)."""
    x, w, hx, cx, bs = _case(cell, 0, False, True, True, dtype)
    x[1, 0, 0] = float("nan")
    x[2, 1, :] = 1e4
    x[0, 2, 1] = float("-inf")
    x[3, 2, 2] = float("inf")
    got = run_layer(functional.rnn_layer, cell, x, w, hx, cx)
    ref = _ref64(cell, x, w, hx, cx, None, False)
    for name, g, r in zip(("output", "h_n", "c_n"), got, ref):
        if r is None:
            continue
        assert r.isnan().any() and not r.isnan().all()  # the case is meaningful
        assert torch.equal(g.isnan(), r.isnan()), f"{name}: NaN positions differ"
        keep = ~r.isnan()
        assert_close(g[keep], r[keep], dtype, name)


@pytest.mark.parametrize("cell", CELLS)
def test_inplace_modification_of_saved_inputs_detected(cell):
    """Tensors the backward needs (input, initial state, weights) modified in place after the
    forward make backward raise instead of returning wrong gradients."""
    x, w, hx, cx, bs = _case(cell, 0, False, True, True, F64)
    wl = cast_weights(w, F64, requires_grad=True)
    for target in ("x", "hx", "weight_hh"):
        xl = x.clone().requires_grad_()
        hl = hx.clone().requires_grad_()
        xi, hi = xl * 1, hl * 1  # non-leaf, so they may be modified in place
        out = functional.rnn_layer(cell, xi, *layer_args(wl), hi, cx)
        with torch.no_grad():
            {"x": xi, "hx": hi, "weight_hh": wl["weight_hh"]}[target].mul_(1.5)
        with pytest.raises(RuntimeError, match="inplace"):
            out[0].sum().backward()


@pytest.mark.parametrize("cell", CELLS)
def test_empty_batch_and_sequence(cell):
    """B = 0: empty outputs and gradients of the right shapes. T = 0 (padded): empty output,
    the final state is the initial state."""
    proj = P if cell in LSTM_FAMILY else 0
    w = make_weights(cell, I, H, proj, True, F64, requires_grad=True)
    x = torch.randn(T, 0, I, dtype=F64, requires_grad=True)
    out = functional.rnn_layer(cell, x, *layer_args(w))
    assert out[0].shape == (T, 0, proj or H) and out[1].shape == (0, proj or H)
    out[0].sum().backward()
    assert x.grad.shape == x.shape
    x0 = torch.randn(0, B, I, dtype=F64)
    hx, cx = make_states(cell, B, H, proj)
    out = functional.rnn_layer(cell, x0, *layer_args(w), hx, cx)
    assert out[0].shape == (0, B, proj or H)
    assert torch.equal(out[1], hx)
    if cell in LSTM_FAMILY:
        assert torch.equal(out[2], cx)


# ---- output_mask and skipped gradients -----------------------------------------------------


class _LogFused(TorchDispatchMode):
    """Records every fusedrnn op call and its output_mask."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("fusedrnn."):
            self.calls.append((name, list(args[-1]) if "backward" in name else None))
        return func(*args, **(kwargs or {}))


def _fwd_bwd_args(cell, x, w, hx, cx, bs, reverse, out, go, ghy, gcy, mask):
    if cell not in LSTM_FAMILY:
        return (go, ghy, x, *layer_args(w)[:4], hx, bs, reverse, out[0], out[2], mask)
    return (go, ghy, gcy, x, *layer_args(w), hx, cx, bs, reverse, out[0], out[3], mask)


def _forward_op(cell, x, w, hx, cx, bs, reverse):
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward")
    if cell not in LSTM_FAMILY:
        return op(x, *layer_args(w)[:4], hx, bs, reverse)
    return op(x, *layer_args(w), hx, cx, bs, reverse)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_output_mask(cell):
    """mask[0] False: grad_input is empty; mask[1] False: every weight gradient is empty; the
    gradients that are computed equal those of the full call."""
    proj = P if cell in LSTM_FAMILY else 0
    x, w, hx, cx, bs = _case(cell, proj, True, True, True, F64)
    out = _forward_op(cell, x, w, hx, cx, bs, False)
    go = torch.randn_like(out[0])
    ghy = torch.randn_like(out[1])
    gcy = torch.randn_like(out[2]) if cell in LSTM_FAMILY else None
    bwd = getattr(torch.ops.fusedrnn, f"{cell}_backward")
    full = bwd(*_fwd_bwd_args(cell, x, w, hx, cx, bs, False, out, go, ghy, gcy, [True, True]))
    n_states = 1 if cell not in LSTM_FAMILY else 2
    assert full[0].shape == x.shape
    no_input = bwd(*_fwd_bwd_args(cell, x, w, hx, cx, bs, False, out, go, ghy, gcy, [False, True]))
    assert no_input[0].shape == (0,), "grad_input must be empty when output_mask[0] is False"
    for a, b in zip(no_input[1:], full[1:]):
        assert torch.equal(a, b)
    no_weights = bwd(
        *_fwd_bwd_args(cell, x, w, hx, cx, bs, False, out, go, ghy, gcy, [True, False])
    )
    assert torch.equal(no_weights[0], full[0])
    for i in range(1, 1 + n_states):
        assert torch.equal(no_weights[i], full[i])
    for i, t in enumerate(no_weights[1 + n_states :]):
        assert t.shape == (0,), f"weight gradient {i} must be empty when output_mask[1] is False"
    # the full call against the reference
    leaves = [x, hx, cx] + layer_args(w)
    ref_leaves = [t.clone().requires_grad_() if t is not None else None for t in leaves]
    xr, hr, cr, *wr = ref_leaves
    ref = reference.layer(cell, xr, *wr, hr, cr, bs, False)
    loss = (ref[0] * go).sum() + (ref[1] * ghy).sum()
    if cell in LSTM_FAMILY:
        loss = loss + (ref[2] * gcy).sum()
    loss.backward()
    expected = (
        [xr.grad, hr.grad]
        + ([cr.grad] if cell in LSTM_FAMILY else [])
        + [t.grad for t in wr if t is not None]
    )
    if cell not in LSTM_FAMILY:
        got = list(full)
    else:  # the op always returns 9 tensors; drop the slots of absent arguments
        got = list(full[:3]) + [g for g, t in zip(full[3:], wr) if t is not None]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, F64, f"backward output {i}")


@pytest.mark.parametrize("cell", CELLS)
def test_weight_grads_skipped_when_not_required(cell):
    """Weights that do not require grad: the backward op is called with output_mask[1] False,
    and the gradients of input and states still match the reference. Input not requiring grad:
    output_mask[0] False, weight gradients still match."""
    proj = P if cell in LSTM_FAMILY else 0
    x, w, hx, cx, bs = _case(cell, proj, True, True, True, F64)
    # 1. only input and states require grad
    xl, hl = x.clone().requires_grad_(), hx.clone().requires_grad_()
    cl = cx.clone().requires_grad_() if cx is not None else None
    with _LogFused() as log:
        got = functional.rnn_layer(cell, xl, *layer_args(w), hl, cl, bs)
        sum(g.sum() for g in got if g is not None).backward()
    assert log.calls == [
        (f"fusedrnn.{cell}_forward.default", None),
        (f"fusedrnn.{cell}_backward.default", [True, False]),
    ]
    xr, hr = x.clone().requires_grad_(), hx.clone().requires_grad_()
    cr = cx.clone().requires_grad_() if cx is not None else None
    ref = reference.layer(cell, xr, *layer_args(w), hr, cr, bs)
    sum(r.sum() for r in ref if r is not None).backward()
    assert_close(xl.grad, xr.grad, F64, "grad x")
    assert_close(hl.grad, hr.grad, F64, "grad hx")
    if cx is not None:
        assert_close(cl.grad, cr.grad, F64, "grad cx")
    # 2. only the weights require grad
    wl = cast_weights(w, F64, requires_grad=True)
    wr = cast_weights(w, F64, requires_grad=True)
    with _LogFused() as log:
        got = functional.rnn_layer(cell, x, *layer_args(wl), hx, cx, bs)
        sum(g.sum() for g in got if g is not None).backward()
    assert log.calls[-1] == (f"fusedrnn.{cell}_backward.default", [False, True])
    ref = reference.layer(cell, x, *layer_args(wr), hx, cx, bs)
    sum(r.sum() for r in ref if r is not None).backward()
    for k in WEIGHT_NAMES:
        if wl[k] is not None:
            assert_close(wl[k].grad, wr[k].grad, F64, f"grad {k}")


# ---- opcheck -------------------------------------------------------------------------------


def _opcheck_cases():
    return [
        (c, d, packed, opt)
        for c in CELLS
        for d in (F32, F64)
        for packed in (False, True)
        for opt in (False, True)
    ]


@pytest.mark.parametrize(
    "cell,dtype,packed,optional_args",
    _opcheck_cases(),
    ids=lambda v: _dname(v) if isinstance(v, torch.dtype) else str(v),
)
def test_opcheck_forward(cell, dtype, packed, optional_args):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) of the
    forward op, with every optional argument given or only the required ones."""
    proj = P if (optional_args and cell in LSTM_FAMILY) else 0
    x, w, hx, cx, bs = _case(cell, proj, packed, optional_args, optional_args, dtype)
    if cell not in LSTM_FAMILY:
        args = (x, *layer_args(w)[:4], hx, bs, True)
    else:
        args = (x, *layer_args(w), hx, cx, bs, True)
    # with inputs that require grad, test_autograd_registration and the AOT test exercise the
    # registered autograd formula
    args = tuple(
        a.detach().clone().requires_grad_()
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    )
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward").default
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def _opcheck_bwd_cases():
    return [
        (c, m, packed_opt)
        for c in CELLS
        for m in ((True, True), (False, True))
        for packed_opt in ("padded_all_optional", "packed_no_optional")
    ]


@pytest.mark.parametrize("cell,mask,variant", _opcheck_bwd_cases(), ids=lambda v: str(v))
def test_opcheck_backward(cell, mask, variant):
    """opcheck of the backward op on inputs produced by the forward. The backward op has no
    autograd formula of its own (no double backward); its inputs here do not require grad, so
    test_autograd_registration only checks that no autograd kernel is needed, and every util
    runs."""
    packed = variant.startswith("packed")
    opt = variant.endswith("all_optional")
    proj = P if (opt and cell in LSTM_FAMILY) else 0
    x, w, hx, cx, bs = _case(cell, proj, packed, opt, opt, F64)
    out = _forward_op(cell, x, w, hx, cx, bs, packed)
    go = torch.randn_like(out[0])
    ghy = torch.randn_like(out[1]) if opt else None
    gcy = torch.randn_like(out[2]) if (opt and cell in LSTM_FAMILY) else None
    args = _fwd_bwd_args(cell, x, w, hx, cx, bs, packed, out, go, ghy, gcy, list(mask))
    op = getattr(torch.ops.fusedrnn, f"{cell}_backward").default
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ---- errors --------------------------------------------------------------------------------


def _good(cell, dtype=F64):
    return _case(cell, 0, True, True, True, dtype)


def _call(cell, x, w, hx, cx, bs, reverse=False):
    return _forward_op(cell, x, w, hx, cx, bs, reverse)


@pytest.mark.parametrize("cell", CELLS)
def test_error_weight_ih_shape(cell):
    x, w, hx, cx, bs = _good(cell)
    w["weight_ih"] = w["weight_ih"][:, :-1]  # wrong input_size
    with pytest.raises(RuntimeError, match="weight_ih"):
        _call(cell, x, w, hx, cx, bs)
    x, w, hx, cx, bs = _good(cell)
    w["weight_ih"] = w["weight_ih"][:-1]  # rows not a multiple of the gate count
    with pytest.raises(RuntimeError, match="weight_ih"):
        _call(cell, x, w, hx, cx, bs)


@pytest.mark.parametrize("cell", CELLS)
def test_error_weight_hh_shape(cell):
    x, w, hx, cx, bs = _good(cell)
    w["weight_hh"] = w["weight_hh"][:, :-1]
    with pytest.raises(RuntimeError, match="weight_hh"):
        _call(cell, x, w, hx, cx, bs)


@pytest.mark.parametrize("cell", CELLS)
def test_error_state_shapes(cell):
    x, w, hx, cx, bs = _good(cell)
    with pytest.raises(RuntimeError, match="hx"):
        _call(cell, x, w, hx[:-1], cx, bs)
    with pytest.raises(RuntimeError, match="hx"):
        _call(cell, x, w, hx[:, :-1], cx, bs)
    if cell in LSTM_FAMILY:
        with pytest.raises(RuntimeError, match="cx"):
            _call(cell, x, w, hx, cx[:, :-1], bs)


@pytest.mark.parametrize("cell", CELLS)
def test_error_dtype_mismatch(cell):
    x, w, hx, cx, bs = _good(cell)
    w32 = dict(w, weight_hh=w["weight_hh"].float())
    with pytest.raises(RuntimeError, match="weight_hh"):
        _call(cell, x, w32, hx, cx, bs)
    with pytest.raises(RuntimeError, match="hx"):
        _call(cell, x, w, hx.float(), cx, bs)
    w32 = dict(w, bias_ih=w["bias_ih"].float())
    with pytest.raises(RuntimeError, match="bias_ih"):
        _call(cell, x, w32, hx, cx, bs)
    with pytest.raises(RuntimeError, match="input"):
        _call(cell, x.to(torch.int64), w, hx, cx, bs)


@pytest.mark.parametrize("cell", CELLS)
def test_error_batch_sizes(cell):
    x, w, hx, cx, bs = _good(cell)
    with pytest.raises(RuntimeError, match="batch_sizes"):  # increasing
        _call(cell, x, w, None, None, torch.tensor([1, 2, 3, 3]))
    with pytest.raises(RuntimeError, match="batch_sizes"):  # sum != input rows
        _call(cell, x, w, hx, cx, torch.tensor([3, 3, 2]))
    with pytest.raises(RuntimeError, match="batch_sizes"):  # not int64
        _call(cell, x, w, hx, cx, torch.tensor(PACKED, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="batch_sizes"):  # zero entry
        _call(cell, x, w, hx, cx, torch.tensor([3, 3, 3, 0]))
    with pytest.raises(RuntimeError, match="batch_sizes"):  # 2-D
        _call(cell, x, w, hx, cx, torch.tensor(PACKED).view(2, 2))
    with pytest.raises(RuntimeError, match="input"):  # padded input with batch_sizes
        _call(cell, x.view(9, 1, I), w, None, None, torch.tensor(PACKED))
    with pytest.raises(RuntimeError, match="input"):  # packed input without batch_sizes
        _call(cell, x, w, None, None, None)


@pytest.mark.parametrize("cell", LSTM_FAMILY)
def test_error_weight_ch_presence(cell):
    """A cell with a weight_ch refuses a call without one and one of another cell's shape
    ((3, H) peepholes vs (3H, H) working-memory connections); a cell without one refuses it."""
    own = cells.CELLS[cell].weight_ch_shape(H)
    shapes = {c.weight_ch_shape(H) for c in cells.CELLS.values() if c.weight_ch is not None}
    x, w, hx, cx, bs = _good(cell)
    if own is not None:
        with pytest.raises(RuntimeError, match="weight_ch"):
            _call(cell, x, dict(w, weight_ch=None), hx, cx, bs)
    for shape in sorted(shapes - {own}):
        with pytest.raises(RuntimeError, match="weight_ch"):
            _call(cell, x, dict(w, weight_ch=torch.randn(shape, dtype=F64)), hx, cx, bs)


@pytest.mark.parametrize("cell", LSTM_FAMILY)
def test_error_weight_hr_and_bias(cell):
    x, w, hx, cx, bs = _good(cell)
    with pytest.raises(RuntimeError, match="weight_hr"):  # proj_size == hidden_size
        _call(cell, x, dict(w, weight_hr=torch.randn(H, H, dtype=F64)), hx, cx, bs)
    with pytest.raises(RuntimeError, match="bias"):
        _call(cell, x, dict(w, bias_hh=None), hx, cx, bs)


def test_error_backward_workspace():
    x, w, hx, cx, bs = _good("lstm")
    out = _forward_op("lstm", x, w, hx, cx, bs, False)
    go = torch.randn_like(out[0])
    bad = list(out)
    bad[3] = out[3].reshape(-1)[:-1].clone()  # one element short, whatever the layout
    with pytest.raises(RuntimeError, match="workspace"):
        torch.ops.fusedrnn.lstm_backward(
            *_fwd_bwd_args("lstm", x, w, hx, cx, bs, False, bad, go, None, None, [True, True])
        )
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.fusedrnn.lstm_backward(
            *_fwd_bwd_args("lstm", x, w, hx, cx, bs, False, out, go[:-1], None, None, [True, True])
        )


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", _cell_proj_cases(), ids=lambda v: str(v))
def test_packed_many_lengths(cell, proj, reverse):
    """A packed batch whose 12 sequences all have different lengths: the previous-state rows of
    the weight gradients then come from many (> 8) row segments, which backward gathers into
    one matrix instead of one GEMM per segment. Outputs and every gradient against fp64."""
    lengths = list(range(12, 0, -1))
    bs = torch.tensor(lengths, dtype=torch.int64)  # lengths 12..1: batch size 12, 11, ..., 1
    w = make_weights(cell, 3, 4, proj, True, F64, scale=0.5)
    x = make_input(12, 12, 3, lengths, F64)
    hx, cx = make_states(cell, 12, 4, proj, F64)
    _check_forward_and_grads(cell, x, w, hx, cx, bs, reverse, F64)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", _cell_proj_cases(), ids=lambda v: str(v))
def test_inference_mode_matches_training_mode(cell, proj, reverse, packed):
    """need_workspace=False (what the modules pass under no_grad) computes the input projection
    in chunks of steps and keeps no per-step state: same results, bit for bit, as the training
    path, and an empty workspace. T=300 so that several chunks (of at most 128 rows) are used,
    the last padded one short (18 rows: it must not take the small GEMMs, buffers.h)."""
    T_, B_ = 300, 3
    bs = torch.tensor([3] * 100 + [2] * 120 + [1] * 80) if packed else None
    w = make_weights(cell, 4, 5, proj, True, F32, scale=0.5)
    x = make_input(T_, B_, 4, bs.tolist() if packed else None, F32)
    hx, cx = make_states(cell, B_, 5, proj, F32)
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward")
    if cell not in LSTM_FAMILY:
        args = (x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], hx, bs, reverse)
    else:
        args = (x, *layer_args(w), hx, cx, bs, reverse)
    train = op(*args, True)
    infer = op(*args, False)
    assert infer[-1].numel() == 0 and train[-1].numel() > 0
    for a, b in zip(train[:-1], infer[:-1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS)
def test_gradgradcheck(cell, packed):
    """Double backward (which cuDNN's LSTM cannot do): first-order gradients come from the fused
    backward op, gradients of gradients from a differentiable recomputation."""
    proj = 2 if cell in LSTM_FAMILY else 0
    bs = torch.tensor([2, 2, 1]) if packed else None
    w = make_weights(cell, 2, 3, proj, True, F64, scale=0.5, requires_grad=True)
    x = make_input(3, 2, 2, [2, 2, 1] if packed else None).requires_grad_()
    hx, cx = make_states(cell, 2, 3, proj)
    names = (
        ["x", "hx"]
        + (["cx"] if cell in LSTM_FAMILY else [])
        + [k for k in WEIGHT_NAMES if w[k] is not None]
    )
    tensors = (
        [x, hx.requires_grad_()]
        + ([cx.requires_grad_()] if cell in LSTM_FAMILY else [])
        + [w[k] for k in WEIGHT_NAMES if w[k] is not None]
    )

    def fn(*args):
        d = dict(zip(names, args))
        wd = {k: d.get(k) for k in WEIGHT_NAMES}
        out = functional.rnn_layer(cell, d["x"], *layer_args(wd), d["hx"], d.get("cx"), bs, True)
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradgradcheck(fn, tuple(tensors))
