"""Zoneout (`zoneout=p`, design.md §1.7) on every sequence module and cell: in training each
state element keeps its previous value where a fresh Bernoulli(p) mask per step and element says
so, c and h with masks of their own; in eval the expectation p * prev + (1 - p) * new.

The oracle below is the equations written again, step by step, on fusedrnn.reference's cell
steps (checked against torch.nn and by hand elsewhere), with the masks drawn in the order the
modules document: per layer, forward then reverse direction, the cell state's mask
(rows, H) then the hidden state's (rows, H_out), each one `reference.zoneout_masks(rows, width,
p, input)` (test_zoneout_masks_* check that function: its fractions, its seed), one row per
output row of the layer call."""

import importlib.util
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from fusedrnn import _ops, cells, modules, reference

F64 = torch.float64
T, B, I, H = 5, 3, 4, 6

SEQUENCE = {
    "lstm": modules.LSTM,
    "gru": modules.GRU,
    "peephole_lstm": modules.PeepholeLSTM,
    "wm_lstm": modules.WorkingMemoryLSTM,
    "ln_lstm": modules.LayerNormLSTM,
    "ln_gru": modules.LayerNormGRU,
}
CELL = {
    "lstm": modules.LSTMCell,
    "gru": modules.GRUCell,
    "peephole_lstm": modules.PeepholeLSTMCell,
    "wm_lstm": modules.WorkingMemoryLSTMCell,
    "ln_lstm": modules.LayerNormLSTMCell,
    "ln_gru": modules.LayerNormGRUCell,
}


def _rates(m):
    z = m.zoneout
    return z if isinstance(z, tuple) else (z, z)


def _step_of(m):
    steps = reference.LAYER_NORM_STEPS if m._layer_norm else reference.STEPS
    return steps[m._cell]


def _with_gains(m):
    """γ and β away from 1 and 0, so that a wrong LayerNorm parameter shows."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _make(kind, zoneout, **kwargs):
    torch.manual_seed(0)
    return _with_gains(SEQUENCE[kind](I, H, zoneout=zoneout, dtype=F64, **kwargs))


def _zone(prev, new, keep, training):
    """One state's zoneout: keep is a bool mask in training, the rate in eval."""
    if keep is None:
        return new
    if training:
        return torch.where(keep, prev, new)
    return keep * prev + (1 - keep) * new


def _oracle(m, x, batch_sizes, seed):
    """The module's output and final states (time-major; packed rows when batch_sizes is a
    list), computed step by step with the masks drawn under `seed` in the documented order."""
    torch.manual_seed(seed)
    lstm = cells.CELLS[m._cell].has_cell_state
    step = _step_of(m)
    p_c, p_h = _rates(m)
    H_out = m.proj_size or m.hidden_size
    if batch_sizes is None:
        sizes = [x.shape[1]] * x.shape[0]
        rows_in = x.reshape(-1, x.shape[-1])
    else:
        sizes, rows_in = batch_sizes, x
    offs = [sum(sizes[:t]) for t in range(len(sizes))]
    N, Bmax = sum(sizes), sizes[0]
    D = 2 if m.bidirectional else 1
    h_n, c_n = [], []
    inp = rows_in
    for layer in range(m.num_layers):
        outs = []
        for direction in range(D):
            sfx = f"_l{layer}" + ("_reverse" if direction else "")
            get = lambda n: getattr(m, n + sfx, None)  # noqa: E731
            keep_c = keep_h = None
            if lstm and p_c > 0:
                keep_c = (reference.zoneout_masks(N, m.hidden_size, p_c, x)) if m.training else p_c
            if p_h > 0:
                keep_h = (reference.zoneout_masks(N, H_out, p_h, x)) if m.training else p_h
            weights = [get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")]
            if m._layer_norm:
                weights += [get(n) for n, _, _ in modules._LN_PARAMS[m._cell]]
            extra = [] if get("weight_ch") is None else [get("weight_ch")]
            extra += [get("weight_hr")] if lstm else []
            h = inp.new_zeros(Bmax, H_out)
            c = inp.new_zeros(Bmax, m.hidden_size)
            out = [None] * len(sizes)
            order = range(len(sizes))
            for t in reversed(order) if direction else order:
                r0, n = offs[t], sizes[t]
                x_t = inp[r0 : r0 + n]

                def rows(k):
                    return k[r0 : r0 + n] if isinstance(k, torch.Tensor) else k

                if lstm:
                    h_new, c_new = step(x_t, h[:n], c[:n], *weights, *extra)
                    c_new = _zone(c[:n], c_new, rows(keep_c), m.training)
                    c = torch.cat([c_new, c[n:]])
                else:
                    h_new = step(x_t, h[:n], *weights)
                h_new = _zone(h[:n], h_new, rows(keep_h), m.training)
                h = torch.cat([h_new, h[n:]])
                out[t] = h_new
            outs.append(torch.cat(out))
            h_n.append(h)
            c_n.append(c)
        inp = torch.cat(outs, -1)
    if batch_sizes is None:
        inp = inp.reshape(x.shape[0], x.shape[1], -1)
    return inp, torch.stack(h_n), torch.stack(c_n) if lstm else None


def _run(m, x):
    out, state = m(x)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    return out, h_n, c_n


# fp64 both sides, the same equations and masks in another order of operations: rounding only
TOL = {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize("kind", list(SEQUENCE))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequence_module_zones_every_step(kind, mode):
    pair = not kind.endswith("gru")
    m = _make(kind, (0.3, 0.5) if pair else 0.4).train(mode == "train")
    x = torch.randn(T, B, I, dtype=F64)
    torch.manual_seed(11)
    got = _run(m, x)
    want = _oracle(m, x, None, 11)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, **TOL)
    # and it is not the layer without zoneout
    plain = _make(kind, 0.0).train(mode == "train")
    assert not torch.allclose(plain(x)[0], got[0])


@pytest.mark.parametrize("kind", ["lstm", "gru", "ln_lstm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bidirectional_multilayer_packed_and_projected(kind, mode):
    kwargs = {"num_layers": 2, "bidirectional": True}
    if kind == "lstm":
        kwargs["proj_size"] = 4
    m = _make(kind, 0.35, **kwargs).train(mode == "train")
    x = torch.randn(T, B, I, dtype=F64)
    lengths = [5, 4, 2]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
    torch.manual_seed(3)
    out, state = m(packed)
    h_n = state[0] if isinstance(state, tuple) else state
    want_out, want_h, _ = _oracle(m, packed.data, packed.batch_sizes.tolist(), 3)
    torch.testing.assert_close(out.data, want_out, **TOL)
    torch.testing.assert_close(h_n, want_h, **TOL)


@pytest.mark.skipif(not _ops.HAS_C, reason="the compiled extension is not loaded")
@pytest.mark.parametrize("kind", ["lstm", "peephole_lstm", "wm_lstm", "ln_lstm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_projected_layers_zone_in_the_fused_ops(kind, mode, monkeypatch):
    """A projected LSTM's zoned layers run the fused ops (the step kernel zones c_t, a pass
    after the projection zones h_t), not the reference equations."""

    def refuse(*args, **kwargs):
        raise AssertionError("a projected zoned layer ran the reference equations")

    m = _make(kind, (0.3, 0.4), proj_size=2, num_layers=2).train(mode == "train")
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    torch.manual_seed(5)
    with torch.no_grad():
        want_out, want_h, _ = _oracle(m, x, None, 5)
    monkeypatch.setattr(reference, "layer_of", refuse)
    torch.manual_seed(5)
    out, (h_n, _) = m(x)
    out.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(h_n, want_h, **TOL)


def test_batch_first_and_unbatched_follow_the_time_major_layout():
    m = _make("lstm", 0.4, batch_first=True).train()
    x = torch.randn(B, T, I, dtype=F64)
    torch.manual_seed(5)
    out, _ = m(x)
    want, _, _ = _oracle(m, x.transpose(0, 1), None, 5)
    torch.testing.assert_close(out, want.transpose(0, 1), **TOL)
    u = torch.randn(T, I, dtype=F64)
    torch.manual_seed(5)
    out_u, (h_u, _) = m(u.unsqueeze(0))
    torch.manual_seed(5)
    m.batch_first = False
    got_u, (h_u2, _) = m(u)  # unbatched: (T, I)
    torch.testing.assert_close(got_u, out_u[0], **TOL)
    torch.testing.assert_close(h_u2, h_u[:, 0], **TOL)


@pytest.mark.parametrize("kind", list(SEQUENCE))
def test_gradients_are_those_of_the_equations(kind):
    m = _make(kind, 0.3 if kind.endswith("gru") else (0.25, 0.4)).train()
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    torch.manual_seed(2)
    out, h_n, _ = _run(m, x)
    (out.square().sum() + h_n.sum()).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    got_x = x.grad.clone()
    m.zero_grad()
    x.grad = None
    want_out, want_h, _ = _oracle(m, x, None, 2)
    (want_out.square().sum() + want_h.sum()).backward()
    torch.testing.assert_close(got_x, x.grad, **TOL)
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, **TOL)


@pytest.mark.parametrize("kind", ["lstm", "ln_gru"])
def test_gradcheck_and_gradgradcheck_under_fixed_masks(kind):
    """fp64 gradcheck and gradgradcheck of a zoned layer in training: the seed is set inside
    the function, so every evaluation draws the same masks."""
    m = _make(kind, 0.4).train()
    x = torch.randn(3, 2, I, dtype=F64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def fn(x, *ps):
        torch.manual_seed(9)
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))[0]

    def fn_hh(x, w_hh):
        return fn(x, params[0], w_hh, *params[2:])

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn_hh, (x, params[1]))


@pytest.mark.parametrize("kind", list(CELL))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cells_zone_each_call(kind, mode):
    lstm = not kind.endswith("gru")
    torch.manual_seed(0)
    c = _with_gains(CELL[kind](I, H, zoneout=(0.3, 0.6) if lstm else 0.5, dtype=F64))
    c.train(mode == "train")
    x = torch.randn(B, I, dtype=F64)
    h0, c0 = torch.randn(B, H, dtype=F64), torch.randn(B, H, dtype=F64)
    torch.manual_seed(4)
    got = c(x, (h0, c0)) if lstm else c(x, h0)
    torch.manual_seed(4)
    p_c, p_h = _rates(c)
    keep_c = keep_h = None
    if lstm:
        keep_c = reference.zoneout_masks(B, H, p_c, x) if c.training else p_c
    keep_h = reference.zoneout_masks(B, H, p_h, x) if c.training else p_h
    ws = [c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh]
    if c._layer_norm:
        ws += [getattr(c, n) for n, _, _ in modules._LN_PARAMS[c._cell]]
    step = _step_of(c)
    if lstm:
        extra = [c.weight_ch] if c.weight_ch is not None else []
        h_new, c_new = step(x, h0, c0, *ws, *extra)
        want = (
            _zone(h0, h_new, keep_h, c.training),
            _zone(c0, c_new, keep_c, c.training),
        )
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL)
    else:
        torch.testing.assert_close(got, _zone(h0, step(x, h0, *ws), keep_h, c.training), **TOL)
    # unbatched: the same as a batch of one
    torch.manual_seed(4)
    one = c(x[0], (h0[0], c0[0])) if lstm else c(x[0], h0[0])
    torch.manual_seed(4)
    batch = c(x[:1], (h0[:1], c0[:1])) if lstm else c(x[:1], h0[:1])
    for a, b in zip(one if lstm else (one,), batch if lstm else (batch,)):
        torch.testing.assert_close(a, b[0], **TOL)


def _binomial_ok(kept: int, n: int, p: float) -> bool:
    # 4.5 standard deviations: a false failure once in ~150000 runs
    return abs(kept - p * n) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


def test_kept_fractions_are_binomial_and_the_two_rates_apart():
    """LSTMCell(zoneout=(0.2, 0.6)) on 64 x 256 elements: the fraction of elements of c and h
    equal to their previous value is within a binomial bound of p_c and p_h (a new value equals
    the previous one by chance with probability ~0 for random states)."""
    torch.manual_seed(0)
    cell = modules.LSTMCell(32, 256, zoneout=(0.2, 0.6))
    x = torch.randn(64, 32)
    h0, c0 = torch.randn(64, 256), torch.randn(64, 256)
    h1, c1 = cell(x, (h0, c0))
    n = h1.numel()
    assert _binomial_ok((c1 == c0).sum().item(), n, 0.2)
    assert _binomial_ok((h1 == h0).sum().item(), n, 0.6)
    # a sequence module: the output at t equals the output at t - 1 where h was kept
    rnn = modules.GRU(32, 128, zoneout=0.3)
    out, _ = rnn(torch.randn(40, 16, 32))
    same = (out[1:] == out[:-1]).sum().item()
    assert _binomial_ok(same, out[1:].numel(), 0.3)


@pytest.mark.parametrize("kind", ["lstm", "ln_gru"])
def test_a_seed_fixes_the_masks(kind):
    m = _make(kind, 0.5).float().train()
    x = torch.randn(T, B, I)
    torch.manual_seed(21)
    a = m(x)[0]
    torch.manual_seed(21)
    b = m(x)[0]
    torch.manual_seed(22)
    c = m(x)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", list(SEQUENCE))
def test_zero_rate_is_the_plain_layer_and_eval_draws_nothing(kind):
    m = _make(kind, 0.0).train()
    zoned = _make(kind, (0.0, 0.0) if not kind.endswith("gru") else 0.0).train()
    with_rate = _make(kind, 0.5).eval()
    x = torch.randn(T, B, I, dtype=F64)
    state = torch.get_rng_state()
    assert torch.equal(m(x)[0], zoned(x)[0])
    with_rate(x)
    # neither p = 0 nor eval draws a random number
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "bad", [-0.1, 1.5, "0.5", True, None, float("nan"), (0.1,), (0.1, 0.2, 0.3), (0.1, 2.0)]
)
@pytest.mark.parametrize("kind", ["sequence", "cell"])
def test_bad_rate_is_a_clear_error(bad, kind):
    make = modules.LSTM if kind == "sequence" else modules.LSTMCell
    with pytest.raises(ValueError, match=r"zoneout should be a number in range \[0, 1\]"):
        make(I, H, zoneout=bad)


@pytest.mark.parametrize("make", [modules.GRU, modules.GRUCell, modules.LayerNormGRU])
def test_a_gru_takes_one_rate(make):
    with pytest.raises(ValueError, match="a GRU has one state"):
        make(I, H, zoneout=(0.1, 0.2))


def test_names_repr_and_pickle():
    m = modules.LSTM(I, H, zoneout=(0.1, 0.2))
    ref = nn.LSTM(I, H)
    # no parameter of its own: torch.nn's state_dict loads
    m.load_state_dict(ref.state_dict())
    assert "zoneout=(0.1, 0.2)" in repr(m) and "zoneout" not in repr(modules.LSTM(I, H))
    assert "zoneout=0.5" in repr(modules.GRUCell(I, H, zoneout=0.5))
    back = pickle.loads(pickle.dumps(m))
    assert back.zoneout == (0.1, 0.2)
    del back.__dict__["zoneout"]  # a module pickled before the attribute existed
    assert pickle.loads(pickle.dumps(back)).zoneout == 0.0
    with pytest.raises(TypeError):  # keyword-only: torch.nn's positional order is unchanged
        modules.GRU(I, H, 1, True, False, 0.0, False, None, None, 0.5)


def test_compile_fullgraph_training_matches_eager_under_a_seed(monkeypatch):
    """torch.compile(fullgraph=True) of a training step with zoneout: with Inductor's random
    numbers from torch's generator (fallback_random), the same seed gives eager's result."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    m = _make("lstm", (0.2, 0.4)).float().train()
    x = torch.randn(T, B, I)

    def step(x):
        out, _ = m(x)
        return out.square().sum()

    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(2)
    loss = compiled(x)
    loss.backward()
    got = m.weight_hh_l0.grad.clone()
    m.zero_grad()
    torch.manual_seed(2)
    want = step(x)
    want.backward()
    # fp32, the same masks; the compiled graph may fuse and order the arithmetic differently
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, m.weight_hh_l0.grad, rtol=1e-5, atol=1e-6)


def test_torch_export_of_eval_module():
    m = _make("lstm", 0.3).float().eval()
    x = torch.randn(T, B, I)
    ep = torch.export.export(m, (x,))
    got, want = ep.module()(x), m(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_cpu_autocast_runs_in_bf16():
    """Under CPU autocast a zoned layer runs in bfloat16, as the unzoned fused op does, and the
    float32 parameters get float32 gradients."""
    torch.manual_seed(0)
    m = modules.LSTM(I, H, zoneout=0.3)
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert m.weight_hh_l0.grad.dtype == torch.float32


_HAS_ONNX = all(
    importlib.util.find_spec(n) is not None for n in ("onnx", "onnxscript", "onnxruntime")
)


@pytest.mark.skipif(not _HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_onnx_export_of_eval_module_runs_in_onnxruntime(kind, tmp_path):
    """torch.onnx.export(dynamo=True) of a zoned module in eval (the expectation): the ONNX
    recurrent operators have no zoneout, so the layer exports as the reference equations'
    standard operators; onnxruntime's outputs equal PyTorch's at fp32 tolerance (1e-5: float32
    rounding in both, in different orders, over 5 steps)."""
    import onnxruntime as ort

    m = _make(kind, 0.3, num_layers=2, batch_first=True).float().eval()
    x = torch.randn(B, T, I)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    nodes = program.model_proto.graph.node
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}
    path = tmp_path / "model.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out, state = m(x)
    expected = [out, *(state if kind == "lstm" else [state])]
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-5, rtol=1e-5)
