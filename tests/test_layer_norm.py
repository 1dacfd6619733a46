"""The layer-normalised LSTM and GRU (design.md §1.6): the fused ops against the reference
equations in every dtype and layout, gradcheck and gradgradcheck, the modules and cells with
torch.nn's arguments, their parameters, state_dict, torch.compile, torch.export, ONNX export,
autocast, opcheck and bad input."""

import importlib.util
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import _layer_norm, _ops, reference
from fusedrnn.reference import LayerArgs
from fusedrnn.testing import DTYPES, HALF_TYPES, assert_close

pytestmark = pytest.mark.skipif(not _ops.HAS_C, reason="the compiled extension is not loaded")

F64 = torch.float64
T, B, I, H, P = 5, 3, 4, 6, 3
SEQ = fusedrnn.modules.LAYER_NORM_MODULES
CELL = fusedrnn.modules.LAYER_NORM_CELL_MODULES
GATES = {"lstm": 4, "gru": 3}


def _params(cell, dtype, bias=True, proj=0, gen=None, requires_grad=False):
    """(w_ih, w_hh, b_ih, b_hh, w_hr, ln) of one layer, O(1) values, LayerNorm gains around 1
    and shifts around 0 (not the initial 1 / 0, so that a gradient that ignored them fails)."""
    G, Hh = GATES[cell] * H, proj or H

    def r(*shape, scale=0.5, shift=0.0):
        t = (torch.randn(*shape, generator=gen, dtype=F64) * scale + shift).to(dtype)
        return t.requires_grad_(requires_grad)

    w = [r(G, I), r(G, Hh), r(G) if bias else None, r(G) if bias else None]
    w_hr = r(P, H) if proj else None
    if cell == "lstm":
        ln = (r(G, scale=0.3, shift=1.0), r(G, scale=0.3, shift=1.0), r(H, scale=0.3, shift=1.0),
              r(H, scale=0.3))  # fmt: skip
    else:
        ln = (r(G, scale=0.3, shift=1.0), r(G, scale=0.3, shift=1.0))
    return w, w_hr, ln


def _layer_case(cell, dtype, packed=False, reverse=False, states=True, bias=True, proj=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, w_hr, ln = _params(cell, dtype, bias, proj if cell == "lstm" else 0, gen)
    if packed:
        sizes = torch.tensor([3, 3, 2, 1, 1])
        x = torch.randn(int(sizes.sum()), I, generator=gen, dtype=F64).to(dtype)
    else:
        sizes = None
        x = torch.randn(T, B, I, generator=gen, dtype=F64).to(dtype)
    Hh = proj if (proj and cell == "lstm") else H
    hx = torch.randn(B, Hh, generator=gen, dtype=F64).to(dtype) if states else None
    cx = (
        torch.randn(B, H, generator=gen, dtype=F64).to(dtype) if states and cell == "lstm" else None
    )
    a = LayerArgs(x, *w, None, w_hr, hx, cx, sizes, reverse)
    return a, ln


def _leaves(a, ln):
    """The case's floating-point tensors as leaves that require a gradient."""

    def leaf(t):
        return (
            t.detach().clone().requires_grad_()
            if isinstance(t, torch.Tensor) and t.is_floating_point()
            else t
        )  # noqa: E501

    return LayerArgs(*(leaf(t) for t in a)), tuple(leaf(t) for t in ln)


def _results(fn, cell, a, ln, seed=1):
    """Outputs and gradients of fn(cell, a, ln) under a fixed random functional of them."""
    a, ln = _leaves(a, ln)
    outs = [o for o in fn(cell, a, ln) if o is not None]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum() for o in outs)
    inputs = [t for t in (*a.tensors, *ln) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs] + list(grads)


LAYOUTS = [
    dict(),
    dict(reverse=True),
    dict(packed=True),
    dict(packed=True, reverse=True),
    dict(states=False, bias=False),
    dict(proj=P),
]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_fused_layer_matches_reference(cell, dtype, layout):
    """The fused op, forward and backward, against the reference equations computed in fp64,
    under the tolerance rule of design.md §4 (the half types against twice the error of the
    reference computed in that dtype)."""
    if layout.get("proj") and cell == "gru":
        pytest.skip("proj_size is the LSTM's")
    a, ln = _layer_case(cell, dtype, **layout)
    got = _results(_layer_norm.run, cell, a, ln)
    a64 = LayerArgs(
        *(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in a)
    )  # noqa: E501
    ref = _results(reference.layer_of, cell, a64, tuple(t.double() for t in ln))
    lowp = _results(reference.layer_of, cell, a, ln) if dtype in HALF_TYPES else [None] * len(ref)
    assert len(got) == len(ref)
    for i, (g, r, lp) in enumerate(zip(got, ref, lowp)):
        assert_close(g, r, dtype, f"result {i}", lowp=lp)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_backward_over_several_chunks(cell, packed, reverse):
    """The backward keeps its per-row gradients for chunks of about a thousand rows
    (recurrence/layer_norm.cpp, ln_chunks) and accumulates each chunk's part of the input and
    weight gradients: a call of several chunks, whose boundaries fall inside packed steps of
    different sizes, against the fp64 reference. In fp64: the chunks' bookkeeping is the same in
    every dtype, and over 60 steps the rounding of the others grows past their bounds of
    test_fused_layer_matches_reference (in bf16, at H = 6, to the size of the results, in the
    reference computed in bf16 as in the fused op), chunks or not."""
    dtype = F64
    gen = torch.Generator().manual_seed(3)
    steps, batch = 60, 50  # 3000 rows padded, about 1500 packed: three or two chunks
    w, w_hr, ln = _params(cell, dtype, gen=gen)
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,), generator=gen).sort(descending=True).values
        lengths[0] = steps
        sizes = torch.tensor([int((lengths > t).sum()) for t in range(steps)])
        x = torch.randn(int(sizes.sum()), I, generator=gen, dtype=F64).to(dtype)
    else:
        sizes = None
        x = torch.randn(steps, batch, I, generator=gen, dtype=F64).to(dtype)
    hx = torch.randn(batch, H, generator=gen, dtype=F64).to(dtype)
    cx = torch.randn(batch, H, generator=gen, dtype=F64).to(dtype) if cell == "lstm" else None
    a = LayerArgs(x, *w, None, w_hr, hx, cx, sizes, reverse)
    got = _results(_layer_norm.run, cell, a, ln)
    ref = _results(reference.layer_of, cell, a, ln)
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_close(g, r, dtype, f"result {i}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layout", [dict(), dict(packed=True, reverse=True), dict(proj=P)], ids=str)
def test_gradcheck_and_gradgradcheck(cell, layout):
    """fp64 gradcheck of the fused backward; gradgradcheck of the double backward (the reference
    equations differentiated with create_graph=True)."""
    if layout.get("proj") and cell == "gru":
        pytest.skip("proj_size is the LSTM's")
    a, ln = _layer_case(cell, F64, **layout)
    a, ln = _leaves(a, ln)
    n_a = len(a.tensors)
    inputs = [t for t in (*a.tensors, *ln) if t is not None]
    where = [i for i, t in enumerate((*a.tensors, *ln)) if t is not None]

    def f(*ts):
        full = [None] * (n_a + len(ln))
        for i, t in zip(where, ts):
            full[i] = t
        args = LayerArgs(*full[:n_a], a.batch_sizes, a.reverse)
        return tuple(o for o in _layer_norm.run(cell, args, tuple(full[n_a:])) if o is not None)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def _ref_run(cell, a, ln, keep=None):
    return reference.layer_of(cell, a, ln, keep)


def _with_gains(m):
    """Random LayerNorm parameters, so that a module that ignored one would fail."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


MODULE_OPTIONS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(batch_first=True, bias=False),
    dict(num_layers=2, dropout=0.0, proj_size=P),
]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("kw", MODULE_OPTIONS, ids=str)
@pytest.mark.parametrize("form", ["padded", "packed", "unbatched"])
def test_module_matches_reference(cell, kw, form, monkeypatch):
    """A module with torch.nn's arguments against the same module running the reference
    equations, outputs, states and every gradient."""
    if kw.get("proj_size") and cell == "gru":
        pytest.skip("proj_size is the LSTM's")
    torch.manual_seed(0)
    m = _with_gains(SEQ[cell](I, H, dtype=F64, **kw))
    bf = kw.get("batch_first", False)
    if form == "unbatched":
        x = torch.randn(T, I, dtype=F64)
    else:
        x = torch.randn(B, T, I, dtype=F64) if bf else torch.randn(T, B, I, dtype=F64)

    def run():
        m.zero_grad(set_to_none=True)
        xin = x.clone().requires_grad_()
        if form == "packed":
            inp = pack_padded_sequence(xin, torch.tensor([5, 2, 4]), batch_first=bf,
                                       enforce_sorted=False)  # fmt: skip
        else:
            inp = xin
        out, state = m(inp)
        if form == "packed":
            out, _ = pad_packed_sequence(out, batch_first=bf)
        states = list(state) if cell == "lstm" else [state]
        loss = sum((t * torch.cos(torch.arange(t.numel(), dtype=F64)).view(t.shape)).sum()
                   for t in [out, *states])  # fmt: skip
        loss.backward()
        return [out.detach(), *[s.detach() for s in states], xin.grad] + [
            p.grad for p in m.parameters()
        ]

    got = run()
    monkeypatch.setattr(_layer_norm, "run", _ref_run)
    ref = run()
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_close(g, r, F64, f"result {i}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cell_matches_reference(cell):
    """The one-step cell against the reference step, batched and unbatched, with gradients."""
    torch.manual_seed(0)
    c = _with_gains(CELL[cell](I, H, dtype=F64))
    step = reference.LAYER_NORM_STEPS[cell]
    ln = c._ln_params()
    for shape in [(B, I), (I,)]:
        x = torch.randn(*shape, dtype=F64, requires_grad=True)
        hx = torch.randn(*shape[:-1], H, dtype=F64)
        state = (hx, torch.randn_like(hx)) if cell == "lstm" else hx
        got = c(x, state)
        got = got if cell == "lstm" else (got,)
        xb = x if x.dim() == 2 else x.unsqueeze(0)
        sb = [s if s.dim() == 2 else s.unsqueeze(0) for s in (state if cell == "lstm" else [state])]
        ref = step(xb, *sb, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh, *ln)
        ref = ref if cell == "lstm" else (ref,)
        for g, r in zip(got, ref):
            assert_close(g, r.reshape(g.shape), F64, "cell step")
        gg = torch.autograd.grad(sum(t.sum() for t in got), [x, *c.parameters()])
        gr = torch.autograd.grad(sum(t.sum() for t in ref), [x, *c.parameters()])
        for g, r in zip(gg, gr):
            assert_close(g, r, F64, "cell gradient")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_parameters_names_init_and_state_dict(cell):
    """torch.nn's parameters keep their names, shapes and order (a torch.nn state_dict's keys
    are a prefix-free subset), the LayerNorm ones are named per layer and direction and start at
    γ = 1, β = 0; a state_dict round trip reproduces the outputs."""
    m = SEQ[cell](I, H, num_layers=2, bidirectional=True)
    tn = (nn.LSTM if cell == "lstm" else nn.GRU)(I, H, num_layers=2, bidirectional=True)
    names = [n for n, _ in m.named_parameters()]
    plain = [n for n in names if not n.startswith("ln_")]
    assert plain == [n for n, _ in tn.named_parameters()]
    for n, p in tn.named_parameters():
        assert getattr(m, n).shape == p.shape
    G = GATES[cell] * H
    for sfx in ["_l0", "_l0_reverse", "_l1", "_l1_reverse"]:
        assert torch.equal(getattr(m, "ln_weight_ih" + sfx), torch.ones(G))
        assert torch.equal(getattr(m, "ln_weight_hh" + sfx), torch.ones(G))
        if cell == "lstm":
            assert torch.equal(getattr(m, "ln_weight_c" + sfx), torch.ones(H))
            assert torch.equal(getattr(m, "ln_bias_c" + sfx), torch.zeros(H))
    assert len(m._flat_weights) == len(names)
    _with_gains(m)
    m2 = SEQ[cell](I, H, num_layers=2, bidirectional=True)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I)
    torch.testing.assert_close(m2(x)[0], m(x)[0], rtol=0, atol=0)
    c = CELL[cell](I, H)
    assert [n for n, _ in c.named_parameters() if not n.startswith("ln_")] == [
        n for n, _ in (nn.LSTMCell if cell == "lstm" else nn.GRUCell)(I, H).named_parameters()
    ]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_compile_training(cell):
    """torch.compile(fullgraph=True) forward and backward equal eager (aot_eager: dynamo and
    AOTAutograd over the ops' fake kernels and autograd)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _with_gains(SEQ[cell](I, H, num_layers=2, bidirectional=True, batch_first=True,
                              dtype=F64))  # fmt: skip
    x0 = torch.randn(B, T, I, dtype=F64)

    def f(x):
        out, state = m(x)
        states = list(state) if cell == "lstm" else [state]
        return sum((t * t).sum() for t in [out, *states])

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append([loss.detach(), x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert_close(a, b, F64, "compiled vs eager")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_export(cell):
    """torch.export of a module, run, equals eager."""
    torch.manual_seed(0)
    m = _with_gains(SEQ[cell](I, H, num_layers=2)).eval()
    x = torch.randn(T, B, I)
    ep = torch.export.export(m, (x,))
    got, want = ep.module()(x), m(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


_HAS_ONNX = all(
    importlib.util.find_spec(n) is not None for n in ("onnx", "onnxscript", "onnxruntime")
)


@pytest.mark.skipif(not _HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_onnx_export_runs_in_onnxruntime(cell, tmp_path):
    """torch.onnx.export(dynamo=True) of a 2-layer bidirectional batch_first module: standard
    operators (LayerNormalization among them); onnxruntime's outputs equal PyTorch's at fp32
    tolerance (1e-5: float32 rounding in both, summed in different orders over short dot
    products and 5 steps)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    m = _with_gains(SEQ[cell](I, H, num_layers=2, bidirectional=True, batch_first=True)).eval()
    x = torch.randn(B, T, I)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
    nodes = program.model_proto.graph.node
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}
    assert "LayerNormalization" in [n.op_type for n in nodes]
    path = tmp_path / "model.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        out, state = m(x)
    expected = [out, *(state if cell == "lstm" else [state])]
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu_autocast_runs_bf16(cell):
    """Under CPU autocast the layer runs in bfloat16 (the ops' autocast kernels), and the
    float32 parameters get float32 gradients."""
    torch.manual_seed(0)
    m = SEQ[cell](I, H)
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck(cell):
    """torch.library.opcheck of the forward op (schema, fake kernel, autograd registration)."""
    a, ln = _layer_case(cell, torch.float32, packed=False, proj=P)
    a, ln = _leaves(a, ln)
    op = getattr(torch.ops.fusedrnn, f"layer_norm_{cell}_forward")
    torch.library.opcheck(op, (*_layer_norm._op_args(cell, a, ln), True))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bad_arguments(cell):
    """A LayerNorm parameter of the wrong shape is an error naming it; the cells refuse
    hidden_size 0; the GRU refuses proj_size."""
    a, ln = _layer_case(cell, torch.float32)
    bad = (ln[0][:-1],) + ln[1:]
    with pytest.raises(RuntimeError, match="ln_weight_ih must have shape"):
        _layer_norm.run(cell, a, bad)
    bad = ln[:1] + (ln[1].double(),) + ln[2:]
    with pytest.raises(RuntimeError, match="ln_weight_hh"):
        _layer_norm.run(cell, a, bad)
    with pytest.raises(ValueError, match="hidden_size must be greater than zero"):
        CELL[cell](I, 0)
    if cell == "gru":
        with pytest.raises(ValueError, match="proj_size"):
            SEQ[cell](I, H, proj_size=2)


def test_normalised_products_ignore_the_weight_scale():
    """What LayerNorm buys (Ba et al.): scaling W_ih and W_hh leaves the LN-LSTM's output as it
    is (the products are normalised), while torch.nn's LSTM changes."""
    torch.manual_seed(0)
    m = SEQ["lstm"](I, H, dtype=F64)
    t = nn.LSTM(I, H, dtype=F64)
    with torch.no_grad():  # products of variance ~10, so that LN's eps (1e-5) is negligible
        m.weight_ih_l0.mul_(10.0)
        m.weight_hh_l0.mul_(10.0)
    t.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("ln_")})
    x = torch.randn(T, B, I, dtype=F64)
    out, out_t = m(x)[0], t(x)[0]
    with torch.no_grad():
        for mod in (m, t):
            mod.weight_ih_l0.mul_(7.0)
            mod.weight_hh_l0.mul_(7.0)
    # eps / variance ~1e-6 relative in the normalised products, carried through a few steps
    torch.testing.assert_close(m(x)[0], out, rtol=1e-5, atol=1e-5)
    assert (t(x)[0] - out_t).abs().max() > 0.1


@pytest.mark.parametrize("isa", fusedrnn.testing.isas_of_cpu())
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_isa_of_this_cpu(isa, cell, dtype):
    """The row loops are compiled once per ISA (kernels/cpu/layer_norm_rows.h): each one this CPU
    has, forced, forward and backward against the fp64 reference under the tolerance rule,
    packed and with a projection."""
    previous = torch.ops.fusedrnn._set_cpu_isa(isa)
    try:
        assert torch.ops.fusedrnn.cpu_isa() == isa
        for layout in (dict(packed=True, reverse=True), dict(proj=P)):
            a, ln = _layer_case(cell, dtype, **layout)
            got = _results(_layer_norm.run, cell, a, ln)
            a64 = LayerArgs(
                *(
                    t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                    for t in a
                )
            )  # noqa: E501
            ref = _results(reference.layer_of, cell, a64, tuple(t.double() for t in ln))
            lowp = _results(reference.layer_of, cell, a, ln) if dtype in HALF_TYPES else ref
            for i, (g, r, lp) in enumerate(zip(got, ref, lowp)):
                assert_close(g, r, dtype, f"{isa} result {i}", lowp=lp)
    finally:
        torch.ops.fusedrnn._set_cpu_isa(previous)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["padded", "packed-reverse", "zoneout"])
def test_long_calls_step_products(cpu_isa, cell, dtype, layout):
    """A call of at least 4 steps and 32 rows takes its per-step products h_{t-1} W_hh^T (fp32)
    and dhg W_hh (fp32 and bf16: the backward's buffers are fp32) through the fused kernels'
    panel GEMM from W_hh packed once per call (recurrence/layer_norm.cpp, StepGemm); under the
    baseline ISA through the GEMM library. Against the fp64 reference under the tolerance rule,
    forward and backward, with zoneout's accumulating dh product too."""
    gen = torch.Generator().manual_seed(7)
    steps, batch = 8, 8  # 64 rows
    w, w_hr, ln = _params(cell, dtype, gen=gen)
    sizes = None
    if layout == "packed-reverse":
        sizes = torch.tensor([8, 8, 7, 7, 6, 4, 4, 2])
        x = torch.randn(int(sizes.sum()), I, generator=gen, dtype=F64).to(dtype)
    else:
        x = torch.randn(steps, batch, I, generator=gen, dtype=F64).to(dtype)
    hx = torch.randn(batch, H, generator=gen, dtype=F64).to(dtype)
    cx = torch.randn(batch, H, generator=gen, dtype=F64).to(dtype) if cell == "lstm" else None
    a = LayerArgs(x, *w, None, w_hr, hx, cx, sizes, layout == "packed-reverse")
    keep = None
    if layout == "zoneout":
        masks = torch.rand(steps * batch, H, generator=gen) < 0.3
        keep = (masks if cell == "lstm" else None, ~masks)

    def fused(c, args, gains):
        return _layer_norm.run(c, args, gains, keep)

    def ref_of(c, args, gains):
        return reference.layer_of(c, args, gains, keep)

    got = _results(fused, cell, a, ln)
    a64 = LayerArgs(
        *(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in a)
    )  # noqa: E501
    ln64 = tuple(t.double() for t in ln)
    ref = _results(ref_of, cell, a64, ln64)
    lowp = _results(ref_of, cell, a, ln) if dtype in HALF_TYPES else ref
    assert len(got) == len(ref)
    for i, (g, r, lp) in enumerate(zip(got, ref, lowp)):
        assert_close(g, r, dtype, f"{cpu_isa} result {i}", lowp=lp)


def _chunks_case(cell, dtype, seed):
    """A packed call of 368 rows (40, 37 and 20 a step): more than two of the 128-row chunks in
    which the fused kernels' GEMM projects the input (recurrence/buffers.h, InputProjection),
    their boundaries inside steps."""
    gen = torch.Generator().manual_seed(seed)
    w, w_hr, ln = _params(cell, dtype, gen=gen)
    sizes = torch.tensor([40] * 3 + [37] * 4 + [20] * 5)
    x = torch.randn(int(sizes.sum()), I, generator=gen, dtype=F64).to(dtype)
    hx = torch.randn(40, H, generator=gen, dtype=F64).to(dtype)
    cx = torch.randn(40, H, generator=gen, dtype=F64).to(dtype) if cell == "lstm" else None
    return LayerArgs(x, *w, None, w_hr, hx, cx, sizes, False), ln


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_input_product_in_chunks(cpu_isa, cell, dtype, reverse):
    """The forward of a call long enough for the fused kernels projects its input through their
    panel GEMM from W_ih packed once per call, 128 rows at a time (training: every row's before
    the loop; inference: spans of whole steps); under the baseline ISA through the GEMM library.
    Its outputs against the fp64 reference under the tolerance rule, in training and in
    inference. (The backward does not take this path: its gradients over these 368 rows are
    sums too long for fp32's elementwise 1e-5, see tests/test_fused_cpu.py, long_sums.)"""
    a, ln = _chunks_case(cell, dtype, seed=11)
    a = a._replace(reverse=reverse)
    op = getattr(torch.ops.fusedrnn, f"layer_norm_{cell}_forward")
    a64 = LayerArgs(
        *(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in a)
    )
    ref = [o for o in reference.layer_of(cell, a64, tuple(t.double() for t in ln)) if o is not None]
    lowp = [o for o in reference.layer_of(cell, a, ln) if o is not None]
    for train in (True, False):
        got = op(*_layer_norm._op_args(cell, a, ln), train)[: len(ref)]
        for i, (g, r, lp) in enumerate(zip(got, ref, lowp)):
            assert_close(g, r, dtype, f"{cpu_isa} train={train} output {i}", lowp=lp)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["packed", "proj", "zoneout", "chunks"])
def test_inference_and_training_forward_agree(cpu_isa, cell, dtype, layout):
    """Inference keeps only the step's rows of the workspace blocks (x̂ excepted) and writes
    only what its step reads again (cells/layer_norm.h, kKeep): its outputs equal a training
    forward's exactly, under every ISA's row loops, with a projection and with zoneout's
    weights of the previous states (eval's rates: both states mixed). "chunks": a call of 368
    packed rows, whose input product inference computes for spans of whole steps and training
    for all rows at once, 128 rows at a time (recurrence/buffers.h, InputProjection)."""
    if layout == "proj" and cell == "gru":
        pytest.skip("the GRU has no projection")
    if layout == "chunks":
        a, ln = _chunks_case(cell, dtype, seed=5)
        a = a._replace(reverse=True)
    else:
        a, ln = _layer_case(
            cell, dtype, packed=layout == "packed", proj=P if layout == "proj" else 0
        )
    zones = ()
    if layout == "zoneout":
        n = a.input.shape[0] * a.input.shape[1]
        gen = torch.Generator().manual_seed(3)
        zones = tuple(torch.rand(n, H, generator=gen).to(dtype) for _ in range(2))
        zones = zones if cell == "lstm" else zones[1:]
    op = getattr(torch.ops.fusedrnn, f"layer_norm_{cell}_forward")
    train = op(*_layer_norm._op_args(cell, a, ln), True, *zones)
    infer = op(*_layer_norm._op_args(cell, a, ln), False, *zones)
    assert infer[-1].numel() == 0 and train[-1].numel() > 0
    for t, i in zip(train[:-1], infer[:-1]):
        torch.testing.assert_close(i, t, rtol=0, atol=0)
