"""fusedrnn works where torch.nn.LSTM / GRU work: torch.func transforms and forward-mode AD,
autocast, torch.compile training, in-place use of the outputs, convert() of tied / weight-normed
modules, isinstance checks, torch.fx / torch.jit tracing, torch.nn's messages, ONNX export.
Each comparison is against torch.nn on the same weights (or, for the extended cells, against
the same computation done another way)."""

import copy
import importlib.util
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fusedrnn
from fusedrnn import cells, modules, reference
from fusedrnn.testing import assert_close, flatten_result, make_pair, make_weights

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
I, H, T, B = 3, 4, 5, 2
SEQ = modules.SEQUENCE_MODULES
CELL_MODS = modules.CELL_MODULES
# the cells torch.nn has exactly: torch.nn's module is a second reference
TORCH_CELLS = [n for n, c in cells.CELLS.items() if c.in_torch_nn]
TORCH_SEQ = {n: nn.LSTM if cells.CELLS[n].has_cell_state else nn.GRU for n in TORCH_CELLS}
TORCH_CELL = {n: nn.LSTMCell if cells.CELLS[n].has_cell_state else nn.GRUCell for n in TORCH_CELLS}


def _has_c(cell):
    """An LSTM-family cell: its state is (h, c)."""
    return cells.CELLS[cell].has_cell_state


def _tensors(res):
    """Flat list of the tensors of a module's or a cell's result."""
    if isinstance(res, torch.Tensor):
        return [res]
    if isinstance(res, tuple) and all(isinstance(t, torch.Tensor) for t in res):
        return list(res)
    return flatten_result(res)


def _functional_sum(tensors, seed=7):
    """A fixed random linear functional of all tensors: every output reaches every gradient."""
    gen = torch.Generator().manual_seed(seed)
    return sum(
        (t * torch.randn(t.shape, generator=gen, dtype=F64).to(t.dtype)).sum() for t in tensors
    )


def _cos_sum(tensors, seed=0):
    """A fixed linear functional like _functional_sum, made of tensor ops only (no Generator)
    so that torch.compile traces it without a graph break."""
    total = 0
    for k, t in enumerate(tensors):
        w = torch.arange(t.numel(), dtype=t.dtype, device=t.device).reshape(t.shape)
        total = total + (t * (w * 0.37 + k + seed).cos()).sum()
    return total


# ---- 9. torch.nn's messages ------------------------------------------------------------------


@pytest.mark.parametrize("cell", list(SEQ))
def test_dropout_on_one_layer_warns_like_torch(cell):
    with pytest.warns(UserWarning) as t_rec:
        nn.LSTM(I, H, dropout=0.5)
    with pytest.warns(
        UserWarning, match="dropout option adds dropout after all but last recurrent layer"
    ) as f_rec:
        SEQ[cell](I, H, dropout=0.5)
    assert str(f_rec[0].message) == str(t_rec[0].message)
    assert f_rec[0].filename == __file__  # the warning points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SEQ[cell](I, H, num_layers=2, dropout=0.5)
        SEQ[cell](I, H, dropout=0.0)


def test_gru_proj_size_raises_value_error_like_torch():
    with pytest.raises(ValueError) as t_exc:
        nn.GRU(I, H, proj_size=2)
    with pytest.raises(ValueError) as f_exc:
        fusedrnn.GRU(I, H, proj_size=2)
    assert str(f_exc.value) == str(t_exc.value)
    with pytest.raises(TypeError, match="bogus"):  # other unknown keywords: Python's TypeError
        fusedrnn.GRU(I, H, bogus=1)


@pytest.mark.parametrize("cell", cells.LSTM_FAMILY)
def test_lstm_hx_tensor_raises_runtime_error_like_torch(cell):
    x = torch.randn(T, B, I, dtype=F64)
    hx = torch.zeros(2, B, H, dtype=F64)  # a Tensor where (h_0, c_0) is expected
    with pytest.raises(RuntimeError):
        nn.LSTM(I, H, dtype=F64)(x, hx)
    with pytest.raises(RuntimeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        SEQ[cell](I, H, dtype=F64)(x, hx)


# ---- 5. in-place operations on the outputs ----------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cell", list(SEQ))
def test_inplace_on_output_keeps_backward_correct(cell, batch_first):
    """relu_ on the output (the backward saves the op's output: the module returns a copy).
    LSTM / GRU: gradients equal torch.nn's; the extended cells: equal to the out-of-place
    relu's (torch.nn has no such module)."""
    kw = dict(num_layers=1, batch_first=batch_first)
    x0 = torch.randn(B, T, I, dtype=F64) if batch_first else torch.randn(T, B, I, dtype=F64)
    if cell in TORCH_SEQ:
        t, f = make_pair(TORCH_SEQ[cell], SEQ[cell], I, H, **kw)
        runs = [(f, True), (t, True)]
    else:
        f = SEQ[cell](I, H, dtype=F64, **kw)
        runs = [(f, True), (f, False)]
    grads = []
    for m, inplace in runs:
        m.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        out, state = m(x)
        y = torch.relu_(out) if inplace else torch.relu(out)
        _functional_sum([y] + _tensors((out, state))[1:]).backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert_close(a, b, F64, "gradient after relu_")


def test_inplace_on_gru_output_issue_example():
    m = fusedrnn.GRU(4, 3)
    torch.relu_(m(torch.randn(5, 2, 4))[0]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# ---- 3. torch.compile training -----------------------------------------------------------------


def _real_and_fake(op, args):
    """(real result, fake result) of an op on real arguments and their fake copies."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fargs)
    return real, fake


@pytest.mark.parametrize("cell", list(SEQ))
def test_fake_impls_match_real_strides(cell):
    """The fake (meta) forward and backward give the shapes and strides of the real kernels,
    with a batch_first-like (transposed, non-contiguous) input: inductor asserts them."""
    w = make_weights(cell, I, H, dtype=F64)
    x = torch.randn(B, T, I, dtype=F64).transpose(0, 1)  # (T, B, I) view, strides (I, T*I, 1)
    hx = torch.randn(B, H, dtype=F64)
    cx = torch.randn(B, H, dtype=F64)
    ws = [w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"]]
    if not _has_c(cell):
        fwd_args = [x, *ws, hx, None, False, True]
    else:
        fwd_args = [x, *ws, w["weight_ch"], w["weight_hr"], hx, cx, None, False, True]
    fwd = getattr(torch.ops.fusedrnn, f"{cell}_forward").default
    bwd = getattr(torch.ops.fusedrnn, f"{cell}_backward").default
    real, fake = _real_and_fake(fwd, fwd_args)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride(), (r.stride(), f.stride())
    out, hy = real[0], real[1]
    g_out, g_hy = torch.randn_like(out), torch.randn_like(hy)
    if not _has_c(cell):
        bwd_args = [g_out, g_hy, x, *ws, hx, None, False, out, real[2], [True, True]]
    else:
        bwd_args = [
            g_out,
            g_hy,
            torch.randn_like(real[2]),
            x,
            *ws,
            w["weight_ch"],
            w["weight_hr"],
            hx,
            cx,
            None,
            False,
            out,
            real[3],
            [True, True],
        ]
    real_g, fake_g = _real_and_fake(bwd, bwd_args)
    for r, f in zip(real_g, fake_g):
        assert r.shape == f.shape and r.stride() == f.stride(), (r.stride(), f.stride())


class _EmbedLSTM(nn.Module):
    def __init__(self, lstm_cls, batch_first):
        super().__init__()
        self.emb = nn.Embedding(7, I, dtype=F64)
        self.rnn = lstm_cls(I, H, batch_first=batch_first, dtype=F64)
        self.head = nn.Linear(H, 2, dtype=F64)

    def forward(self, tokens):
        out, (h, c) = self.rnn(self.emb(tokens))
        return self.head(out).pow(2).mean() + h.sum() + c.sum()


def test_torch_compile_inductor_embedding_lstm_batch_first_training():
    """The issue's model: Embedding -> LSTM(batch_first=True), whose input (the embedding)
    needs a gradient; torch.compile (inductor, fullgraph) training equals torch.nn eagerly."""
    torch._dynamo.reset()
    ref = _EmbedLSTM(nn.LSTM, True)
    fused = _EmbedLSTM(fusedrnn.LSTM, True)
    fused.load_state_dict(ref.state_dict())
    compiled = torch.compile(fused, fullgraph=True)
    tokens = torch.randint(0, 7, (B, T))
    results = []
    # Inductor's caches off: a graph compiled earlier (same graph, other fake kernels) must
    # not stand in for this compile, whose generated code asserts the fake strides.
    with torch._inductor.config.patch(force_disable_caches=True):
        for m in (ref, compiled):
            loss = m(tokens)
            loss.backward()
            results.append([loss.detach()] + [p.grad for p in m.parameters()])
    for a, b in zip(results[1], results[0]):
        assert_close(a, b, F64, "compiled fused vs torch.nn")


COMPILE_CASES = [
    ("lstm", dict(batch_first=True, bidirectional=True, num_layers=2, proj_size=2)),
    ("lstm", dict(batch_first=False, bias=False)),
    ("gru", dict(batch_first=True, bidirectional=True)),
    ("gru", dict(batch_first=False, num_layers=2)),
    ("peephole_lstm", dict(batch_first=True, num_layers=2)),
    ("wm_lstm", dict(batch_first=False, bidirectional=True)),
]
# a cell without a case of its own above runs with one default configuration
COMPILE_CASES += [
    (n, dict(batch_first=True, bidirectional=True))
    for n in cells.CELLS
    if n not in {c for c, _ in COMPILE_CASES}
]


@pytest.mark.parametrize("cell,kw", COMPILE_CASES, ids=lambda v: str(v))
def test_torch_compile_training_module_options(cell, kw):
    """torch.compile(fullgraph=True) forward + backward with an input that needs a gradient
    (after a Linear), with an initial state, against eager (and torch.nn for LSTM / GRU). The
    aot_eager backend runs dynamo and AOTAutograd (fake tensors, joint graph) without
    inductor's C++ compile (~20 s a graph on 2 cores); inductor's stride checks are covered by
    the test above and test_fake_impls_match_real_strides."""
    torch._dynamo.reset()
    rnn = SEQ[cell](I, H, dtype=F64, **kw)
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    x0 = torch.randn(B, T, I, dtype=F64) if kw["batch_first"] else torch.randn(T, B, I, dtype=F64)
    h0 = torch.randn(L * D, B, kw.get("proj_size", 0) or H, dtype=F64)
    c0 = torch.randn(L * D, B, H, dtype=F64)

    def model_of(r):
        lin = nn.Linear(I, I, dtype=F64)
        torch.nn.init.eye_(lin.weight)  # the same Linear for every variant
        torch.nn.init.zeros_(lin.bias)

        def f(x):
            y = lin(x)
            res = r(y, (h0, c0) if _has_c(cell) else h0)
            return _cos_sum(_tensors(res)), lin

        return f

    variants = [("eager", rnn, False), ("compiled", rnn, True)]
    if cell in TORCH_SEQ:
        t = TORCH_SEQ[cell](I, H, dtype=F64, **kw)
        t.load_state_dict(rnn.state_dict())
        variants.append(("torch.nn", t, False))
    results = {}
    for name, r, comp in variants:
        r.zero_grad(set_to_none=True)
        f = model_of(r)
        if comp:
            f = torch.compile(f, fullgraph=True, backend="aot_eager")
        x = x0.clone().requires_grad_()
        loss, _ = f(x)
        loss.backward()
        results[name] = [loss.detach(), x.grad] + [p.grad for p in r.parameters()]
    for name in results:
        for a, b in zip(results[name], results["eager"]):
            assert_close(a, b, F64, f"{name} vs eager")


@pytest.mark.parametrize("cell", list(CELL_MODS))
def test_torch_compile_training_cells(cell):
    """A few steps of a cell, compiled (fullgraph), forward + backward equal eager."""
    torch._dynamo.reset()
    c = CELL_MODS[cell](I, H, dtype=F64)
    x0 = torch.randn(3, B, I, dtype=F64)

    def f(x):
        h = torch.zeros(B, H, dtype=F64)
        s = (h, h) if _has_c(cell) else h
        total = 0
        for t in range(x.shape[0]):
            s = c(x[t], s)
            total = total + _cos_sum(_tensors(s), seed=t)
        return total

    res = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        c.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        res.append([loss.detach(), x.grad] + [p.grad for p in c.parameters()])
    for a, b in zip(res[1], res[0]):
        assert_close(a, b, F64, "compiled cell vs eager")


# ---- 7. isinstance ---------------------------------------------------------------------------


def test_isinstance_torch_nn_bases():
    for cls in SEQ.values():
        assert isinstance(cls(I, H), nn.RNNBase)
    for cls in CELL_MODS.values():
        assert isinstance(cls(I, H), nn.RNNCellBase)
    for cell, tcls in TORCH_CELL.items():  # torch.nn.LSTMCell / GRUCell
        assert isinstance(CELL_MODS[cell](I, H), tcls)


def test_apply_init_reaches_converted_modules():
    """The usual `model.apply(init)` that tests isinstance(m, nn.RNNBase / nn.RNNCellBase)
    initialises the fused modules as it does torch.nn's."""

    def init(m):
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            for name, p in m.named_parameters():
                if "weight_hh" in name:
                    nn.init.orthogonal_(p)
                elif "bias" in name:
                    nn.init.constant_(p, 0.25)

    def build():
        return nn.Sequential(nn.LSTM(I, H, num_layers=2), nn.Module(), nn.GRUCell(I, H))

    torch.manual_seed(0)
    ref = build()
    fused = fusedrnn.convert(build())
    fused.load_state_dict(ref.state_dict())
    torch.manual_seed(1)
    ref.apply(init)
    torch.manual_seed(1)
    fused.apply(init)
    assert isinstance(fused[0], fusedrnn.LSTM) and isinstance(fused[2], fusedrnn.GRUCell)
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        assert torch.equal(a, b), n
    assert (fused[0].bias_ih_l1 == 0.25).all()


@pytest.mark.parametrize("cell", list(SEQ))
def test_rnnbase_behaviours(cell):
    """What torch.nn.RNNBase does and the fused modules keep: dtype moves, deepcopy, pickle,
    assigning a new Parameter, flatten_parameters, all_weights / _flat_weights."""
    m = SEQ[cell](I, H, num_layers=2, bidirectional=True)
    m.flatten_parameters()
    m = m.double()
    assert all(p.dtype == F64 for p in m._flat_weights)
    assert [n for names in m._all_weights for n in names] == m._flat_weights_names
    x = torch.randn(T, B, I, dtype=F64)
    out = m(x)[0]
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert_close(clone(x)[0], out, F64, "copy")
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert_close(torch.load(buf, weights_only=False)(x)[0], out, F64, "torch.save")
    m.weight_hh_l0 = nn.Parameter(torch.zeros_like(m.weight_hh_l0))
    assert m._flat_weights[m._flat_weights_names.index("weight_hh_l0")] is m.weight_hh_l0
    assert not torch.equal(m(x)[0], out)


# ---- 8. tracing tools --------------------------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, cell, seq=True):
        super().__init__()
        self.cell, self.seq = cell, seq
        self.rnn = (SEQ if seq else CELL_MODS)[cell](I, H, dtype=F64)
        self.head = nn.Linear(H, 2, dtype=F64)

    def forward(self, x):
        if self.seq:
            out, state = self.rnn(x)
            h = state[0] if _has_c(self.cell) else state
            return self.head(out).sum() + h.sum()
        s = self.rnn(x[0])
        h = s[0] if _has_c(self.cell) else s
        return self.head(h).sum()


@pytest.mark.parametrize("seq", [True, False], ids=["module", "cell"])
@pytest.mark.parametrize("cell", list(SEQ))
def test_fx_symbolic_trace_leaf(cell, seq):
    """torch.fx.symbolic_trace records the fused module as one call_module node (a leaf, as
    torch.nn's RNNs are); the GraphModule gives the eager results and gradients."""
    m = _Holder(cell, seq)
    gm = torch.fx.symbolic_trace(m)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "rnn" in targets, gm.graph
    x = torch.randn(T, B, I, dtype=F64)
    res = []
    for fn in (m, gm):
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward()
        res.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(res[1], res[0]):
        assert_close(a, b, F64, "fx vs eager")


@pytest.mark.parametrize("cell", list(SEQ))
def test_jit_trace(cell):
    """torch.jit.trace passes its own check (check_trace, run under no_grad), and a module
    traced under no_grad trains: its gradients equal eager's."""
    m = _Holder(cell)
    x = torch.randn(T, B, I, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings / deprecation of torch.jit.trace
        traced = torch.jit.trace(m, (x,))
        with torch.no_grad():
            traced_ng = torch.jit.trace(m, (x,))
    res = []
    for fn in (m, traced, traced_ng):
        m.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward()
        res.append([y.detach(), xx.grad] + [p.grad for p in m.parameters()])
    for r in res[1:]:
        for a, b in zip(r, res[0]):
            assert_close(a, b, F64, "traced vs eager")


@pytest.mark.parametrize("seq", [True, False], ids=["module", "cell"])
def test_jit_script_raises_clear_error(seq):
    for cell in SEQ:
        with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.compile"):
            torch.jit.script(_Holder(cell, seq))


# ---- 1, 2. torch.func and forward-mode AD ------------------------------------------------------


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_jvp_cell_matches_torch(cell):
    """The issue's example: torch.func.jvp / jacfwd of a cell in fp32 (were zeros)."""
    f = CELL_MODS[cell](4, 3)
    t = TORCH_CELL[cell](4, 3)
    t.load_state_dict(f.state_dict())
    x = torch.randn(2, 4)
    v = torch.ones_like(x)
    first = (lambda m: lambda x: m(x)[0]) if _has_c(cell) else (lambda m: m)
    _, tan_f = torch.func.jvp(first(f), (x,), (v,))
    _, tan_t = torch.func.jvp(first(t), (x,), (v,))
    assert tan_f.abs().max() > 0
    assert_close(tan_f, tan_t, F32, "jvp")
    assert_close(torch.func.jacfwd(first(f))(x), torch.func.jacfwd(first(t))(x), F32, "jacfwd")
    assert_close(torch.func.jacrev(first(f))(x), torch.func.jacrev(first(t))(x), F32, "jacrev")
    scalar = lambda m: lambda x: first(m)(x).pow(2).sum()  # noqa: E731
    assert_close(torch.func.hessian(scalar(f))(x), torch.func.hessian(scalar(t))(x), F32, "hessian")


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_jvp_module_matches_torch(cell):
    t, f = make_pair(TORCH_SEQ[cell], SEQ[cell], I, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=F64)
    v = torch.randn_like(x)
    outs = [torch.func.jvp(lambda x: _tensors(m(x)), (x,), (v,)) for m in (f, t)]
    for a, b in zip(outs[0][1], outs[1][1]):
        assert a.abs().max() > 0
        assert_close(a, b, F64, "jvp tangent")


@pytest.mark.parametrize("cell", list(SEQ))
def test_forward_ad_dual_tensors(cell):
    """torch.autograd.forward_ad (dual tensors) gives the tangents that reverse mode implies:
    torch.autograd.functional.jvp computes them by double backward through the fused ops."""
    import torch.autograd.forward_ad as fwAD

    m = SEQ[cell](I, H, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64)
    v = torch.randn_like(x)
    with fwAD.dual_level():
        out = m(fwAD.make_dual(x, v))[0]
        tangent = fwAD.unpack_dual(out).tangent
    _, expected = torch.autograd.functional.jvp(lambda x: m(x)[0], x, v)
    assert tangent is not None and tangent.abs().max() > 0
    assert_close(tangent, expected, F64, "forward-mode tangent")


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_func_grad_matches_torch(cell):
    """torch.func.grad (with functional_call over the parameters) of cells and modules equals
    torch.nn's (raised "must override the setup_context staticmethod")."""
    for tcls, fcls, x in (
        (TORCH_SEQ[cell], SEQ[cell], torch.randn(T, B, I, dtype=F64)),
        (TORCH_CELL[cell], CELL_MODS[cell], torch.randn(B, I, dtype=F64)),
    ):
        t, f = make_pair(tcls, fcls, I, H)
        grads = []
        for m in (f, t):
            params = dict(m.named_parameters())

            def loss(p, x):
                return _functional_sum(_tensors(torch.func.functional_call(m, p, (x,))))

            gp, gx = torch.func.grad(loss, argnums=(0, 1))(params, x)
            grads.append([gx] + [gp[n] for n in params])
        for a, b in zip(*grads):
            assert_close(a, b, F64, f"func.grad {fcls.__name__}")


@pytest.mark.parametrize("cell", list(SEQ))
def test_vmap_and_grad_extended(cell):
    """torch.func.vmap over a batch of sequences equals a Python loop; torch.func.grad equals
    ordinary autograd through the fused ops."""
    m = SEQ[cell](I, H, dtype=F64)
    xs = torch.randn(3, T, B, I, dtype=F64)
    batched = torch.func.vmap(lambda x: m(x)[0])(xs)
    looped = torch.stack([m(x)[0] for x in xs])
    assert_close(batched, looped, F64, "vmap")
    gx = torch.func.grad(lambda x: _functional_sum(_tensors(m(x))))(xs[0])
    x = xs[0].clone().requires_grad_()
    _functional_sum(_tensors(m(x))).backward()
    assert_close(gx, x.grad, F64, "func.grad vs autograd")


# ---- 6. convert -----------------------------------------------------------------------------


def _train_step(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x).pow(2).sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LSTM(4, 4, dtype=F64)
        self.b = self.a  # the same module under two names

    def forward(self, x):
        return self.b(self.a(x)[0])[0]


def test_convert_keeps_tied_modules_tied():
    torch.manual_seed(0)
    ref = _Twice()
    torch.manual_seed(0)
    fused = fusedrnn.convert(_Twice())
    assert isinstance(fused.a, fusedrnn.LSTM) and fused.a is fused.b
    assert len(list(fused.parameters())) == len(list(ref.parameters())) == 4
    x = torch.randn(T, B, 4, dtype=F64)
    (l_r, g_r), (l_f, g_f) = _train_step(ref, x), _train_step(fused, x)
    assert_close(l_f, l_r, F64, "loss")
    for a, b in zip(g_f, g_r):
        assert_close(a, b, F64, "grad of the tied module")


def _wn_model(kind):
    torch.manual_seed(3)
    lstm = nn.LSTM(I, H, num_layers=2, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm deprecated
        if kind == "old":
            nn.utils.weight_norm(lstm, "weight_hh_l0")
        else:
            nn.utils.parametrizations.weight_norm(lstm, "weight_hh_l0")
            parametrize.register_parametrization(lstm, "weight_ih_l1", _Scale())
    return nn.Sequential(lstm, _First())


class _Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


class _First(nn.Module):
    def forward(self, res):
        return res[0]


@pytest.mark.parametrize("kind", ["old", "parametrizations"])
def test_convert_weight_norm(kind):
    """torch.nn.utils.weight_norm (old-style hook) and torch.nn.utils.parametrizations: the
    converted module keeps them (same parameters, same results and gradients)."""
    ref = _wn_model(kind)
    fused = fusedrnn.convert(_wn_model(kind))
    assert parametrize.type_before_parametrizations(fused[0]) is fusedrnn.LSTM
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]
    if kind != "old":
        assert parametrize.is_parametrized(fused[0], "weight_hh_l0")
        assert parametrize.is_parametrized(fused[0], "weight_ih_l1")
    x = torch.randn(T, B, I, dtype=F64)
    (l_r, g_r), (l_f, g_f) = _train_step(ref, x), _train_step(fused, x)
    assert_close(l_f, l_r, F64, "loss")
    for a, b in zip(g_f, g_r):
        assert_close(a, b, F64, "grad")


def test_convert_keeps_hooks():
    seen = []
    lstm = nn.LSTM(I, H)
    lstm.register_forward_hook(lambda mod, inp, out: seen.append(type(mod).__name__))
    fused = fusedrnn.convert(lstm)
    fused(torch.randn(T, B, I))
    assert seen == ["LSTM"] and isinstance(fused, fusedrnn.LSTM)


# ---- 4. autocast -------------------------------------------------------------------------------


def _ref64(tmod, *inputs):
    """torch.nn's module in fp64 on the same (already rounded) inputs: the exact answer."""
    t64 = copy.deepcopy(tmod).double()
    return _tensors(t64(*(x.double() for x in inputs)))


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_autocast_cpu_bf16_matches_torch(cell):
    """Linear -> GRU / LSTM under CPU autocast (bf16): the dtype of torch.nn's outputs, values
    within the bf16 rule (design.md §4): err(fused) <= 2 err(torch.nn under autocast) + 1e-2 max
    (both computed in bf16 against torch.nn in fp64 on the same rounded input), and float32
    parameter gradients close to torch.nn's at the same rule."""
    t, f = make_pair(TORCH_SEQ[cell], SEQ[cell], I, H, dtype=F32, num_layers=2)
    lin = nn.Linear(I, I)
    x = torch.randn(T, B, I)
    res = {}
    for name, m in (("torch", t), ("fused", f)):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            y = lin(x)
            outs = _tensors(m(y))
        _functional_sum(outs).backward()
        res[name] = (y, outs, [p.grad for p in m.parameters()])
    y = res["torch"][0]
    assert y.dtype == BF16
    exact = _ref64(t, y)
    for a, b, e in zip(res["fused"][1], res["torch"][1], exact):
        assert a.dtype == b.dtype == BF16
        assert_close(a, e, BF16, "autocast output", b)
    for g_f, g_t in zip(res["fused"][2], res["torch"][2]):
        assert g_f.dtype == g_t.dtype == F32
        # Both gradients come from bf16 forward values (~3 significant digits, eps 2**-8) and
        # a backward through ~10 bf16-rounded steps; 5% of the largest gradient is ~13 bf16
        # ulps, room for those roundings accumulated in different orders, and far below the
        # O(1) relative error of a wrong gradient.
        err = (g_f - g_t).abs().max().item()
        assert err <= 0.05 * g_t.abs().max().item(), err


def test_autocast_cpu_issue_example_and_fp32_input():
    """The issue's example (GRU after a Linear: bf16), an LSTM on a float32 input (torch.nn's
    CPU LSTM casts it to bf16, so does fusedrnn) and the cells on a bf16 input."""
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=BF16):
        assert fusedrnn.GRU(4, 3)(nn.Linear(4, 4)(x))[0].dtype == BF16
        t, f = make_pair(nn.LSTM, fusedrnn.LSTM, 4, 3, dtype=F32)
        out_f = f(x)[0]
        try:
            out_t = t(x)[0]
            assert out_t.dtype == out_f.dtype == BF16
        except RuntimeError as e:
            # torch.nn's CPU LSTM runs oneDNN's bf16 LSTM here, which an AVX2-only CPU lacks
            # ("could not create a primitive descriptor"): the low-precision comparator of the
            # tolerance rule is then the reference computed in bf16.
            if "primitive descriptor" not in str(e):
                raise
            assert out_f.dtype == BF16
            w = [
                p.detach().bfloat16()
                for p in (t.weight_ih_l0, t.weight_hh_l0, t.bias_ih_l0, t.bias_hh_l0)
            ]
            out_t = reference.layer("lstm", x.bfloat16(), *w)[0]
        for cell in TORCH_CELLS:
            tc, fc = make_pair(TORCH_CELL[cell], CELL_MODS[cell], 4, 3, dtype=F32)
            ct, cf = _tensors(tc(x[0].bfloat16())), _tensors(fc(x[0].bfloat16()))
            assert [c.dtype for c in cf] == [c.dtype for c in ct] == [BF16] * len(ct)
    assert_close(out_f, _ref64(t, x)[0], BF16, "LSTM fp32 input under autocast", out_t)


def test_autocast_op_registration():
    """The ops themselves cast under autocast (what torch.compile traces, too): the
    floating-point arguments become the autocast dtype, the integer batch_sizes does not."""
    m = fusedrnn.PeepholeLSTM(I, H)
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=BF16):
        out = torch.ops.fusedrnn.peephole_lstm_forward(
            x,
            m.weight_ih_l0,
            m.weight_hh_l0,
            m.bias_ih_l0,
            m.bias_hh_l0,
            m.weight_ch_l0,
            None,
            None,
            None,
            None,
            False,
            False,
        )
    assert all(t.dtype == BF16 for t in out)
    exact = reference.layer(
        "peephole_lstm",
        x.double(),
        m.weight_ih_l0.double(),
        m.weight_hh_l0.double(),
        m.bias_ih_l0.double(),
        m.bias_hh_l0.double(),
        m.weight_ch_l0.double(),
    )[0]
    bf = reference.layer(
        "peephole_lstm",
        x.bfloat16(),
        *(
            p.detach().bfloat16()
            for p in (m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, m.weight_ch_l0)
        ),
    )[0]
    assert_close(out[0], exact, BF16, "autocast op", bf)


def test_autocast_under_torch_compile():
    """Autocast inside a compiled function (fullgraph): the traced ops get the autocast casts,
    the result equals eager autocast bit for bit (same bf16 kernels on the same bf16
    arguments) and the float32 parameters get float32 gradients."""
    torch._dynamo.reset()
    m = fusedrnn.GRU(4, 3)
    lin = nn.Linear(4, 4)

    def f(x):
        with torch.autocast("cpu", dtype=BF16):
            return m(lin(x))[0]

    x = torch.randn(5, 2, 4)
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert eager.dtype == compiled.dtype == BF16
    assert torch.equal(eager, compiled)
    compiled.float().sum().backward()
    assert m.weight_ih_l0.grad.dtype == F32 and m.weight_ih_l0.grad.abs().sum() > 0


@pytest.mark.skipif(
    not torch.cuda.is_available() or not fusedrnn.build_info()["cuda"],
    reason="needs a CUDA device and the CUDA build of the ops",
)
@pytest.mark.parametrize("dtype", [torch.float16, BF16])
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_autocast_cuda_matches_torch(cell, dtype):
    """CUDA autocast (fp16 / bf16): torch.nn's output dtype; values within 2x torch.nn's own
    error against fp64 plus one rounding of the low-precision dtype (eps 2**-7 for bf16,
    2**-10 for fp16) relative to the largest value."""
    t, f = make_pair(TORCH_SEQ[cell], SEQ[cell], I, H, dtype=F32, device="cuda")
    x = torch.randn(T, B, I, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        ot, of = _tensors(t(x)), _tensors(f(x))
    exact = _ref64(t, x)
    eps = 2.0**-7 if dtype == BF16 else 2.0**-10
    for a, b, e in zip(of, ot, exact):
        assert a.dtype == b.dtype == dtype
        err_f, err_t = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err_f <= 2 * err_t + 2 * eps * e.abs().max().item(), (err_f, err_t)


# ---- ONNX export -------------------------------------------------------------------------------

_HAS_ONNX = all(
    importlib.util.find_spec(n) is not None for n in ("onnx", "onnxscript", "onnxruntime")
)
needs_onnx = pytest.mark.skipif(
    not _HAS_ONNX,
    reason="onnx, onnxscript and onnxruntime are not installed (pip install fusedrnn[onnx])",
)


class _Export(nn.Module):
    def __init__(self, cell, **kw):
        super().__init__()
        self.cell = cell
        self.rnn = SEQ[cell](I, H, num_layers=2, bidirectional=True, batch_first=True, **kw)

    def forward(self, x, h0, c0):
        if not _has_c(self.cell):
            out, h = self.rnn(x, h0)
            return out, h
        out, (h, c) = self.rnn(x, (h0, c0))
        return out, h, c


@needs_onnx
@pytest.mark.parametrize(
    "cell,kw,onnx_op",
    [
        # every cell as the ONNX operator its table entry names (None: standard operators)
        *[(n, {}, c.onnx) for n, c in cells.CELLS.items()],
        # a projection has no ONNX LSTM operator
        ("lstm", dict(proj_size=2), None),
        # DropConnect drops nothing in eval: the same operators, the module's weights
        ("lstm", dict(dropconnect=0.5), "LSTM"),
        ("gru", dict(dropconnect=0.5), "GRU"),
    ],
    ids=lambda v: str(v),
)
def test_onnx_export_runs_in_onnxruntime(cell, kw, onnx_op, tmp_path):
    """torch.onnx.export(dynamo=True) of a 2-layer bidirectional batch_first module with
    initial states: LSTM, GRU and the peephole LSTM become ONNX's LSTM / GRU operators, the
    working-memory LSTM and the projected LSTM standard operators; onnxruntime's outputs
    equal PyTorch's at fp32 tolerance (1e-5: float32 rounding in both, summed in different
    orders over a few short dot products and 5 steps)."""
    import onnxruntime as ort

    m = _Export(cell, **kw).eval()
    Hh = kw.get("proj_size", 0) or H
    args = (torch.randn(B, T, I), torch.randn(4, B, Hh), torch.randn(4, B, H))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(m, args, dynamo=True, verbose=False)
    ops = [n.op_type for n in program.model_proto.graph.node]
    domains = {n.domain for n in program.model_proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only
    if onnx_op is not None:
        assert ops.count(onnx_op) == 4, ops  # one per layer and direction
    else:
        assert "LSTM" not in ops and "MatMul" in ops, ops
    path = tmp_path / "model.onnx"
    program.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        expected = m(*args)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, atol=1e-5, rtol=1e-5)
