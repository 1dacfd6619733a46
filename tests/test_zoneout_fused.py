"""The fused zoneout of the LSTM-family (plain, peephole, working-memory; with and without a
projection) and GRU ops (their zoneout_c / zoneout_h arguments, design.md §1.7): forward and
every gradient against the fp64 reference equations given the same weights, under the tolerance
rule, in fp64, fp32 and bf16; on the tiles' shapes and remainders and on the GEMM + step path (a
short call), padded and packed with row counts changing in both directions, masks (training) and
one row of the rate (eval), under every ISA the CPU has (the `cpu_isa` fixture); and the ops'
checks of the arguments."""

import pytest
import torch

from fusedrnn import _ops, reference
from fusedrnn.reference import LayerArgs
from fusedrnn.testing import assert_close, make_input, make_states, make_weights

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16

pytestmark = pytest.mark.usefixtures("cpu_isa")

LAYOUTS = {
    # (T, B, batch_sizes): enough rows for the tiles; a short call (the GEMM + step kernels);
    # packed rows shrinking (forward) or growing (reverse) from step to step
    "tiles": (8, 13, None),
    "short": (2, 3, None),
    "packed": (5, None, [7, 7, 5, 2, 1]),
}


def _weights(cell, H, N, mode, dtype, P=0):
    """zoneout_c (LSTM; None for the GRU) and zoneout_h as the ops take them; zoneout_h of the
    projection's width P when there is one."""
    widths = [H] if cell == "gru" else [H, P or H]
    out = []
    for k, width in enumerate(widths):
        if mode == "train":
            out.append((torch.rand(N, width) < (0.3 + 0.2 * k)).to(dtype))
        else:
            out.append(torch.full((1, width), 0.25 + 0.3 * k, dtype=F64).to(dtype))
    return (None, out[0]) if cell == "gru" else (out[0], out[1])


def _call(cell, dtype, x, w, hx, cx, bs, reverse, zone, equations=False):
    """Outputs and gradients of the op, or (equations) of the fp64 reference equations."""

    def leaf(t):
        return None if t is None else t.detach().to(dtype).requires_grad_()

    x, hx, cx = leaf(x), leaf(hx), leaf(cx)
    w = {k: leaf(v) for k, v in w.items()}
    a = LayerArgs(
        x,
        w["weight_ih"],
        w["weight_hh"],
        w["bias_ih"],
        w["bias_hh"],
        w.get("weight_ch"),
        w.get("weight_hr"),
        hx,
        cx if cell != "gru" else None,
        bs,
        reverse,
    )
    zone = tuple(None if z is None else z.to(dtype) for z in zone)
    if equations:
        outs = reference.layer_of(cell, a, keep=zone)
    else:
        outs = _ops.forward(cell, a, zone=zone)
    outs = [o for o in outs if o is not None]
    torch.manual_seed(1)
    loss = sum((o * torch.randn(o.shape, dtype=F64).to(o.dtype)).sum() for o in outs)
    loss.backward()
    grads = {"input": x.grad, "hx": hx.grad}
    if cell != "gru":
        grads["cx"] = cx.grad
    grads.update({k: v.grad for k, v in w.items() if v is not None})
    return outs, grads


def _check_against_the_equations(cell, dtype, layout, reverse, mode, P=0, H=33):
    torch.manual_seed(0)
    T, B, batch_sizes = LAYOUTS[layout]
    I = 9
    bs = torch.tensor(batch_sizes) if batch_sizes is not None else None
    Bn = batch_sizes[0] if batch_sizes is not None else B
    x = make_input(T, B, I, batch_sizes)
    N = x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)
    w = make_weights(cell, I, H, P, True, scale=0.5)
    hx, cx = make_states(cell, Bn, H, P)
    zone = _weights(cell, H, N, mode, F64, P)
    # the inputs rounded to dtype first: the reference sees the values the op sees
    x, hx = x.to(dtype).to(F64), hx.to(dtype).to(F64)
    cx = cx.to(dtype).to(F64) if cx is not None else None
    w = {k: (v.to(dtype).to(F64) if v is not None else None) for k, v in w.items()}
    zone = tuple(None if z is None else z.to(dtype).to(F64) for z in zone)
    ref, ref_g = _call(cell, F64, x, w, hx, cx, bs, reverse, zone, equations=True)
    got, got_g = _call(cell, dtype, x, w, hx, cx, bs, reverse, zone)
    # the half types' rule: against the reference equations run in that dtype too
    low, low_g = (None, {})
    if dtype == BF16:
        low, low_g = _call(cell, dtype, x, w, hx, cx, bs, reverse, zone, equations=True)
    for k, (name, g, r) in enumerate(zip(("output", "h_n", "c_n"), got, ref)):
        lowp = low[k] if low is not None else None
        assert_close(g, r, dtype, f"{cell} {layout} {mode} {name}", lowp)
    for name, r in ref_g.items():
        assert_close(got_g[name], r, dtype, f"{cell} {layout} {mode} grad {name}", low_g.get(name))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "peephole_lstm", "wm_lstm", "gru"])
def test_fused_zoneout_matches_the_equations(cell, dtype, layout, reverse, mode):
    _check_against_the_equations(cell, dtype, layout, reverse, mode)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", ["tiles", "packed"])
@pytest.mark.parametrize("cell", ["lstm", "peephole_lstm", "gru"])
def test_fused_zoneout_whole_vectors_bf16(cell, layout, reverse, mode):
    """70 units: the bf16 steps' whole-vector kernels (AVX-512: 32-unit forward groups, 64-unit
    backward panels, kernels/cpu/isa/fused_tiles.h) besides the scalar remainder."""
    _check_against_the_equations(cell, BF16, layout, reverse, mode, H=70)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "peephole_lstm", "wm_lstm"])
def test_fused_projected_zoneout_matches_the_equations(cell, dtype, layout, reverse, mode):
    """A projected LSTM: the step kernel zones c_t, h_t is zoned after the projection (its
    width P, here narrower than H)."""
    _check_against_the_equations(cell, dtype, layout, reverse, mode, P=7)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zero_weights_are_the_plain_op(cell):
    """Weights 0 everywhere take every new state: the op's result is the op without zoneout
    (the same kernels' arithmetic, d * prev + (1 - d) * new with d = 0 exact)."""
    torch.manual_seed(0)
    x = make_input(8, 13, 9).float()
    w = {k: (v.float() if v is not None else None) for k, v in make_weights(cell, 9, 33).items()}
    a = LayerArgs(x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"])
    zeros = x.new_zeros(1, 33)
    plain = _ops.forward(cell, a)
    zoned = _ops.forward(cell, a, zone=(zeros if cell == "lstm" else None, zeros))
    for p, z in zip(plain, zoned):
        if p is not None:
            assert torch.equal(p, z)


def test_op_argument_errors():
    x = torch.randn(3, 2, 4)
    w = make_weights("lstm", 4, 5)
    w = {k: (v.float() if v is not None else None) for k, v in w.items()}
    a = LayerArgs(x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"])
    ok = x.new_zeros(6, 5)
    with pytest.raises(RuntimeError, match="must be given together"):
        _ops.forward("lstm", a, zone=(None, ok))
    with pytest.raises(RuntimeError, match=r"zoneout_h must have shape \(6, 5\)"):
        _ops.forward("lstm", a, zone=(ok, x.new_zeros(5, 5)))
    with pytest.raises(RuntimeError, match="zoneout_c must have the dtype of input"):
        _ops.forward("lstm", a, zone=(ok.double(), ok))
    wp = make_weights("lstm", 4, 5, 3)
    wp = {k: (v.float() if v is not None else None) for k, v in wp.items()}
    ap = LayerArgs(
        x, wp["weight_ih"], wp["weight_hh"], wp["bias_ih"], wp["bias_hh"], None, wp["weight_hr"]
    )
    # a projection: zoneout_h has the projection's width
    with pytest.raises(RuntimeError, match=r"zoneout_h must have shape \(6, 3\)"):
        _ops.forward("lstm", ap, zone=(ok, ok))
    gw = make_weights("gru", 4, 5)
    gw = {k: (v.float() if v is not None else None) for k, v in gw.items()}
    ag = LayerArgs(x, gw["weight_ih"], gw["weight_hh"], gw["bias_ih"], gw["bias_hh"])
    with pytest.raises(RuntimeError, match=r"zoneout_h must have shape"):
        _ops.forward("gru", ag, zone=(None, x.new_zeros(2, 5)))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck_forward_with_zoneout(cell, mode, cpu_isa):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) of the
    forward op given zoneout weights, packed input with initial states."""
    if cpu_isa != "baseline":
        pytest.skip("the registration does not depend on the ISA: checked once")
    torch.manual_seed(0)
    bs = torch.tensor([3, 2, 2, 1])
    x = make_input(4, None, 5, [3, 2, 2, 1])
    w = make_weights(cell, 5, 6)
    hx, cx = make_states(cell, 3, 6)
    zone_c, zone_h = _weights(cell, 6, x.shape[0], mode, F64)

    def leaf(t):
        return None if t is None else t.detach().clone().requires_grad_()

    ws = [leaf(w[k]) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if cell == "lstm":
        args = (leaf(x), *ws, None, None, leaf(hx), leaf(cx), bs, True, True, zone_c, zone_h)
    else:
        args = (leaf(x), *ws, leaf(hx), bs, True, True, zone_h)
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward").default
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize(
    "cell,P", [("lstm", 0), ("lstm", 4), ("gru", 0)], ids=["lstm", "lstm-proj", "gru"]
)
def test_gradcheck_and_gradgradcheck_of_the_op(cell, P, cpu_isa):
    """fp64 gradcheck of the fused op with zoneout masks (its analytic backward; with a
    projection, the zoned projected h_t's too: weight_hr among the checked inputs) and
    gradgradcheck (the double backward differentiates the reference equations with the same
    weights)."""
    if cpu_isa != "baseline":
        pytest.skip("fp64 runs the same loops under every ISA: checked once")
    torch.manual_seed(0)
    x = make_input(4, 3, 5).requires_grad_()
    w = make_weights(cell, 5, 6, P)
    w_hh = w["weight_hh"].clone().requires_grad_()
    w_hr = w["weight_hr"].clone().requires_grad_() if P else None
    zone = _weights(cell, 6, 12, "train", F64, P)

    def fn(x, w_hh, *w_hr):
        a = LayerArgs(
            x, w["weight_ih"], w_hh, w["bias_ih"], w["bias_hh"], None, w_hr[0] if w_hr else None
        )
        out = _ops.forward(cell, a, zone=zone)
        return tuple(o for o in out if o is not None)

    inputs = (x, w_hh) + ((w_hr,) if P else ())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def _ln_params(cell, H, dtype):
    """γ, β of the layer-normalised cell away from 1 and 0, in the ops' order."""
    G = (4 if cell == "lstm" else 3) * H
    sizes = (G, G, H, H) if cell == "lstm" else (G, G)
    base = (1.0, 1.0, 1.0, 0.0)
    return tuple((b + 0.3 * torch.randn(n, dtype=F64)).to(dtype) for b, n in zip(base, sizes))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm-proj"])
def test_fused_layer_norm_zoneout_matches_the_equations(cell, dtype, layout, reverse, mode):
    """The layer-normalised ops' zoneout (their row passes, every ISA) against the fp64
    reference equations with the same weights, forward and every gradient; projected, the rows
    zone c_t and h_t is zoned after the projection."""
    from fusedrnn import _layer_norm

    # P = 9 < H: with P = 5 the fp32 gradient of weight_hh reached 1.1e-5 against the fp32
    # rule's 1e-5 on one draw under the baseline ISA, zoneout at rate 0 too (the fp32 reference
    # equations themselves: 2-8e-6 over six draws at these shapes; the rule has no term for the
    # length of the recurrence), and 2-9e-6 at P = 9 and 11: rounding, which fp64 (1e-10 here)
    # would show were it the equations
    cell, P = ("lstm", 9) if cell == "lstm-proj" else (cell, 0)
    torch.manual_seed(0)
    T, B, batch_sizes = (6, 5, None) if layout == "padded" else (5, None, [7, 7, 5, 2, 1])
    H, I = 19, 7
    bs = torch.tensor(batch_sizes) if batch_sizes is not None else None
    Bn = batch_sizes[0] if batch_sizes is not None else B
    x = make_input(T, B, I, batch_sizes).to(dtype).double()
    N = x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)
    w = {k: (v.to(dtype).double() if v is not None else None)
         for k, v in make_weights(cell, I, H, P, True, scale=0.5).items()}  # fmt: skip
    hx, cx = make_states(cell, Bn, H, P)
    hx, cx = hx.to(dtype).double(), (cx.to(dtype).double() if cx is not None else None)
    ln = tuple(t.double() for t in _ln_params(cell, H, dtype))
    zone = tuple(
        None if z is None else z.to(dtype).double() for z in _weights(cell, H, N, mode, F64, P)
    )

    def call(dt, equations):
        leaf = lambda t: None if t is None else t.detach().to(dt).requires_grad_()  # noqa: E731
        xs, h0, c0 = leaf(x), leaf(hx), leaf(cx)
        ws = {k: leaf(v) for k, v in w.items()}
        g = tuple(leaf(t) for t in ln)
        a = LayerArgs(xs, ws["weight_ih"], ws["weight_hh"], ws["bias_ih"], ws["bias_hh"], None,
                      ws.get("weight_hr"), h0, c0 if cell == "lstm" else None, bs,
                      reverse)  # fmt: skip
        z = tuple(None if t is None else t.to(dt) for t in zone)
        if equations:
            outs = reference.layer_of(cell, a, g, z)
        else:
            outs = _layer_norm.run(cell, a, g, z)
        outs = [o for o in outs if o is not None]
        torch.manual_seed(1)
        loss = sum((o * torch.randn(o.shape, dtype=F64).to(o.dtype)).sum() for o in outs)
        loss.backward()
        grads = {"input": xs.grad, "hx": h0.grad, **{f"ln{k}": t.grad for k, t in enumerate(g)}}
        if cell == "lstm":
            grads["cx"] = c0.grad
        grads.update({k: v.grad for k, v in ws.items() if v is not None})
        return outs, grads

    ref, ref_g = call(F64, True)
    got, got_g = call(dtype, False)
    low, low_g = call(dtype, True) if dtype == BF16 else (None, {})
    for k, (g, r) in enumerate(zip(got, ref)):
        assert_close(g, r, dtype, f"ln {cell} out {k}", low[k] if low is not None else None)
    for name, r in ref_g.items():
        assert_close(got_g[name], r, dtype, f"ln {cell} grad {name}", low_g.get(name))
