"""The reference equations of the layer-normalised cells and of zoneout (fusedrnn.reference,
design.md §1.6-1.7), against the same equations written out by hand (the mean and biased
variance of each row, no torch layer norm), and their defining properties: a layer-normalised
product does not see the scale of its weight; zoneout keeps exactly the masked elements, mixes
the expectation in eval, and keeps each element with probability p."""

import math

import pytest
import torch

from fusedrnn import reference

B, I, H = 5, 6, 7
DT = torch.float64


def _ln_by_hand(v, gain, shift=None):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)  # biased, as the layer's definition
    out = (v - mean) / torch.sqrt(var + 1e-5) * gain
    return out if shift is None else out + shift


def _lstm_params(bias=True):
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=DT)  # noqa: E731
    p = {
        "w_ih": r(4 * H, I),
        "w_hh": r(4 * H, H),
        "b_ih": r(4 * H) if bias else None,
        "b_hh": r(4 * H) if bias else None,
        "g_ih": 1 + 0.1 * r(4 * H),
        "g_hh": 1 + 0.1 * r(4 * H),
        "g_c": 1 + 0.1 * r(H),
        "b_c": 0.1 * r(H),
    }
    return p, r(B, I), r(B, H), r(B, H)


def _ln_lstm(x, h, c, p):
    return reference.layer_norm_lstm_cell(
        x,
        h,
        c,
        p["w_ih"],
        p["w_hh"],
        p["b_ih"],
        p["b_hh"],
        p["g_ih"],
        p["g_hh"],
        p["g_c"],
        p["b_c"],
    )


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_lstm_step_is_the_equations_by_hand(bias):
    p, x, h, c = _lstm_params(bias)
    a = _ln_by_hand(x @ p["w_ih"].t(), p["g_ih"]) + _ln_by_hand(h @ p["w_hh"].t(), p["g_hh"])
    if bias:
        a = a + p["b_ih"] + p["b_hh"]
    i, f, g, o = a[:, :H], a[:, H : 2 * H], a[:, 2 * H : 3 * H], a[:, 3 * H :]
    c_want = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_want = torch.sigmoid(o) * torch.tanh(_ln_by_hand(c_want, p["g_c"], p["b_c"]))
    h_got, c_got = _ln_lstm(x, h, c, p)
    # fp64, the same arithmetic in another order: a few ulps
    torch.testing.assert_close(c_got, c_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_got, h_want, rtol=1e-12, atol=1e-12)


def test_layer_norm_lstm_projection_and_gradcheck():
    p, x, h, c = _lstm_params()
    w_hr = torch.randn(3, H, dtype=DT)
    h_got, c_got = reference.layer_norm_lstm_cell(
        x,
        h,
        c,
        *(p[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh", "g_ih", "g_hh", "g_c", "b_c")),
        w_hr,
    )
    torch.testing.assert_close(h_got, _ln_lstm(x, h, c, p)[0] @ w_hr.t(), rtol=1e-12, atol=1e-12)
    assert torch.equal(c_got, _ln_lstm(x, h, c, p)[1])
    args = [x, h, c] + [
        p[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh", "g_ih", "g_hh", "g_c", "b_c")
    ]
    args = [t.detach().requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *a: reference.layer_norm_lstm_cell(*a), args)


def test_a_normalised_product_does_not_see_its_weights_scale():
    """LN(x (k W)^T) = LN(x W^T) up to the eps in the variance: scaling W_ih or W_hh by 10 moves
    the layer-normalised step by at most what eps = 1e-5 moves it (the row variances here are
    of order 1-10, so well under 1e-5 relative), while it changes torch.nn's LSTM step."""
    p, x, h, c = _lstm_params()
    h0, c0 = _ln_lstm(x, h, c, p)
    for name in ("w_ih", "w_hh"):
        scaled = dict(p, **{name: 10 * p[name]})
        h1, c1 = _ln_lstm(x, h, c, scaled)
        torch.testing.assert_close(h1, h0, rtol=0, atol=1e-5)
        torch.testing.assert_close(c1, c0, rtol=0, atol=1e-5)
        plain = reference.lstm_cell(x, h, c, scaled["w_ih"], scaled["w_hh"], p["b_ih"], p["b_hh"])
        base = reference.lstm_cell(x, h, c, p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
        assert (plain[1] - base[1]).abs().max() > 0.1


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_gru_step_is_the_equations_by_hand(bias):
    torch.manual_seed(1)
    r = lambda *s: torch.randn(*s, dtype=DT)  # noqa: E731
    w_ih, w_hh = r(3 * H, I), r(3 * H, H)
    b_ih, b_hh = (r(3 * H), r(3 * H)) if bias else (None, None)
    g_ih, g_hh = 1 + 0.1 * r(3 * H), 1 + 0.1 * r(3 * H)
    x, h = r(B, I), r(B, H)
    xs, hs = _ln_by_hand(x @ w_ih.t(), g_ih), _ln_by_hand(h @ w_hh.t(), g_hh)
    if bias:
        xs, hs = xs + b_ih, hs + b_hh
    rg = torch.sigmoid(xs[:, :H] + hs[:, :H])
    z = torch.sigmoid(xs[:, H : 2 * H] + hs[:, H : 2 * H])
    n = torch.tanh(xs[:, 2 * H :] + rg * hs[:, 2 * H :])  # the reset after the normalisation
    want = (1 - z) * n + z * h
    got = reference.layer_norm_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    args = [t.detach().requires_grad_() for t in (x, h, w_ih, w_hh, g_ih, g_hh)]
    assert torch.autograd.gradcheck(
        lambda x, h, w_ih, w_hh, g_ih, g_hh: reference.layer_norm_gru_cell(
            x, h, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh
        ),
        args,
    )


def test_zoneout_keeps_exactly_the_masked_elements_and_mixes_in_eval():
    torch.manual_seed(2)
    prev, new = torch.randn(B, H, dtype=DT), torch.randn(B, H, dtype=DT)
    keep = torch.rand(B, H) < 0.5
    out = reference.zoneout(prev, new, keep)
    assert torch.equal(out[keep], prev[keep]) and torch.equal(out[~keep], new[~keep])
    assert torch.equal(reference.zoneout(prev, new, 0.0), new)
    torch.testing.assert_close(
        reference.zoneout(prev, new, 0.3), 0.3 * prev + 0.7 * new, rtol=1e-15, atol=0
    )
    assert torch.equal(reference.zoneout(prev, new, 1.0), prev)
    # the gradient goes to the kept value only
    prev.requires_grad_(), new.requires_grad_()
    reference.zoneout(prev, new, keep).sum().backward()
    assert torch.equal(prev.grad, keep.to(DT)) and torch.equal(new.grad, (~keep).to(DT))


def test_zoneout_masks_are_seeded_and_binomial():
    like = torch.empty(0)
    torch.manual_seed(3)
    a = reference.zoneout_masks(400, 256, 0.15, like)
    torch.manual_seed(3)
    assert torch.equal(a, reference.zoneout_masks(400, 256, 0.15, like))
    assert a.shape == (400, 256) and a.dtype == torch.bool
    n, p = a.numel(), 0.15
    # 4.5 standard deviations: a false failure once in ~150000 runs
    assert abs(a.sum().item() - p * n) <= 4.5 * math.sqrt(n * p * (1 - p))
    assert not reference.zoneout_masks(10, 10, 0.0, like).any()
    assert reference.zoneout_masks(10, 10, 1.0, like).all()


def _splitmix_bits(seed: int, k: int) -> int:
    """Draw k of fusedrnn::zoneout_mask written again from its documented formula (SplitMix64's
    output function at seed + (k + 1) * the golden-ratio increment), in Python integers."""
    m = (1 << 64) - 1
    z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


needs_op = pytest.mark.skipif(
    reference.MASK_OP is None, reason="the compiled extension is not loaded"
)


@needs_op
def test_mask_op_is_its_formula_for_every_thread_count():
    """The CPU masks' op: element 2k is the low half of draw k, element 2k + 1 the high half,
    kept where the 32-bit half is below p 2^32; an odd last element takes draw n // 2's low half.
    The same bits for one thread and two (each element depends on the seed and its index)."""
    seed, p, rows, width = 123456789, 0.3, 333, 99  # 32967 elements: odd, several tasks' worth
    t = torch.tensor(seed, dtype=torch.int64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reference.MASK_OP(rows, width, p, t)
        torch.set_num_threads(2)
        two = reference.MASK_OP(rows, width, p, t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and one.shape == (rows, width) and one.dtype == torch.bool
    flat, threshold, n = one.flatten(), int(p * 2**32), rows * width
    for i in [0, 1, 2, 3, 1000, 1001, 32964, 32965, n - 1]:
        r = _splitmix_bits(seed, i // 2)
        half = (r >> 32) if i % 2 else (r & 0xFFFFFFFF)
        assert bool(flat[i]) == (half < threshold), i


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_mask_op_in_a_dtype_is_the_bool_masks_as_weights(dtype):
    """dtype given: the same masks (one seed, the same elements kept) as 1 / 0 of that dtype,
    the weights the fused ops take; reference.zoneout_masks passes it through (its seed drawn
    from torch's generator as for bool masks)."""
    t = torch.tensor(42, dtype=torch.int64)
    bits = reference.MASK_OP(101, 37, 0.35, t)
    weights = reference.MASK_OP(101, 37, 0.35, t, dtype)
    assert weights.dtype == dtype and torch.equal(weights, bits.to(dtype))
    like = torch.zeros(1)
    torch.manual_seed(3)
    a = reference.zoneout_masks(64, 33, 0.2, like)
    torch.manual_seed(3)
    b = reference.zoneout_masks(64, 33, 0.2, like, dtype)
    assert b.dtype == dtype and torch.equal(b, a.to(dtype))


@needs_op
def test_mask_op_elements_are_independent():
    """Neighbouring elements (the two halves of one draw, and consecutive draws) are both kept
    with probability p^2 (within the binomial bound of the other mask tests), and two seeds
    agree on an element with probability p^2 + (1 - p)^2."""
    p = 0.4
    a = reference.MASK_OP(500, 400, p, torch.tensor(7)).flatten()
    b = reference.MASK_OP(500, 400, p, torch.tensor(8)).flatten()

    def ok(count, n, q):
        return abs(count - q * n) <= 4.5 * math.sqrt(n * q * (1 - q))

    pairs = a[0::2] & a[1::2]  # the two halves of each draw
    assert ok(pairs.sum().item(), pairs.numel(), p * p)
    shifted = a[1:-1:2] & a[2::2]  # the high half of draw k and the low half of draw k + 1
    assert ok(shifted.sum().item(), shifted.numel(), p * p)
    assert ok((a == b).sum().item(), a.numel(), p * p + (1 - p) ** 2)


@needs_op
@pytest.mark.parametrize(
    "args, match",
    [
        ((4, 4, 1.5, torch.tensor(1)), "p must be in"),
        ((4, 4, -0.1, torch.tensor(1)), "p must be in"),
        ((4, 4, 0.5, torch.tensor(1.0)), "seed must be a one-element int64"),
        ((4, 4, 0.5, torch.tensor([1, 2])), "seed must be a one-element int64"),
        ((-1, 4, 0.5, torch.tensor(1)), "rows and width must be >= 0"),
        ((4, 4, 0.5, torch.tensor(1), torch.int32), "dtype must be None"),
    ],
)
def test_mask_op_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        reference.MASK_OP(*args)
