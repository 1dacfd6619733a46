"""Module-level tests: fusedrnn.LSTM / GRU / PeepholeLSTM / WorkingMemoryLSTM, the cells and
convert(), against torch.nn and a module-level reference built from fusedrnn.reference
(the README's API; design.md §3, §4)."""

import copy
import math
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import fusedrnn
from fusedrnn import cells, modules, reference
from fusedrnn.testing import assert_close, compare_modules, flatten_result, make_pair

F64 = torch.float64
F32 = torch.float32
I, H, T, B = 2, 5, 4, 3
LENGTHS = [2, 4, 1]  # unsorted, with a gap, for packed inputs (enforce_sorted=False)

FUSED_OF = modules.SEQUENCE_MODULES
CELL_OF = modules.CELL_MODULES
ALL_CELLS = list(cells.CELLS)
# the cells torch.nn has exactly (a second reference), and those it lacks (checked against the
# module-level reference RefRNN / fusedrnn.reference)
TORCH_CELLS = [n for n, c in cells.CELLS.items() if c.in_torch_nn]
EXTENDED_CELLS = [n for n, c in cells.CELLS.items() if not c.in_torch_nn]
WEIGHT_CH_CELLS = [n for n, c in cells.CELLS.items() if c.weight_ch is not None]


def _torch_seq(cell):
    """torch.nn's sequence module of a cell's family: nn.LSTM with a cell state, else nn.GRU."""
    return nn.LSTM if cells.CELLS[cell].has_cell_state else nn.GRU


def _torch_step(cell):
    return nn.LSTMCell if cells.CELLS[cell].has_cell_state else nn.GRUCell


TORCH_OF = {n: (_torch_seq(n), FUSED_OF[n]) for n in TORCH_CELLS}


def _plain_of(cell):
    """The fused module of the torch.nn cell of the same family (the LSTM for the LSTM family):
    what a cell with a weight_ch is with its cell connections removed."""
    same = cells.CELLS[cell].has_cell_state
    return FUSED_OF[next(n for n in TORCH_CELLS if cells.CELLS[n].has_cell_state == same)]


def _dname(d):
    return str(d).replace("torch.", "")


def make_seq_input(kind, batch_first, dtype, lengths=LENGTHS, T_=T, I_=I):
    """padded (T, B, I) / (B, T, I), unbatched (T, I) or a PackedSequence with unsorted lengths."""
    Bn = len(lengths)
    if kind == "unbatched":
        return torch.randn(T_, I_, dtype=F64).to(dtype)
    x = torch.randn(T_, Bn, I_, dtype=F64).to(dtype)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    if kind == "padded":
        return x
    if kind == "packed_sorted":  # enforce_sorted=True: sorted_indices is None
        return pack_padded_sequence(
            x,
            torch.tensor(sorted(lengths, reverse=True)),
            batch_first=batch_first,
            enforce_sorted=True,
        )
    assert kind == "packed"
    return pack_padded_sequence(
        x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
    )


def make_seq_state(is_lstm, num_layers, bidirectional, proj, kind, dtype, Bn=B, H_=H):
    D = 2 if bidirectional else 1
    shape = (num_layers * D,) + (() if kind == "unbatched" else (Bn,))
    h = torch.randn(*shape, proj or H_, dtype=F64).to(dtype)
    if not is_lstm:
        return h
    return h, torch.randn(*shape, H_, dtype=F64).to(dtype)


# ---- a module-level reference from fusedrnn.reference.layer -------------------------------------


class RefRNN(nn.Module):
    """Multi-layer / bidirectional / packed / batch_first / unbatched recurrence written with
    fusedrnn.reference.layer, with torch.nn's semantics; parameters copied from `like`."""

    def __init__(self, cell, like: nn.Module):
        super().__init__()
        self.cell = cell
        for a in (
            "input_size",
            "hidden_size",
            "num_layers",
            "bias",
            "batch_first",
            "bidirectional",
        ):
            setattr(self, a, getattr(like, a))
        self.proj_size = getattr(like, "proj_size", 0)
        for name, p in like.named_parameters():
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def forward(self, input, hx=None):
        is_lstm = cells.CELLS[self.cell].has_cell_state
        D = 2 if self.bidirectional else 1
        H_out = self.proj_size or self.hidden_size
        packed = isinstance(input, PackedSequence)
        unbatched = False
        bs = None
        if packed:
            x, bs, sorted_idx, unsorted_idx = input
            Bn = int(bs[0])
        else:
            x = input
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
            Bn = x.shape[1]
        if hx is None:
            h0 = x.new_zeros(self.num_layers * D, Bn, H_out)
            c0 = x.new_zeros(self.num_layers * D, Bn, self.hidden_size)
        else:
            h0, c0 = hx if is_lstm else (hx, None)
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            if packed and sorted_idx is not None:
                h0 = h0.index_select(1, sorted_idx)
                c0 = c0.index_select(1, sorted_idx) if c0 is not None else None
        hs, cs = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                g = lambda n: getattr(self, n + sfx, None)  # noqa: E731
                k = layer * D + d
                out, h, c = reference.layer(
                    self.cell,
                    layer_in,
                    g("weight_ih"),
                    g("weight_hh"),
                    g("bias_ih"),
                    g("bias_hh"),
                    g("weight_ch"),
                    g("weight_hr"),
                    h0[k],
                    c0[k] if (is_lstm and c0 is not None) else None,
                    bs,
                    d == 1,
                )
                outs.append(out)
                hs.append(h)
                cs.append(c)
            layer_in = torch.cat(outs, -1)
        h_n = torch.stack(hs)
        c_n = torch.stack(cs) if is_lstm else None
        if packed:
            output = PackedSequence(layer_in, bs, sorted_idx, unsorted_idx)
            if unsorted_idx is not None:
                h_n = h_n.index_select(1, unsorted_idx)
                c_n = c_n.index_select(1, unsorted_idx) if is_lstm else None
        else:
            output = layer_in
            if unbatched:
                output, h_n = output.squeeze(1), h_n.squeeze(1)
                c_n = c_n.squeeze(1) if is_lstm else None
            elif self.batch_first:
                output = output.transpose(0, 1)
        return output, ((h_n, c_n) if is_lstm else h_n)


def test_backend_is_fused():
    """This environment runs the compiled ops: a silent fallback to the reference would make
    the module comparisons below meaningless for the fused kernels."""
    assert fusedrnn.backend() == "fused", fusedrnn._ops.LOAD_ERROR
    info = fusedrnn.build_info()
    assert info["backend"] == "fused" and info["load_error"] is None and info["cpu"]


def test_modules_call_the_fused_ops():
    """A forward/backward of each module dispatches to torch.ops.fusedrnn.* (one forward call
    per layer and direction, one backward call each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("fusedrnn."):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for cell, cls in FUSED_OF.items():
        m = cls(I, H, num_layers=2, bidirectional=True, dtype=F64)
        x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
        with Log() as log:
            out = m(x)[0]
            out.sum().backward()
        assert log.ops.count(f"fusedrnn.{cell}_forward.default") == 4, log.ops
        assert log.ops.count(f"fusedrnn.{cell}_backward.default") == 4, log.ops


# ---- fusedrnn.LSTM / GRU against torch.nn ---------------------------------------------------

# (mode, num_layers, bidirectional, batch_first, bias, proj_size, input kind, initial state,
#  dtype): a curated covering of the combinations rather than their full product.
MODULE_CASES = [
    ("lstm", 1, False, False, True, 0, "padded", False, F64),
    ("lstm", 1, False, False, True, 0, "padded", True, F32),
    ("lstm", 2, True, False, True, 0, "packed", True, F64),
    ("lstm", 2, True, True, False, 0, "packed", False, F32),
    ("lstm", 3, False, True, True, 2, "padded", True, F64),
    ("lstm", 3, True, False, True, 2, "packed", True, F64),
    ("lstm", 1, True, False, False, 3, "unbatched", True, F64),
    ("lstm", 2, False, False, True, 0, "unbatched", False, F32),
    ("lstm", 1, False, True, True, 2, "padded", False, F32),
    ("lstm", 2, True, True, True, 2, "padded", True, F32),
    ("lstm", 1, False, False, False, 0, "packed", True, F64),
    ("lstm", 3, True, True, False, 3, "packed", False, F64),
    ("lstm", 2, True, False, True, 0, "unbatched", True, F64),
    ("lstm", 1, True, True, True, 0, "padded", True, F64),
    ("lstm", 2, False, False, False, 2, "packed", True, F32),
    ("lstm", 3, False, False, True, 0, "padded", False, F32),
    ("lstm", 1, False, False, True, 4, "unbatched", False, F64),
    ("lstm", 2, True, False, True, 2, "packed", False, F32),
    ("lstm", 3, True, True, True, 0, "padded", False, F64),
    ("lstm", 1, True, False, True, 1, "packed", True, F32),
    ("lstm", 2, True, True, True, 3, "packed", True, F64),
    ("lstm", 2, True, True, True, 2, "unbatched", True, F64),
    ("lstm", 2, True, False, True, 0, "packed_sorted", True, F64),
    ("gru", 1, False, False, True, 0, "padded", False, F64),
    ("gru", 1, False, False, True, 0, "padded", True, F32),
    ("gru", 2, True, False, True, 0, "packed", True, F64),
    ("gru", 2, True, True, False, 0, "packed", False, F32),
    ("gru", 3, False, True, True, 0, "padded", True, F64),
    ("gru", 3, True, False, True, 0, "packed", True, F64),
    ("gru", 1, True, False, False, 0, "unbatched", True, F64),
    ("gru", 2, False, False, True, 0, "unbatched", False, F32),
    ("gru", 1, False, True, True, 0, "padded", False, F32),
    ("gru", 2, True, True, True, 0, "padded", True, F32),
    ("gru", 1, False, False, False, 0, "packed", True, F64),
    ("gru", 3, True, True, False, 0, "packed", False, F64),
    ("gru", 2, True, False, True, 0, "unbatched", True, F64),
    ("gru", 1, True, True, True, 0, "padded", True, F64),
    ("gru", 3, False, False, True, 0, "packed", True, F32),
    ("gru", 2, True, False, True, 0, "packed", False, F32),
    ("gru", 1, False, True, True, 0, "unbatched", False, F64),
    ("gru", 2, True, False, False, 0, "packed_sorted", True, F32),
]


def _case_id(c):
    mode, L, bi, bf, bias, proj, kind, state, dtype = c
    return (
        f"{mode}-L{L}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}-"
        f"{'bias' if bias else 'nobias'}-p{proj}-{kind}-{'h0' if state else 'noh0'}-"
        f"{_dname(dtype)}"
    )


def _kwargs(mode, L, bi, bf, bias, proj):
    kw = dict(num_layers=L, bidirectional=bi, batch_first=bf, bias=bias)
    if cells.CELLS[mode].has_cell_state:
        kw["proj_size"] = proj
    return kw


@pytest.mark.parametrize("case", MODULE_CASES, ids=_case_id)
def test_module_matches_torch(case):
    """Outputs, final states and gradients (input, initial state, every parameter) equal
    torch.nn's at design.md §4 tolerances."""
    mode, L, bi, bf, bias, proj, kind, state, dtype = case
    tcls, fcls = TORCH_OF[mode]
    ref, fused = make_pair(tcls, fcls, I, H, dtype=dtype, **_kwargs(mode, L, bi, bf, bias, proj))
    inp = make_seq_input(kind, bf, dtype)
    hx = (
        make_seq_state(cells.CELLS[mode].has_cell_state, L, bi, proj, kind, dtype)
        if state
        else None
    )
    (t_ref, _), (t_fus, _) = compare_modules(ref, fused, inp, hx, dtype)
    if kind.startswith("packed"):
        out_ref = ref(inp)[0]
        out_fus = fused(inp)[0]
        assert isinstance(out_fus, PackedSequence)
        assert torch.equal(out_fus.batch_sizes, out_ref.batch_sizes)
        for a, b in (
            (out_fus.sorted_indices, out_ref.sorted_indices),
            (out_fus.unsorted_indices, out_ref.unsorted_indices),
        ):
            assert (a is None and b is None) or torch.equal(a, b)
        padded, lens = pad_packed_sequence(out_fus, batch_first=bf)
        assert lens.tolist() == (LENGTHS if kind == "packed" else sorted(LENGTHS)[::-1])
    for a, b in zip(t_fus, t_ref):
        assert a.shape == b.shape


def test_reference_module_matches_torch():
    """The test's module-level reference (RefRNN) agrees with torch.nn on LSTM and GRU, so it
    is a valid oracle for the peephole and working-memory modules."""
    for mode in TORCH_CELLS:
        lstm_like = cells.CELLS[mode].has_cell_state
        kw = dict(proj_size=2) if lstm_like else {}
        tcls, _ = TORCH_OF[mode]
        tm = tcls(I, H, num_layers=2, bidirectional=True, dtype=F64, **kw)
        rm = RefRNN(mode, tm)
        inp = make_seq_input("packed", False, F64)
        hx = make_seq_state(lstm_like, 2, True, kw.get("proj_size", 0), "packed", F64)
        compare_modules(tm, rm, inp, hx, F64)


@pytest.mark.parametrize("dropout_mode", ["eval", "train"])
@pytest.mark.parametrize("mode", TORCH_CELLS)
def test_dropout(mode, dropout_mode):
    """dropout > 0: in eval mode the output equals torch's; in training mode it differs from
    the eval output with a fixed seed and gradients reach every parameter."""
    tcls, fcls = TORCH_OF[mode]
    ref, fused = make_pair(tcls, fcls, I, H, num_layers=3, dropout=0.5, bidirectional=True)
    inp = make_seq_input("padded", False, F64)
    if dropout_mode == "eval":
        ref.eval()
        fused.eval()
        compare_modules(ref, fused, inp, None, F64)
        return
    fused.train()
    torch.manual_seed(3)
    out_train = fused(inp)[0]
    torch.manual_seed(3)
    out_train2 = fused(inp)[0]
    assert torch.equal(out_train, out_train2), "same seed must give the same dropout mask"
    fused.eval()
    out_eval = fused(inp)[0]
    assert (out_train - out_eval).abs().max() > 1e-3
    fused.train()
    x = inp.clone().requires_grad_()
    torch.manual_seed(4)
    fused(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in fused.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # dropout applies between layers only: with one layer training and eval agree
    one = fcls(I, H, num_layers=1, dropout=0.5, dtype=F64)
    one.train()
    a = one(inp)[0]
    one.eval()
    assert torch.equal(a, one(inp)[0])


# ---- PeepholeLSTM / WorkingMemoryLSTM against the module-level reference -----------------------

EXT_CASES = [
    # (num_layers, bidirectional, batch_first, bias, proj, kind, state, dtype)
    (2, True, False, True, 0, "packed", True, F64),
    (2, True, False, True, 2, "packed", True, F64),
    (2, True, True, False, 3, "packed", False, F32),
    (1, False, False, True, 0, "padded", False, F64),
    (3, False, True, True, 2, "padded", True, F32),
    (2, True, False, False, 0, "unbatched", True, F64),
    (1, True, True, True, 4, "padded", True, F64),
]


@pytest.mark.parametrize("case", EXT_CASES, ids=lambda c: _case_id(("x",) + c[:3] + c[3:]))
@pytest.mark.parametrize("cell", EXTENDED_CELLS)
def test_extended_lstm_matches_reference(cell, case):
    L, bi, bf, bias, proj, kind, state, dtype = case
    lstm_like = cells.CELLS[cell].has_cell_state
    if proj and not lstm_like:
        pytest.skip("only the LSTM family has a projection")
    kw = dict(proj_size=proj) if lstm_like else {}
    fused = FUSED_OF[cell](
        I, H, num_layers=L, bidirectional=bi, batch_first=bf, bias=bias, dtype=dtype, **kw
    )
    # weights larger than the default init so the cell connections matter
    with torch.no_grad():
        for p in fused.parameters():
            p.uniform_(-0.8, 0.8)
    ref = RefRNN(cell, fused)
    inp = make_seq_input(kind, bf, dtype)
    hx = make_seq_state(lstm_like, L, bi, proj, kind, dtype) if state else None
    compare_modules(ref, fused, inp, hx, dtype)


@pytest.mark.parametrize("cell", WEIGHT_CH_CELLS)
def test_extended_lstm_differs_from_lstm(cell):
    """The cell connections are used: with weight_ch != 0 the output differs from a plain
    LSTM with the same other weights, and with weight_ch = 0 (peephole) it equals it."""
    fused = FUSED_OF[cell](I, H, num_layers=2, dtype=F64)
    lstm = _plain_of(cell)(I, H, num_layers=2, dtype=F64)
    sd = {k: v for k, v in fused.state_dict().items() if "weight_ch" not in k}
    lstm.load_state_dict(sd)
    x = torch.randn(T, B, I, dtype=F64)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "weight_ch" in name:
                p.uniform_(0.5, 1.0)
    assert (fused(x)[0] - lstm(x)[0]).abs().max() > 1e-4
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "weight_ch" in name:
                p.zero_()
    # tanh(0) = 0 for the WM cell too: zero connections give the plain LSTM
    assert_close(fused(x)[0], lstm(x)[0], F64)


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_module_bf16(cell):
    """bf16 module (packed, bidirectional, two layers): outputs within design.md §4's bf16 rule
    against the module-level reference run in fp64 and in bf16."""
    kw = dict(proj_size=2) if cells.CELLS[cell].has_cell_state else {}
    fused = FUSED_OF[cell](I, H, num_layers=2, bidirectional=True, dtype=torch.bfloat16, **kw)
    ref_bf16 = RefRNN(cell, fused)
    ref64 = RefRNN(cell, fused).double()
    inp = make_seq_input("packed", False, torch.bfloat16)
    inp64 = PackedSequence(
        inp.data.double(), inp.batch_sizes, inp.sorted_indices, inp.unsorted_indices
    )
    with torch.no_grad():
        got = flatten_result(fused(inp))
        lowp = flatten_result(ref_bf16(inp))
        exp = flatten_result(ref64(inp64))
    for name, g, lp, e in zip(("output", "h_n", "c_n"), got, lowp, exp):
        assert_close(g, e, torch.bfloat16, name, lp)


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_module_empty_batch_like_torch(cell):
    """A batch of size 0 gives empty outputs of torch's shapes (torch.nn.LSTM/GRU accept it)."""
    tcls = _torch_seq(cell)
    ref = tcls(I, H, num_layers=2, bidirectional=True, dtype=F64)
    fused = FUSED_OF[cell](I, H, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(T, 0, I, dtype=F64)
    for a, b in zip(flatten_result(fused(x)), flatten_result(ref(x))):
        assert a.shape == b.shape


def test_inference_mode_and_no_grad():
    m = fusedrnn.WorkingMemoryLSTM(I, H, num_layers=2, bidirectional=True, dtype=F64)
    x = make_seq_input("packed", False, F64)
    exp = flatten_result(m(x))
    with torch.inference_mode():
        got = flatten_result(m(x))
    with torch.no_grad():
        got2 = flatten_result(m(x))
    for a, b, c in zip(got, got2, exp):
        assert not a.requires_grad and not b.requires_grad
        assert torch.equal(a, c) and torch.equal(b, c)


# ---- gradcheck through the modules ----------------------------------------------------------


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_module_gradcheck(cell):
    """fp64 gradcheck w.r.t. the packed input data, the initial state and every parameter of a
    packed bidirectional two-layer module."""
    lstm_like = cells.CELLS[cell].has_cell_state
    kw = dict(proj_size=1) if lstm_like else {}
    m = FUSED_OF[cell](2, 2, num_layers=2, bidirectional=True, dtype=F64, **kw)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    packed = make_seq_input("packed", False, F64, lengths=[2, 3], T_=3, I_=2)
    data = packed.data.clone().requires_grad_()
    state = make_seq_state(lstm_like, 2, True, kw.get("proj_size", 0), "packed", F64, Bn=2, H_=2)
    state = [s.requires_grad_() for s in (state if isinstance(state, tuple) else (state,))]

    def fn(data, *rest):
        st = rest[: len(state)]
        ps = dict(zip(names, rest[len(state) :]))
        inp = PackedSequence(
            data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
        )
        hx = tuple(st) if lstm_like else st[0]
        out, hn = torch.func.functional_call(m, ps, (inp, hx))
        return (out.data,) + (tuple(hn) if isinstance(hn, tuple) else (hn,))

    # finite-difference tolerances, as in test_ops.test_gradcheck_fp64
    assert torch.autograd.gradcheck(fn, (data, *state, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- parameters -------------------------------------------------------------------------------

PARAM_CONFIGS = [
    dict(),
    dict(num_layers=3, bidirectional=True),
    dict(num_layers=2, bias=False),
    dict(num_layers=2, bidirectional=True, proj_size=2),
    dict(num_layers=1, bias=False, proj_size=4),
]


@pytest.mark.parametrize("kw", PARAM_CONFIGS, ids=lambda k: str(k))
@pytest.mark.parametrize("mode", TORCH_CELLS)
def test_parameter_names_and_order_match_torch(mode, kw):
    if not cells.CELLS[mode].has_cell_state and "proj_size" in kw:
        kw = {k: v for k, v in kw.items() if k != "proj_size"}
    tcls, fcls = TORCH_OF[mode]
    t, f = tcls(I, H, **kw), fcls(I, H, **kw)
    assert list(f.state_dict().keys()) == list(t.state_dict().keys())
    assert [n for n, _ in f.named_parameters()] == [n for n, _ in t.named_parameters()]
    for (n, a), (_, b) in zip(f.named_parameters(), t.named_parameters()):
        assert a.shape == b.shape, n
    assert f._flat_weights_names == t._flat_weights_names
    # load both ways, unchanged
    f.load_state_dict(t.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(f.state_dict()[k], v)
    t2 = tcls(I, H, **kw)
    t2.load_state_dict(f.state_dict())
    for k, v in f.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v)
    # all_weights: same nesting, names and shapes, the module's own parameters
    assert len(f.all_weights) == len(t.all_weights)
    for fw, tw in zip(f.all_weights, t.all_weights):
        assert [p.shape for p in fw] == [p.shape for p in tw]
        assert all(isinstance(p, nn.Parameter) for p in fw)
        assert all(any(p is q for q in f.parameters()) for p in fw)
    f.flatten_parameters()  # exists, and keeps the parameters
    assert list(f.state_dict().keys()) == list(t.state_dict().keys())


@pytest.mark.parametrize("kw", PARAM_CONFIGS, ids=lambda k: str(k))
@pytest.mark.parametrize("cell", WEIGHT_CH_CELLS)
def test_extended_parameter_names(cell, kw):
    """LSTM's keys (same order) plus weight_ch_l{k}{_reverse}: (3, H) peephole, (3H, H) WM."""
    if not cells.CELLS[cell].has_cell_state and "proj_size" in kw:
        kw = {k: v for k, v in kw.items() if k != "proj_size"}
    f = FUSED_OF[cell](I, H, **kw)
    t = _torch_seq(cell)(I, H, **kw)
    keys = list(f.state_dict().keys())
    assert [k for k in keys if not k.startswith("weight_ch")] == list(t.state_dict().keys())
    D = 2 if kw.get("bidirectional") else 1
    expected_ch = [
        f"weight_ch_l{k}{'_reverse' if d else ''}"
        for k in range(kw.get("num_layers", 1))
        for d in range(D)
    ]
    assert [k for k in keys if k.startswith("weight_ch")] == expected_ch
    shape = cells.CELLS[cell].weight_ch_shape(H)
    for k in expected_ch:
        assert f.state_dict()[k].shape == shape
    for k, v in t.state_dict().items():
        assert f.state_dict()[k].shape == v.shape
    # a torch.nn.LSTM state_dict loads with strict=False, reporting exactly the weight_ch keys
    res = f.load_state_dict(t.state_dict(), strict=False)
    assert sorted(res.missing_keys) == sorted(expected_ch) and not res.unexpected_keys


@pytest.mark.parametrize("cls", list(FUSED_OF.values()) + list(CELL_OF.values()))
def test_default_init(cls):
    """Every parameter, weight_ch included, uniform in +-1/sqrt(H) (design.md §1)."""
    Hh = 16
    kw = dict(num_layers=2, bidirectional=True) if cls not in CELL_OF.values() else {}
    m = cls(I, Hh, **kw)
    bound = 1 / math.sqrt(Hh)
    allv = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert allv.abs().max() <= bound
    # really spread over the interval (not zeros / constants)
    assert allv.min() < -0.8 * bound and allv.max() > 0.8 * bound
    for name, p in m.named_parameters():
        assert p.detach().std() > 0.3 * bound, name
    assert all(p.dtype == torch.get_default_dtype() for p in m.parameters())
    m64 = cls(I, Hh, dtype=F64, **kw)
    assert all(p.dtype == F64 for p in m64.parameters())


# ---- cells ------------------------------------------------------------------------------------

CELL_CASES = [
    (b, u, s, bias, d)
    for b, u in ((2, False), (1, False), (1, True))
    for s in (False, True)
    for bias in (True, False)
    for d in (F64, F32)
]


@pytest.mark.parametrize(
    "batch,unbatched,with_state,bias,dtype",
    CELL_CASES,
    ids=lambda v: _dname(v) if isinstance(v, torch.dtype) else str(v),
)
@pytest.mark.parametrize("mode", TORCH_CELLS)
def test_cell_matches_torch(mode, batch, unbatched, with_state, bias, dtype):
    tcls, fcls = _torch_step(mode), CELL_OF[mode]
    lstm_like = cells.CELLS[mode].has_cell_state
    ref, fused = make_pair(tcls, fcls, I, H, bias=bias, dtype=dtype)
    shape = (I,) if unbatched else (batch, I)
    sshape = (H,) if unbatched else (batch, H)
    x = torch.randn(*shape, dtype=F64).to(dtype)
    hx = None
    if with_state:
        hx = torch.randn(*sshape, dtype=F64).to(dtype)
        if lstm_like:
            hx = (hx, torch.randn(*sshape, dtype=F64).to(dtype))
    results = []
    for m in (ref, fused):
        xl = x.clone().requires_grad_()
        hl = None
        if hx is not None:
            hl = (
                tuple(h.clone().requires_grad_() for h in hx)
                if lstm_like
                else hx.clone().requires_grad_()
            )
        out = m(xl) if hl is None else m(xl, hl)
        outs = list(out) if lstm_like else [out]
        gen = torch.Generator().manual_seed(5)
        sum(
            (o * torch.randn(o.shape, generator=gen, dtype=F64).to(dtype)).sum() for o in outs
        ).backward()
        grads = [xl.grad] + [p.grad for p in m.parameters()]
        if hl is not None:
            grads += [h.grad for h in (hl if lstm_like else (hl,))]
        results.append((outs, grads))
    (o_r, g_r), (o_f, g_f) = results
    for a, b in zip(o_f, o_r):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, dtype, "cell output")
    assert len(g_f) == len(g_r)
    for a, b in zip(g_f, g_r):
        assert_close(a, b, dtype, "cell gradient")


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("cell", EXTENDED_CELLS)
def test_extended_cell_matches_reference(cell, with_state, unbatched):
    spec = cells.CELLS[cell]
    m = CELL_OF[cell](I, H, dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.8, 0.8)
    assert [n for n, _ in m.named_parameters()] == [
        "weight_ih",
        "weight_hh",
        "bias_ih",
        "bias_hh",
    ] + (["weight_ch"] if spec.weight_ch is not None else [])
    fn = reference.STEPS[cell]
    Bn = 1 if unbatched else 2
    x = torch.randn(Bn, I, dtype=F64)
    h = torch.randn(Bn, H, dtype=F64) if with_state else torch.zeros(Bn, H, dtype=F64)
    c = torch.randn(Bn, H, dtype=F64) if with_state else torch.zeros(Bn, H, dtype=F64)
    # the state argument and the reference's state arguments: (h, c) with a cell state, else h
    st, ref_st = ((h, c), (h, c)) if spec.has_cell_state else (h, (h,))
    xl = x.clone().requires_grad_()
    if unbatched:
        st0 = tuple(s[0] for s in st) if spec.has_cell_state else st[0]
        args = (xl[0], st0) if with_state else (xl[0],)
    else:
        args = (xl, st) if with_state else (xl,)
    got = m(*args)
    hy, cy = got if spec.has_cell_state else (got, None)
    assert hy.shape == ((H,) if unbatched else (Bn, H))
    ref_params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    xr = x.clone().requires_grad_()
    exp = fn(xr, *ref_st, *ref_params)
    rh, rc = exp if spec.has_cell_state else (exp, None)
    if unbatched:
        rh, rc = rh[0], (rc[0] if rc is not None else None)
    assert_close(hy, rh, F64, "h")
    if spec.has_cell_state:
        assert_close(cy, rc, F64, "c")
        (hy.sum() + 2 * cy.sum()).backward()
        (rh.sum() + 2 * rc.sum()).backward()
    else:
        hy.sum().backward()
        rh.sum().backward()
    assert_close(xl.grad, xr.grad, F64, "grad x")
    for (n, p), q in zip(m.named_parameters(), ref_params):
        assert_close(p.grad, q.grad, F64, f"grad {n}")


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_functional_cells_match_reference(cell):
    """fusedrnn.functional.<cell>_cell: one step with torch's cell semantics."""
    spec = cells.CELLS[cell]
    G = spec.gates
    x = torch.randn(2, I, dtype=F64)
    h, c = torch.randn(2, H, dtype=F64), torch.randn(2, H, dtype=F64)
    w = [
        torch.randn(G * H, I, dtype=F64),
        torch.randn(G * H, H, dtype=F64),
        torch.randn(G * H, dtype=F64),
        torch.randn(G * H, dtype=F64),
    ]
    if spec.weight_ch is not None:
        w.append(torch.randn(spec.weight_ch_shape(H), dtype=F64))
    fn = getattr(fusedrnn.functional, f"{cell}_cell")
    if not spec.has_cell_state:
        assert_close(fn(x, h, *w), reference.STEPS[cell](x, h, *w), F64)
        return
    got = fn(x, (h, c), *w)
    exp = reference.STEPS[cell](x, h, c, *w)
    assert_close(got[0], exp[0], F64, "h")
    assert_close(got[1], exp[1], F64, "c")


def test_deterministic():
    """The same call twice gives bitwise identical outputs and gradients."""
    m = fusedrnn.WorkingMemoryLSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, dtype=F32)
    x = make_seq_input("packed", False, F32)
    runs = []
    for _ in range(2):
        m.zero_grad()
        out = m(x)
        (out[0].data.sum() + out[1][0].sum() + out[1][1].sum()).backward()
        runs.append([out[0].data] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_cell_hidden_size_zero_like_torch(cell):
    """torch.nn.LSTMCell / GRUCell accept hidden_size=0 and return (B, 0) states with autograd
    (a zero input gradient, empty parameter gradients); so do the fused cells, the extended ones
    as torch.nn.LSTMCell. Negative sizes stay refused, and the sequence modules refuse
    hidden_size=0 as torch.nn's do (test_constructor_errors)."""
    lstm_like = cells.CELLS[cell].has_cell_state
    t = _torch_step(cell)(I, 0, dtype=F64)
    f = CELL_OF[cell](I, 0, dtype=F64)
    assert repr(f).split("(", 1)[1] == repr(t).split("(", 1)[1]
    for name, p in t.named_parameters():
        assert getattr(f, name).shape == p.shape, name
    x = torch.randn(B, I, dtype=F64)
    h = torch.zeros(B, 0, dtype=F64)
    state = (h, h.clone()) if lstm_like else h
    state1 = (h[0], h[0].clone()) if lstm_like else h[0]
    for args in ((x,), (x, state), (x[0],), (x[0], state1)):
        results = []
        for m in (t, f):
            m.zero_grad(set_to_none=True)
            xl = args[0].clone().requires_grad_()
            out = m(xl, *args[1:])
            outs = list(out) if lstm_like else [out]
            sum(o.sum() for o in outs).backward()
            results.append((outs, xl.grad))
        (o_t, gx_t), (o_f, gx_f) = results
        assert [o.shape for o in o_f] == [o.shape for o in o_t]
        assert all(o.dtype == F64 and o.requires_grad for o in o_f)
        assert gx_f is not None and torch.equal(gx_f, gx_t)  # zeros
        for name, p in f.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, name
    t32, f32 = _torch_step(cell)(I, 0), CELL_OF[cell](I, 0)
    for xa in (x.float(), x.bfloat16()):  # CPU autocast: torch.nn's dtypes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = _outputs(t32(xa), True), _outputs(f32(xa), True)
        assert [o.dtype for o in got] == [o.dtype for o in want], xa.dtype
    with pytest.raises(ValueError, match="hidden_size"):
        CELL_OF[cell](I, -1)


# ---- CPU autocast: the dtypes torch.nn returns --------------------------------------------------

BF16 = torch.bfloat16


def _cpu_autocast_rule(cell, step, proj, input_dtype, state_dtype):
    """The dtypes torch.nn returns under torch.autocast("cpu", dtype=torch.bfloat16): (output,
    h_n[, c_n]) of a sequence module, (h_1[, c_1]) of a cell, from torch's CPU autocast op lists
    (their premises are checked by the test). torch.nn.LSTM without a projection runs oneDNN's
    LSTM, aten::mkldnn_rnn_layer, a lower-precision op: all in bf16. aten::gru, lstm_cell and
    gru_cell have no CPU autocast kernel (nor has the LSTM with a projection, which oneDNN
    lacks): their linear layers give the gates in bf16, and the pointwise update promotes them
    with the state, c in the LSTM family, h in the GRU's (zeros of the input's dtype when none
    is given); with a projection h_n and the output come out of one more linear layer, bf16.
    fusedrnn's extended modules and cells follow torch.nn.LSTM / LSTMCell."""
    promoted = torch.promote_types(BF16, state_dtype or input_dtype)
    lstm_like = cells.CELLS[cell].has_cell_state
    if step:
        return [promoted] * (2 if lstm_like else 1)
    if lstm_like:
        return [BF16, BF16, promoted if proj else BF16]
    return [promoted, promoted]


def _autocast_cases(cell, step):
    """(parameter dtype, proj_size, input dtype, state dtypes or None): (h, c) in the LSTM
    family."""
    lstm_like = cells.CELLS[cell].has_cell_state
    states = (
        [(F32, F32), (BF16, BF16), (BF16, F32), (F32, BF16)] if lstm_like else [(F32,), (BF16,)]
    )
    cases = [(F32, F32, None), (F32, BF16, None), (BF16, F32, None)]
    cases += [(F32, x, s) for x in (F32, BF16) for s in states]
    projs = (0, 2) if lstm_like and not step else (0,)
    return [(w, p, x, s) for p in projs for w, x, s in cases]


def _outputs(res, step):
    if step:
        return list(res) if isinstance(res, tuple) else [res]
    return flatten_result(res)


def _to64(a):
    return tuple(_to64(t) for t in a) if isinstance(a, tuple) else a.double()


@pytest.mark.parametrize("step", [False, True], ids=["sequence", "cell"])
@pytest.mark.parametrize("cell", ALL_CELLS)
def test_cpu_autocast_output_dtypes_like_torch(cell, step):
    """Under CPU bf16 autocast every module returns the dtypes torch.nn's returns (the nearest
    torch.nn module for the extended ones): float32, bfloat16 and mixed inputs, states and
    parameters, with and without a projection; values within 2x torch.nn's own error against
    fp64 plus one bf16 rounding (eps 2**-7) of the largest value."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("aten::mkldnn_rnn_layer", "AutocastCPU") and has("aten::linear", "AutocastCPU")
    for op in ("aten::lstm.input", "aten::gru.input", "aten::lstm_cell", "aten::gru_cell"):
        assert not has(op, "AutocastCPU"), op
    lstm_like = cells.CELLS[cell].has_cell_state
    # torch.nn's LSTM without a projection runs oneDNN's bf16 LSTM, which a CPU without
    # AVX512-BF16 may lack ("could not create a primitive descriptor"): the rule is then the
    # comparator (it equals torch.nn's dtypes wherever torch.nn runs, checked below)
    onednn_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tcls = _torch_step(cell) if step else _torch_seq(cell)
    fcls = CELL_OF[cell] if step else FUSED_OF[cell]
    same_math = cells.CELLS[cell].in_torch_nn  # the values too can be compared with torch.nn's
    for wdtype, proj, xdtype, sdtypes in _autocast_cases(cell, step):
        case = f"params {wdtype}, proj_size {proj}, input {xdtype}, states {sdtypes}"
        kw = dict(proj_size=proj) if proj else {}
        if same_math:
            t, f = make_pair(tcls, fcls, I, H, dtype=wdtype, **kw)
        else:
            t, f = tcls(I, H, dtype=wdtype, **kw), fcls(I, H, dtype=wdtype, **kw)
        args = ((torch.randn(B, I) if step else torch.randn(T, B, I)).to(xdtype),)
        if sdtypes:
            shapes = [(B, H)] * 2 if step else [(1, B, proj or H), (1, B, H)]
            st = tuple(torch.randn(s).to(d) for s, d in zip(shapes, sdtypes))
            args += (st if lstm_like else st[0],)
        rule = _cpu_autocast_rule(cell, step, proj, xdtype, sdtypes[-1] if sdtypes else None)
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            got = _outputs(f(*args), step)
            expected = None
            if step or proj or not lstm_like or onednn_bf16:
                expected = _outputs(t(*args), step)
        if expected is not None:
            assert [o.dtype for o in expected] == rule, f"torch.nn: {case}"
        assert [o.dtype for o in got] == rule, case
        if expected is None or not same_math:
            continue
        with torch.no_grad():
            exact = _outputs(copy.deepcopy(t).double()(*_to64(args)), step)
        for a, b, e in zip(got, expected, exact):
            # both round to bf16 (gates, and states carried in bf16), at different places: twice
            # torch.nn's own error plus two bf16 roundings (eps 2**-7) of the largest value; a
            # float32 result of the fused ops (the promoted runs) is well inside it
            err_f, err_t = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
            assert err_f <= 2 * err_t + 2 * 2.0**-7 * e.abs().max().item(), (case, err_f, err_t)


def test_cpu_autocast_output_dtypes_under_torch_compile():
    """The CPU autocast dtype rule inside a compiled function (fullgraph): a GRU, a cell and a
    projected LSTM on float32 input give torch.nn's dtypes, as in eager, bit for bit."""
    for m, x in (
        (fusedrnn.GRU(I, H, num_layers=2), torch.randn(T, B, I)),
        (fusedrnn.LSTMCell(I, H), torch.randn(B, I)),
        (fusedrnn.LSTM(I, H, proj_size=2), torch.randn(T, B, I)),
    ):
        step = isinstance(m, nn.RNNCellBase)
        rule = _cpu_autocast_rule(m._cell, step, getattr(m, "proj_size", 0), F32, None)

        def f(x):
            with torch.autocast("cpu", dtype=BF16):
                return m(x)

        torch._dynamo.reset()
        eager = _outputs(f(x), step)
        compiled = _outputs(torch.compile(f, fullgraph=True, backend="aot_eager")(x), step)
        assert [t.dtype for t in compiled] == [t.dtype for t in eager] == rule, type(m)
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled)), type(m)


# ---- convert ----------------------------------------------------------------------------------


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(2 * H, H)
        self.cells = nn.Sequential(nn.LSTMCell(H, 4), nn.GRUCell(4, 3))
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        y, _ = self.lstm(x)  # (B, T, 2H)
        y, h = self.gru(y.transpose(0, 1))  # (T, B, H)
        hc, cc = self.cells[0](y[-1])
        g = self.cells[1](hc, torch.tanh(h[0, :, :3] @ torch.ones(3, 3, dtype=x.dtype)))
        return self.head(g + cc[:, :3]).squeeze(-1)


def test_convert_replaces_and_matches():
    model = _Model().double()
    x = torch.randn(B, T, I, dtype=F64)
    expected = model(x)
    conv = fusedrnn.convert(copy.deepcopy(model))
    assert type(conv.lstm) is fusedrnn.LSTM and type(conv.gru) is fusedrnn.GRU
    assert type(conv.cells[0]) is fusedrnn.LSTMCell and type(conv.cells[1]) is fusedrnn.GRUCell
    assert type(conv.head) is nn.Linear
    assert conv.lstm.bidirectional and conv.lstm.batch_first and conv.lstm.num_layers == 2
    assert all(p.dtype == F64 for p in conv.parameters())
    assert list(conv.state_dict().keys()) == list(model.state_dict().keys())
    assert_close(conv(x), expected, F64)
    # the module itself, and training mode kept
    single = nn.GRU(I, H, dropout=0.2, num_layers=2).double().eval()
    c = fusedrnn.convert(single)
    assert type(c) is fusedrnn.GRU and not c.training and c.dropout == 0.2
    seq = nn.Sequential(nn.LSTMCell(I, H))
    assert type(fusedrnn.convert(seq)[0]) is fusedrnn.LSTMCell


def test_convert_leaves_the_random_generator_as_it_was():
    """Converting draws nothing from the random generators: a seeded program that converts its
    model draws the same numbers (dropout masks, data order) afterwards as without converting,
    as it would with torch.nn. The new modules' own initialisation is thrown away (the old
    weights are loaded), so it must not advance the generator."""
    torch.manual_seed(3)
    model = _Model()
    want = torch.rand(5)
    torch.manual_seed(3)
    model = _Model()
    conv = fusedrnn.convert(model)
    assert type(conv.lstm) is fusedrnn.LSTM and type(conv.cells[0]) is fusedrnn.LSTMCell
    assert torch.equal(torch.rand(5), want)


def test_convert_keeps_requires_grad():
    """Frozen parameters stay frozen: convert keeps the weights, requires_grad included."""
    model = nn.Sequential(nn.LSTM(I, H, proj_size=2), nn.GRUCell(I, H))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[1].bias_hh.requires_grad_(False)
    expected = {n: p.requires_grad for n, p in model.named_parameters()}
    conv = fusedrnn.convert(model)
    assert type(conv[0]) is fusedrnn.LSTM and conv[0].proj_size == 2
    got = {n: p.requires_grad for n, p in conv.named_parameters()}
    assert got == expected


def test_convert_training_same_loss():
    """Five Adam steps on the original and on the converted model, same data and seed: the
    losses agree to fp64 precision (the fused gradients equal torch's to ~1e-15 relative; Adam
    normalises each update, so differences stay at that level over five steps)."""
    torch.manual_seed(11)
    model = _Model().double()
    conv = fusedrnn.convert(copy.deepcopy(model))
    x = torch.randn(B, T, I, dtype=F64)
    target = torch.randn(B, dtype=F64)
    losses = []
    for m in (model, conv):
        opt = torch.optim.Adam(m.parameters(), lr=0.05)
        hist = []
        for _ in range(5):
            opt.zero_grad()
            loss = ((m(x) - target) ** 2).mean()
            loss.backward()
            opt.step()
            hist.append(loss.item())
        hist.append(((m(x) - target) ** 2).mean().item())
        losses.append(hist)
    assert losses[0][-1] < losses[0][0]  # it trains
    torch.testing.assert_close(
        torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-10, rtol=1e-10
    )
    for (n, p), (_, q) in zip(model.named_parameters(), conv.named_parameters()):
        assert_close(q, p, F64, n)


# ---- repr, save/load ----------------------------------------------------------------------------

REPR_CONFIGS = [
    dict(),
    dict(num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True),
    dict(proj_size=2, num_layers=3),
]


@pytest.mark.parametrize("kw", REPR_CONFIGS, ids=lambda k: str(k))
def test_repr_matches_torch(kw):
    assert repr(fusedrnn.LSTM(I, H, **kw)) == repr(nn.LSTM(I, H, **kw))
    kw_gru = {k: v for k, v in kw.items() if k != "proj_size"}
    assert repr(fusedrnn.GRU(I, H, **kw_gru)) == repr(nn.GRU(I, H, **kw_gru))
    assert fusedrnn.LSTM(I, H, **kw).extra_repr() == nn.LSTM(I, H, **kw).extra_repr()
    assert repr(fusedrnn.PeepholeLSTM(I, H, **kw)) == repr(nn.LSTM(I, H, **kw)).replace(
        "LSTM(", "PeepholeLSTM(", 1
    )


def test_cell_repr_matches_torch():
    for bias in (True, False):
        assert repr(fusedrnn.LSTMCell(I, H, bias=bias)) == repr(nn.LSTMCell(I, H, bias=bias))
        assert repr(fusedrnn.GRUCell(I, H, bias=bias)) == repr(nn.GRUCell(I, H, bias=bias))


@pytest.mark.parametrize("cls", list(FUSED_OF.values()) + list(CELL_OF.values()))
def test_save_load_whole_module(cls, tmp_path):
    one_step = cls in CELL_OF.values()
    kw = dict(num_layers=2, bidirectional=True) if not one_step else {}
    m = cls(I, H, dtype=F64, **kw)
    path = tmp_path / "m.pt"
    torch.save(m, path)
    m2 = torch.load(path, weights_only=False)
    assert type(m2) is cls and repr(m2) == repr(m)
    assert list(m2.state_dict().keys()) == list(m.state_dict().keys())
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v)
    x = torch.randn(T, B, I, dtype=F64) if not one_step else torch.randn(B, I, dtype=F64)
    a, b = m(x), m2(x)
    ta = a[0] if isinstance(a, tuple) else a
    tb = b[0] if isinstance(b, tuple) else b
    assert torch.equal(ta, tb)


@pytest.mark.parametrize("cls", list(FUSED_OF.values()) + list(CELL_OF.values()))
def test_torch_load_weights_only_like_torch(cls, tmp_path):
    """A whole module saved with torch.save(module) loads under torch.load's weights_only=True
    as torch.nn's does: refused while its class is not an allowed global (torch allows no
    torch.nn module class by default either), loaded with the class alone allowed (the pickle
    holds nothing else that needs allowing), with the same outputs."""
    one_step = cls in CELL_OF.values()
    kw = {} if one_step else dict(num_layers=2, bidirectional=True, dropout=0.25)
    if not one_step and cells.CELLS[cls._cell].has_cell_state:
        kw["proj_size"] = 2
    tcls = (_torch_step if one_step else _torch_seq)(cls._cell)
    x = torch.randn(B, I, dtype=F64) if one_step else torch.randn(T, B, I, dtype=F64)
    for c in (tcls, cls):
        m = c(I, H, dtype=F64, **kw).eval()
        path = tmp_path / f"{c.__module__}.{c.__name__}.pt"
        torch.save(m, path)
        with pytest.raises(pickle.UnpicklingError, match=f"Unsupported global.*{c.__name__}"):
            torch.load(path, weights_only=True)
        with torch.serialization.safe_globals([c]):
            m2 = torch.load(path, weights_only=True)
        assert type(m2) is c and repr(m2) == repr(m)
        for a, b in zip(_outputs(m(x), one_step), _outputs(m2(x), one_step)):
            assert torch.equal(a, b)


# ---- torch.compile ------------------------------------------------------------------------------


class _Compiled(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2, dtype=F64)
        self.out = nn.Linear(4, 1, dtype=F64)

    def forward(self, x, h0, c0):
        y, (h, c) = self.rnn(x, (h0, c0))
        return self.out(y).sum() + h.pow(2).sum() + c.sum()


def _compile_run(model, fn, x, h0, c0):
    model.zero_grad(set_to_none=True)
    xl = x.clone().requires_grad_()
    loss = fn(xl, h0, c0)
    loss.backward()
    return loss.detach(), xl.grad, [p.grad.clone() for p in model.parameters()]


def _compare_compiled(model, compiled, x, h0, c0):
    eager = _compile_run(model, model, x, h0, c0)
    comp = _compile_run(model, compiled, x, h0, c0)
    assert_close(comp[0], eager[0], F64, "loss")
    assert_close(comp[1], eager[1], F64, "grad x")
    for a, b in zip(comp[2], eager[2]):
        assert_close(a, b, F64, "grad param")


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True), default (inductor) backend, of a model using
    fusedrnn.LSTM on padded input: no graph break, equal to eager forward and backward, also
    for a second batch size."""
    torch._dynamo.reset()
    model = _Compiled()
    x = torch.randn(T, B, I, dtype=F64)
    h0 = torch.randn(4, B, 2, dtype=F64)
    c0 = torch.randn(4, B, H, dtype=F64)
    compiled = torch.compile(model, fullgraph=True)
    _compare_compiled(model, compiled, x, h0, c0)
    x2 = torch.randn(T, 2, I, dtype=F64)
    _compare_compiled(model, compiled, x2, h0[:, :2].contiguous(), c0[:, :2].contiguous())


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_torch_compile_packed_dynamic(cell):
    """Every module, packed input (the batch size of the fused op comes from batch_sizes, a
    data-dependent size in the fake implementations), dynamic=True, fullgraph. The aot_eager
    backend runs the whole AOTAutograd trace (fake tensors, joint forward/backward graph)
    without inductor's C++ compilation, which takes ~20 s per graph on 2 cores and tests
    nothing more about the ops' registrations than the inductor test above."""
    torch._dynamo.reset()
    kw = dict(proj_size=2) if cells.CELLS[cell].has_cell_state else {}
    m = FUSED_OF[cell](I, H, num_layers=2, bidirectional=True, dtype=F64, **kw)

    def f(data, bs, si, ui):
        out, state = m(PackedSequence(data, bs, si, ui))
        st = state if isinstance(state, tuple) else (state,)
        return out.data.pow(2).sum() + sum(s.sum() for s in st)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for lengths in (LENGTHS, [3, 1, 4, 2]):
        p = make_seq_input("packed", False, F64, lengths=lengths)
        res = []
        for fn in (f, cf):
            m.zero_grad(set_to_none=True)
            data = p.data.clone().requires_grad_()
            loss = fn(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
            loss.backward()
            res.append([loss.detach(), data.grad] + [q.grad.clone() for q in m.parameters()])
        for a, b in zip(res[1], res[0]):
            assert_close(a, b, F64, "compiled vs eager")


# ---- errors -----------------------------------------------------------------------------------


def _raises_like_torch(fused_call, torch_call, *names):
    """The fused module raises the exception type torch.nn raises, naming the argument."""
    with pytest.raises(Exception) as t_exc:
        torch_call()
    with pytest.raises(Exception) as f_exc:
        fused_call()
    assert type(f_exc.value) is type(t_exc.value), (
        f"fused raised {type(f_exc.value).__name__}: {f_exc.value}; torch raises "
        f"{type(t_exc.value).__name__}: {t_exc.value}"
    )
    msg = str(f_exc.value)
    assert any(n in msg for n in names), f"message does not name {names}: {msg}"


def _bad_calls(mode):
    """name -> (bad args of forward, strings one of which the message must contain)."""
    ok = torch.randn(T, B, I, dtype=F64)
    cases = {
        "rank4": ((torch.randn(T, B, I, 2, dtype=F64),), ("input", "2D or 3D")),
        "rank1": ((torch.randn(I, dtype=F64),), ("input", "2D or 3D")),
        "feature_size": ((torch.randn(T, B, I + 1, dtype=F64),), ("input_size",)),
        # input dtype differs from the parameters' (torch: ValueError "RNN input dtype ...")
        "input_dtype": ((ok.float(),), ("RNN input dtype (torch.float32)",)),
    }
    if cells.CELLS[mode].has_cell_state:
        cases["h0_shape"] = (
            (ok, (torch.zeros(1, B - 1, H, dtype=F64), torch.zeros(1, B, H, dtype=F64))),
            ("Expected hidden[0] size",),
        )
        cases["c0_shape"] = (
            (ok, (torch.zeros(1, B, H, dtype=F64), torch.zeros(1, B, H + 1, dtype=F64))),
            ("Expected hidden[1] size",),
        )
    else:
        cases["hx_shape"] = ((ok, torch.zeros(2, B, H, dtype=F64)), ("Expected hidden size",))
    return cases


@pytest.mark.parametrize("mode,what", [(m, w) for m in TORCH_CELLS for w in _bad_calls(m)])
def test_forward_errors_like_torch(mode, what):
    """Bad input raises the exception type torch.nn raises (drop-in: code catching torch's
    error catches this one), with a message naming the argument."""
    tcls, fcls = TORCH_OF[mode]
    t, f = make_pair(tcls, fcls, I, H)
    args, names = _bad_calls(mode)[what]
    _raises_like_torch(lambda: f(*args), lambda: t(*args), *names)


def test_forward_errors_state_types():
    """Errors torch raises only incidentally (an IndexError / a matmul dtype error) are clear
    errors naming the argument here."""
    f = fusedrnn.LSTM(I, H, dtype=F64)
    ok = torch.randn(T, B, I, dtype=F64)
    # a Tensor where (h_0, c_0) is expected: a RuntimeError, the type torch.nn.LSTM raises for
    # a (2, B, H) tensor (test_torch_features checks it against torch.nn)
    with pytest.raises(RuntimeError, match="hx"):
        f(ok, torch.zeros(1, B, H, dtype=F64))
    with pytest.raises(TypeError, match="h_0"):  # state dtype differs from the input's
        f(ok, (torch.zeros(1, B, H), torch.zeros(1, B, H, dtype=F64)))
    with pytest.raises(TypeError, match="c_0"):
        f(ok, (torch.zeros(1, B, H, dtype=F64), torch.zeros(1, B, H)))
    g = fusedrnn.GRU(I, H, dtype=F64)
    with pytest.raises(TypeError, match="hx"):
        g(ok, (torch.zeros(1, B, H, dtype=F64),))
    with pytest.raises(RuntimeError, match="hx and cx"):  # unbatched input, batched state
        f(ok[:, 0], (torch.zeros(1, B, H, dtype=F64), torch.zeros(1, B, H, dtype=F64)))
    cell = fusedrnn.LSTMCell(I, H, dtype=F64)
    with pytest.raises(RuntimeError, match="hidden0"):
        cell(
            torch.randn(2, I, dtype=F64),
            (torch.zeros(3, H, dtype=F64), torch.zeros(2, H, dtype=F64)),
        )
    with pytest.raises(RuntimeError, match="input_size"):
        cell(torch.randn(2, I + 1, dtype=F64))
    with pytest.raises(ValueError, match="input"):
        cell(torch.randn(2, 2, I, dtype=F64))


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(num_layers=0), "num_layers"),
        (dict(dropout=1.5), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(proj_size=H), "proj_size"),
        (dict(proj_size=H + 2), "proj_size"),
        (dict(proj_size=-1), "proj_size"),
    ],
    ids=lambda v: str(v),
)
def test_constructor_errors(kw, name):
    args = dict(input_size=I, hidden_size=H)
    args.update(kw)
    with pytest.raises(Exception) as t_exc:
        nn.LSTM(**args)
    for cell, cls in FUSED_OF.items():
        if cells.CELLS[cell].has_cell_state or "proj_size" not in kw:
            with pytest.raises(type(t_exc.value), match=name):
                cls(**args)


def test_gru_has_no_proj_size():
    with pytest.raises(ValueError, match="proj_size"):  # torch.nn.GRU raises ValueError
        nn.GRU(I, H, proj_size=2)
    with pytest.raises(ValueError, match="proj_size"):
        fusedrnn.GRU(I, H, proj_size=2)


def _seq_message_cases(lstm_like):
    """name -> (module kwargs, forward args) of calls torch.nn rejects with a message code may
    match on: wrong initial states and input dtypes."""
    x = torch.randn(T, B, I, dtype=F64)

    def z(*shape):
        return torch.zeros(shape, dtype=F64)

    if lstm_like:
        cases = {
            "h0-batch": ({}, (x, (z(1, B - 1, H), z(1, B, H)))),
            "h0-proj_size": (dict(proj_size=2), (x, (z(1, B, H), z(1, B, H)))),
            "h0-num_layers": (dict(num_layers=2), (x, (z(1, B, H), z(2, B, H)))),
            "h0-batch_first": (
                dict(batch_first=True),
                (x.transpose(0, 1), (z(1, T, H), z(1, B, H))),
            ),
            "c0-hidden_size": ({}, (x, (z(1, B, H), z(1, B, H + 1)))),
            "c0-proj_size": (dict(proj_size=2), (x, (z(1, B, 2), z(1, B, 2)))),
            "c0-bidirectional": (dict(bidirectional=True), (x, (z(2, B, H), z(1, B, H)))),
            "unbatched-h0": ({}, (x[:, 0], (z(1, H + 1), z(1, H)))),
            "unbatched-c0": ({}, (x[:, 0], (z(1, H), z(2, H)))),
            "unbatched-input-batched-states": ({}, (x[:, 0], (z(1, B, H), z(1, B, H)))),
            "batched-input-2d-h0": ({}, (x, (z(B, H), z(1, B, H)))),
        }
    else:
        cases = {
            "h-num_layers": ({}, (x, z(2, B, H))),
            "h-batch": (dict(num_layers=2), (x, z(2, B + 1, H))),
            "h-bidirectional": (dict(bidirectional=True), (x, z(1, B, H))),
            "h-batch_first": (dict(batch_first=True), (x.transpose(0, 1), z(1, T, H))),
            "h-packed": ({}, (pack_padded_sequence(x, torch.tensor([4, 3, 1])), z(1, B - 1, H))),
            "unbatched-h": ({}, (x[:, 0], z(1, H + 1))),
            "unbatched-input-batched-h": ({}, (x[:, 0], z(1, B, H))),
            "batched-input-2d-h": ({}, (x, z(B, H))),
        }
    cases["input-float32"] = ({}, (x.float(),))
    cases["input-int64"] = ({}, (x.long(),))
    cases["input-float32-bfloat16-params"] = (dict(dtype=torch.bfloat16), (x.float(),))
    cases["input-float64-bfloat16-params-unbatched"] = (dict(dtype=torch.bfloat16), (x[:, 0],))
    return cases


def _exception_of(call):
    with pytest.raises(Exception) as exc:
        call()
    return exc.value


@pytest.mark.parametrize(
    "cell,what",
    [(c, w) for c in ALL_CELLS for w in _seq_message_cases(cells.CELLS[c].has_cell_state)],
)
def test_sequence_errors_have_torch_messages(cell, what):
    """Wrong initial states (h_0 / c_0 of an LSTM, h of a GRU) and an input dtype other than the
    parameters' raise torch.nn's exception with torch.nn's message, word for word (code may
    match on it); the extended modules as torch.nn.LSTM."""
    kw, args = _seq_message_cases(cells.CELLS[cell].has_cell_state)[what]
    dtype = kw.pop("dtype", F64)
    t = _torch_seq(cell)(I, H, dtype=dtype, **kw)
    f = FUSED_OF[cell](I, H, dtype=dtype, **kw)
    want, got = _exception_of(lambda: t(*args)), _exception_of(lambda: f(*args))
    assert type(got) is type(want) and str(got) == str(want), f"{got!r} != {want!r}"


def _cell_message_cases(lstm_like):
    """name -> forward args of one-step calls torch.nn's cells reject: wrong states, input size."""
    x = torch.randn(B, I, dtype=F64)

    def z(*shape):
        return torch.zeros(shape, dtype=F64)

    ok = z(B, H)
    if lstm_like:
        return {
            "hx-batch": (x, (z(B + 1, H), ok)),
            "hx-hidden_size": (x, (z(B, H + 1), ok)),
            "cx-batch": (x, (ok, z(B - 1, H))),
            "cx-hidden_size": (x, (ok, z(B, H - 1))),
            "hx-3d": (x, (z(1, B, H), ok)),
            "cx-0d": (x, (ok, z())),
            "unbatched-input-batched-states": (x[0], (ok, ok)),
            "batched-input-1d-hx": (x, (z(H), ok)),
            "one-state": (x, (ok,)),
            "input_size": (torch.randn(B, I + 1, dtype=F64), (ok, ok)),
        }
    return {
        "hx-batch": (x, z(B + 1, H)),
        "hx-hidden_size": (x, z(B, H + 1)),
        "hx-3d": (x, z(1, B, H)),
        "hx-0d": (x, z()),
        "unbatched-input-batched-hx": (x[0], ok),
        "batched-input-1d-hx": (x, z(H)),
        "input_size": (torch.randn(B, I + 1, dtype=F64), ok),
    }


@pytest.mark.parametrize(
    "cell,what",
    [(c, w) for c in ALL_CELLS for w in _cell_message_cases(cells.CELLS[c].has_cell_state)],
)
def test_cell_errors_have_torch_messages(cell, what):
    """The cells raise torch.nn.LSTMCell's / GRUCell's exception and message on a wrong hx (its
    rank, batch or hidden size, the number of states) or input size, word for word; where
    torch.nn's message names its class (a rank error), the extended cells name theirs."""
    args = _cell_message_cases(cells.CELLS[cell].has_cell_state)[what]
    t, f = _torch_step(cell)(I, H, dtype=F64), CELL_OF[cell](I, H, dtype=F64)
    want, got = _exception_of(lambda: t(*args)), _exception_of(lambda: f(*args))
    prefix = type(t).__name__ + ": "
    expected = str(want)
    if expected.startswith(prefix):
        expected = type(f).__name__ + ": " + expected[len(prefix) :]
    assert type(got) is type(want) and str(got) == expected, f"{got!r} != {want!r}"


# ---- fallback to the reference implementation --------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "fusedrnn._C":
                raise ImportError("extension blocked for the fallback test")
            return None

    sys.meta_path.insert(0, _Block())
    import torch
    import fusedrnn
    assert fusedrnn.backend() == "reference", fusedrnn.backend()
    torch.manual_seed(0)
    ref = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    m = fusedrnn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = m(x)
        out2 = m(x)
    runtime = [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in rec]
    msg = str(runtime[0].message)
    assert "extension blocked for the fallback test" in msg and "fusedrnn._C" in msg, msg
    exp = ref(x)
    for a, b in ((out1[0], exp[0]), (out1[1][0], exp[1][0]), (out1[1][1], exp[1][1]),
                 (out2[0], exp[0])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert fusedrnn.build_info()["backend"] == "reference"
    print("FALLBACK-OK")
""")


def test_fallback_to_reference_when_extension_missing():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FALLBACK-OK" in res.stdout
