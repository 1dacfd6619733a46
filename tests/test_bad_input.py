"""Hardening: a catalogue of bad inputs to the modules, the cells and the ops.

Every entry of CATALOGUE is (callable, expected exception type, regex the message must match,
torch.nn equivalent or None). The regex names the offending argument, so that a user can tell
what to fix. Where a torch.nn module has the same call, the entry also checks that torch raises
the same exception type (drop-in: code that catches torch's error catches this one).
Edge inputs that torch accepts or rejects in its own way (empty batch, empty sequence, NaN/inf)
are compared with torch.nn's behaviour directly. The last test checks that after all of that
the extension still computes correct results.
"""

import os
import re
import subprocess
import sys
import textwrap
from typing import Callable, NamedTuple, Optional

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import cells, modules, reference
from fusedrnn.testing import (
    CELLS,
    assert_close,
    compare_modules,
    flatten_result,
    layer_args,
    make_pair,
    make_weights,
)

F64 = torch.float64
F32 = torch.float32
I, H, T, B, P = 3, 5, 4, 3, 2
PACKED = [3, 2, 1]  # batch sizes of packed op inputs: 6 rows
OPS = torch.ops.fusedrnn
FUSED_OF = modules.SEQUENCE_MODULES
CELL_OF = modules.CELL_MODULES
# the cells torch.nn has (nn.LSTM / nn.GRU exactly), and their sequence variants with a projection
TORCH_CELLS = [n for n, c in cells.CELLS.items() if c.in_torch_nn]
NAN_MODES = [
    m for n in TORCH_CELLS for m in ((n, n + "_proj") if cells.CELLS[n].has_cell_state else (n,))
]


class Case(NamedTuple):
    fn: Callable[[], object]
    exc: type
    match: str
    torch_fn: Optional[Callable[[], object]] = None


# ---- builders: every tensor is made when the entry runs, from the test's seeded RNG -------------


def _x(*shape, dtype=F64, device="cpu"):
    return torch.randn(*shape, dtype=F64).to(dtype).to(device)


def _mod(cls, *args, **kw):
    return cls(*args, dtype=F64, **kw) if args else cls(I, H, dtype=F64, **kw)


def _pair(tcls, fcls, **kw):
    return make_pair(tcls, fcls, I, H, **kw)


def _op_args(cell, packed=True, proj=0):
    """Valid arguments of `cell`'s forward op: (x, weights, hx, cx, batch_sizes)."""
    w = make_weights(cell, I, H, proj)
    if packed:
        bs = torch.tensor(PACKED)
        x, Bn = _x(sum(PACKED), I), PACKED[0]
    else:
        bs, x, Bn = None, _x(T, B, I), B
    hx = _x(Bn, proj or H)
    cx = _x(Bn, H) if cells.CELLS[cell].has_cell_state else None
    return x, w, hx, cx, bs


def _fwd(cell, x, w, hx, cx, bs, need_workspace=True):
    if not cells.CELLS[cell].has_cell_state:
        return getattr(OPS, f"{cell}_forward")(x, *layer_args(w)[:4], hx, bs, False, need_workspace)
    return getattr(OPS, f"{cell}_forward")(x, *layer_args(w), hx, cx, bs, False, need_workspace)


def _op(cell, packed=True, proj=0, **over):
    """A forward op call with the valid arguments, some replaced: over maps x/hx/cx/bs or a
    weight name to a function of the valid value giving the bad one."""

    def call():
        x, w, hx, cx, bs = _op_args(cell, packed, proj)
        args = {"x": x, "hx": hx, "cx": cx, "bs": bs}
        for k, f in over.items():
            if k in args:
                args[k] = f(args[k])
            else:
                w[k] = f(w[k])
        return _fwd(cell, args["x"], w, args["hx"], args["cx"], args["bs"])

    return call


def _bwd(cell, **over):
    """A backward op call on the results of a valid packed forward, some arguments replaced:
    over maps go/ghy/gcy/bs/output/workspace to a function of the valid value giving the bad
    one."""

    def call():
        x, w, hx, cx, bs = _op_args(cell, True)
        res = _fwd(cell, x, w, hx, cx, bs)
        out, ws = res[0], res[-1]
        a = {
            "go": torch.randn_like(out),
            "ghy": torch.randn_like(res[1]),
            "gcy": torch.randn_like(res[2]) if cells.CELLS[cell].has_cell_state else None,
            "bs": bs,
            "output": out,
            "workspace": ws,
        }
        for k, f in over.items():
            a[k] = f(a[k])
        mask = [True, True]
        if not cells.CELLS[cell].has_cell_state:
            return getattr(OPS, f"{cell}_backward")(
                a["go"],
                a["ghy"],
                x,
                *layer_args(w)[:4],
                hx,
                a["bs"],
                False,
                a["output"],
                a["workspace"],
                mask,
            )
        return getattr(OPS, f"{cell}_backward")(
            a["go"],
            a["ghy"],
            a["gcy"],
            x,
            *layer_args(w),
            hx,
            cx,
            a["bs"],
            False,
            a["output"],
            a["workspace"],
            mask,
        )

    return call


def _inference_workspace(cell):
    """Replaces a workspace with the (empty) one of a need_workspace=False forward."""

    def f(_ws):
        x, w, hx, cx, bs = _op_args(cell, True)
        return _fwd(cell, x, w, hx, cx, bs, need_workspace=False)[-1]

    return f


def _lstm_state(Ld=1, Bn=B, Hh=H, Hc=H, dtype=F64, device="cpu"):
    return (_x(Ld, Bn, Hh, dtype=dtype, device=device), _x(Ld, Bn, Hc, dtype=dtype, device=device))


def _packed_bad_features():
    return pack_padded_sequence(_x(T, B, I + 1), torch.tensor([4, 2, 1]))


def _call_pair(tcls, fcls, make_args, **kw):
    """(fused call, torch call) of the same module arguments and forward arguments."""
    holder = {}

    def mods():
        if "m" not in holder:
            holder["m"] = _pair(tcls, fcls, **kw)
        return holder["m"]

    def fused():
        return mods()[1](*make_args())

    def ref():
        return mods()[0](*make_args())

    return fused, ref


def _entry(pair, exc, match):
    fused, ref = pair
    return Case(fused, exc, match, ref)


# ---- the catalogue -----------------------------------------------------------------------------

CATALOGUE = {
    # -- sequence modules: rank, feature size ----------------------------------------------------
    "LSTM/input-rank-1": _entry(
        _call_pair(nn.LSTM, fusedrnn.LSTM, lambda: (_x(I),)), ValueError, r"2D or 3D"
    ),
    "WorkingMemoryLSTM/input-rank-4": Case(
        lambda: _mod(fusedrnn.WorkingMemoryLSTM)(_x(T, B, I, 1)), ValueError, r"input.*2D or 3D"
    ),
    "PeepholeLSTM/feature-size": Case(
        lambda: _mod(fusedrnn.PeepholeLSTM)(_x(T, B, I + 1)), RuntimeError, r"input_size"
    ),
    "GRU/batch_first-feature-size": _entry(
        _call_pair(nn.GRU, fusedrnn.GRU, lambda: (_x(B, T, I + 2),), batch_first=True),
        RuntimeError,
        r"input_size",
    ),
    "LSTM/packed-feature-size": _entry(
        _call_pair(nn.LSTM, fusedrnn.LSTM, lambda: (_packed_bad_features(),)),
        RuntimeError,
        r"input_size",
    ),
    # -- sequence modules: initial states ------------------------------------------------------
    "WorkingMemoryLSTM/h0-num_layers*directions": Case(
        lambda: _mod(fusedrnn.WorkingMemoryLSTM, num_layers=2, bidirectional=True)(
            _x(T, B, I), _lstm_state(Ld=2)
        ),
        RuntimeError,
        r"Expected hidden\[0\] size",
    ),
    "LSTM/h0-hidden-size-with-projection": _entry(
        _call_pair(nn.LSTM, fusedrnn.LSTM, lambda: (_x(T, B, I), _lstm_state(Hh=H)), proj_size=P),
        RuntimeError,
        r"Expected hidden\[0\] size",
    ),
    "GRU/hx-batch": _entry(
        _call_pair(nn.GRU, fusedrnn.GRU, lambda: (_x(T, B, I), _x(1, B + 1, H))),
        RuntimeError,
        r"Expected hidden size",
    ),
    "PeepholeLSTM/c0-float32": Case(
        lambda: _mod(fusedrnn.PeepholeLSTM)(_x(T, B, I), (_x(1, B, H), _x(1, B, H, dtype=F32))),
        TypeError,
        r"c_0.*float32",
    ),
    "GRU/hx-float32": Case(
        lambda: _mod(fusedrnn.GRU)(_x(T, B, I), _x(1, B, H, dtype=F32)), TypeError, r"hx.*float32"
    ),
    "WorkingMemoryLSTM/h0-on-meta": Case(
        lambda: _mod(fusedrnn.WorkingMemoryLSTM)(
            _x(T, B, I), (_x(1, B, H, device="meta"), _x(1, B, H))
        ),
        RuntimeError,
        r"h_0.*meta",
    ),
    "GRU/hx-on-meta": _entry(
        _call_pair(nn.GRU, fusedrnn.GRU, lambda: (_x(T, B, I), _x(1, B, H, device="meta"))),
        RuntimeError,
        r"hx.*meta",
    ),
    "LSTM/input-on-meta": _entry(
        _call_pair(nn.LSTM, fusedrnn.LSTM, lambda: (_x(T, B, I, device="meta"),)),
        RuntimeError,
        r"input.*meta",
    ),
    "PeepholeLSTM/hx-3-tuple": Case(
        lambda: _mod(fusedrnn.PeepholeLSTM)(_x(T, B, I), _lstm_state() + (_x(1, B, H),)),
        TypeError,
        r"hx.*\(h_0, c_0\)",
    ),
    # -- sequence modules: input dtype -----------------------------------------------------------
    # torch.nn raises ValueError("RNN input dtype (torch.int64) does not match weight dtype") for
    # any input dtype other than the parameters', integer and bool included.
    "LSTM/int64-input": _entry(
        _call_pair(nn.LSTM, fusedrnn.LSTM, lambda: (torch.randint(-3, 3, (T, B, I)),)),
        ValueError,
        r"dtype",
    ),
    "GRU/bool-input": _entry(
        _call_pair(nn.GRU, fusedrnn.GRU, lambda: (torch.rand(T, B, I) > 0.5,)), ValueError, r"dtype"
    ),
    "WorkingMemoryLSTM/float16-input-float64-params": Case(
        lambda: _mod(fusedrnn.WorkingMemoryLSTM)(_x(T, B, I, dtype=torch.float16)),
        ValueError,
        r"dtype.*float16",
    ),
    "LSTM/list-input": Case(
        lambda: _mod(fusedrnn.LSTM)([[0.0] * I] * T), TypeError, r"input.*list"
    ),
    # -- constructors ----------------------------------------------------------------------------
    "LSTM(input_size=0)": Case(
        lambda: fusedrnn.LSTM(0, H), ValueError, r"input_size", lambda: nn.LSTM(0, H)
    ),
    "GRU(hidden_size=-3)": Case(
        lambda: fusedrnn.GRU(I, -3), ValueError, r"hidden_size", lambda: nn.GRU(I, -3)
    ),
    "PeepholeLSTM(num_layers=1.5)": Case(
        lambda: fusedrnn.PeepholeLSTM(I, H, num_layers=1.5),
        TypeError,
        r"num_layers",
        lambda: nn.LSTM(I, H, num_layers=1.5),
    ),
    "WorkingMemoryLSTM(hidden_size=2.0)": Case(
        lambda: fusedrnn.WorkingMemoryLSTM(I, 2.0),
        TypeError,
        r"hidden_size",
        lambda: nn.LSTM(I, 2.0),
    ),
    "GRU(dropout=nan)": Case(
        lambda: fusedrnn.GRU(I, H, dropout=float("nan")),
        ValueError,
        r"dropout",
        lambda: nn.GRU(I, H, dropout=float("nan")),
    ),
    "LSTM(dropout=1+1e-7)": Case(
        lambda: fusedrnn.LSTM(I, H, dropout=1 + 1e-7),
        ValueError,
        r"dropout",
        lambda: nn.LSTM(I, H, dropout=1 + 1e-7),
    ),
    "WorkingMemoryLSTM(dropout=-1e-9)": Case(
        lambda: fusedrnn.WorkingMemoryLSTM(I, H, num_layers=2, dropout=-1e-9),
        ValueError,
        r"dropout",
        lambda: nn.LSTM(I, H, num_layers=2, dropout=-1e-9),
    ),
    "LSTM(proj_size=hidden_size, 2 layers, bidirectional)": Case(
        lambda: fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=H),
        ValueError,
        r"proj_size",
        lambda: nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=H),
    ),
    "PeepholeLSTM(proj_size>hidden_size)": Case(
        lambda: fusedrnn.PeepholeLSTM(I, H, proj_size=H + 1),
        ValueError,
        r"proj_size",
        lambda: nn.LSTM(I, H, proj_size=H + 1),
    ),
    # torch.nn.LSTMCell accepts hidden_size=0 (so do the fused cells) and fails on -1 with an
    # incidental error about a negative tensor dimension; the fused cells reject it up front.
    "LSTMCell(hidden_size=-1)": Case(lambda: fusedrnn.LSTMCell(I, -1), ValueError, r"hidden_size"),
    "GRUCell(input_size=-1)": Case(lambda: fusedrnn.GRUCell(-1, H), ValueError, r"input_size"),
    "PeepholeLSTMCell(hidden_size='4')": Case(
        lambda: fusedrnn.PeepholeLSTMCell(I, "4"), TypeError, r"hidden_size"
    ),
    # -- cells -----------------------------------------------------------------------------------
    "PeepholeLSTMCell/input-rank-3": Case(
        lambda: _mod(fusedrnn.PeepholeLSTMCell)(_x(T, B, I)), ValueError, r"1D or 2D"
    ),
    "WorkingMemoryLSTMCell/feature-size": Case(
        lambda: _mod(fusedrnn.WorkingMemoryLSTMCell)(_x(B, I + 1)), RuntimeError, r"input_size"
    ),
    "GRUCell/hx-hidden-size": _entry(
        _call_pair(nn.GRUCell, fusedrnn.GRUCell, lambda: (_x(B, I), _x(B, H + 1))),
        RuntimeError,
        r"hidden0 has inconsistent hidden_size",
    ),
    "LSTMCell/cx-batch": _entry(
        _call_pair(nn.LSTMCell, fusedrnn.LSTMCell, lambda: (_x(B, I), (_x(B, H), _x(B + 1, H)))),
        RuntimeError,
        r"hidden1 batch size",
    ),
    "LSTMCell/int64-input": Case(
        lambda: _mod(fusedrnn.LSTMCell)(torch.randint(0, 3, (B, I))), TypeError, r"input.*int64"
    ),
    "WorkingMemoryLSTMCell/hx-float32": Case(
        lambda: _mod(fusedrnn.WorkingMemoryLSTMCell)(_x(B, I), (_x(B, H, dtype=F32), _x(B, H))),
        TypeError,
        r"hx.*float32",
    ),
    "GRUCell/hx-on-meta": Case(
        lambda: _mod(fusedrnn.GRUCell)(_x(B, I), _x(B, H, device="meta")), TypeError, r"hx.*meta"
    ),
    "PeepholeLSTMCell/unbatched-input-batched-state": Case(
        lambda: _mod(fusedrnn.PeepholeLSTMCell)(_x(I), (_x(B, H), _x(B, H))),
        RuntimeError,
        r"hidden0 has inconsistent hidden_size",
    ),
    # -- forward ops: input ----------------------------------------------------------------------
    "lstm_forward/padded-input-rank-4": Case(
        _op("lstm", False, x=lambda x: x.unsqueeze(2)), RuntimeError, r"input must be 3-D"
    ),
    "lstm_forward/input-features-vs-weight_ih": Case(
        _op("lstm", False, x=lambda x: torch.cat([x, x], -1)),
        RuntimeError,
        r"weight_ih must have shape",
    ),
    "lstm_forward/int64-input": Case(
        _op("lstm", x=lambda x: x.long()), RuntimeError, r"input must be float"
    ),
    "gru_forward/complex-input": Case(
        _op("gru", x=lambda x: x.to(torch.complex128)), RuntimeError, r"input must be float"
    ),
    # -- forward ops: packed batch sizes ---------------------------------------------------------
    "gru_forward/batch_sizes-increasing": Case(
        _op("gru", hx=lambda h: None, bs=lambda b: b.flip(0)),
        RuntimeError,
        r"batch_sizes must be non-increasing",
    ),
    "peephole_lstm_forward/batch_sizes-negative": Case(
        _op("peephole_lstm", bs=lambda b: torch.tensor([3, 2, -1])),
        RuntimeError,
        r"batch_sizes must be positive.*-1",
    ),
    "wm_lstm_forward/batch_sizes-zero": Case(
        _op("wm_lstm", bs=lambda b: torch.tensor([3, 3, 0])),
        RuntimeError,
        r"batch_sizes must be positive.*= 0",
    ),
    "lstm_forward/batch_sizes-int32": Case(
        _op("lstm", bs=lambda b: b.int()),
        RuntimeError,
        r"batch_sizes must be a 1-D int64 CPU tensor",
    ),
    "gru_forward/batch_sizes-float": Case(
        _op("gru", bs=lambda b: b.double()),
        RuntimeError,
        r"batch_sizes must be a 1-D int64 CPU tensor",
    ),
    "wm_lstm_forward/batch_sizes-sum-short": Case(
        _op("wm_lstm", bs=lambda b: torch.tensor([3, 2])),
        RuntimeError,
        r"sum\(batch_sizes\) = 5 must equal input.size\(0\) = 6",
    ),
    "lstm_forward/batch_sizes-sum-long": Case(
        _op("lstm", bs=lambda b: torch.tensor([3, 2, 2])), RuntimeError, r"sum\(batch_sizes\) = 7"
    ),
    # batch_sizes on another device than the CPU (here the only other device available: meta);
    # like the next entry, a tensor on another device must be rejected, not computed with
    "lstm_forward/batch_sizes-on-meta": Case(
        _op("lstm", bs=lambda b: b.to("meta")), RuntimeError, r"batch_sizes"
    ),
    # -- forward ops: weights and states ---------------------------------------------------------
    "peephole_lstm_forward/hx-float32": Case(
        _op("peephole_lstm", hx=lambda h: h.float()),
        RuntimeError,
        r"hx must have the dtype of input",
    ),
    "wm_lstm_forward/cx-shape": Case(
        _op("wm_lstm", cx=lambda c: c[:, :-1]), RuntimeError, r"cx must have shape"
    ),
    "lstm_forward/hx-on-meta": Case(_op("lstm", hx=lambda h: h.to("meta")), RuntimeError, r"hx"),
    "gru_forward/weight_ih-no-rows": Case(
        _op("gru", weight_ih=lambda w: w[:0], weight_hh=lambda w: w[:0]),
        RuntimeError,
        r"weight_ih must be 2-D",
    ),
    "wm_lstm_forward/bias_ih-without-bias_hh": Case(
        _op("wm_lstm", bias_hh=lambda b: None),
        RuntimeError,
        r"bias_ih and bias_hh must be given together",
    ),
    "peephole_lstm_forward/weight_ch-missing": Case(
        _op("peephole_lstm", weight_ch=lambda w: None), RuntimeError, r"weight_ch"
    ),
    "lstm_forward/weight_hr-rank-1": Case(
        _op("lstm", proj=P, weight_hr=lambda w: w[:, 0]), RuntimeError, r"weight_hr must be 2-D"
    ),
    # -- backward ops ----------------------------------------------------------------------------
    "lstm_backward/batch_sizes-increasing": Case(
        _bwd("lstm", bs=lambda b: torch.tensor([1, 2, 3])),
        RuntimeError,
        r"batch_sizes must be non-increasing",
    ),
    "gru_backward/batch_sizes-negative": Case(
        _bwd("gru", bs=lambda b: torch.tensor([3, 2, -1])),
        RuntimeError,
        r"batch_sizes must be positive",
    ),
    "peephole_lstm_backward/batch_sizes-sum": Case(
        _bwd("peephole_lstm", bs=lambda b: torch.tensor([3, 2])),
        RuntimeError,
        r"sum\(batch_sizes\)",
    ),
    "wm_lstm_backward/batch_sizes-int32": Case(
        _bwd("wm_lstm", bs=lambda b: b.int()), RuntimeError, r"batch_sizes.*int64"
    ),
    "lstm_backward/grad_hy-shape": Case(
        _bwd("lstm", ghy=lambda g: g[:-1]), RuntimeError, r"grad_hy must have shape"
    ),
    "peephole_lstm_backward/grad_cy-float32": Case(
        _bwd("peephole_lstm", gcy=lambda g: g.float()), RuntimeError, r"grad_cy must have the dtype"
    ),
    "gru_backward/grad_output-float32": Case(
        _bwd("gru", go=lambda g: g.float()), RuntimeError, r"grad_output must have the dtype"
    ),
    "gru_backward/workspace-of-inference-forward": Case(
        _bwd("gru", workspace=_inference_workspace("gru")), RuntimeError, r"workspace"
    ),
    "wm_lstm_backward/workspace-of-inference-forward": Case(
        _bwd("wm_lstm", workspace=_inference_workspace("wm_lstm")), RuntimeError, r"workspace"
    ),
    "wm_lstm_backward/output-truncated": Case(
        _bwd("wm_lstm", output=lambda o: o[:-1]), RuntimeError, r"output must be the forward"
    ),
}

assert len(CATALOGUE) >= 30


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_raises(name):
    case = CATALOGUE[name]
    with pytest.raises(Exception) as info:
        case.fn()
    assert type(info.value) is case.exc, (
        f"raised {type(info.value).__name__}: {info.value}; expected {case.exc.__name__}"
    )
    assert re.search(case.match, str(info.value), re.S), (
        f"message does not match {case.match!r}: {info.value}"
    )
    if case.torch_fn is not None:
        # the table's expected type is torch.nn's: check the claim against torch itself
        with pytest.raises(Exception) as t_info:
            case.torch_fn()
        assert type(t_info.value) is case.exc, (
            f"torch.nn raises {type(t_info.value).__name__}: {t_info.value}"
        )


SUBPROCESS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import test_bad_input as t
    torch.manual_seed(0)
    for name in {names!r}:
        try:
            t.CATALOGUE[name].fn()
        except Exception as exc:
            print("RAISED", name, type(exc).__name__, str(exc).splitlines()[0], flush=True)
        else:
            print("NO-EXCEPTION", name, flush=True)
    print("DONE", flush=True)
""")


def test_bad_input_in_subprocess_does_not_crash():
    """Two catalogue entries run in a fresh interpreter: a bad packed batch to a forward op and
    a foreign workspace to a backward op raise and the process exits normally (no abort,
    no segfault)."""
    names = [
        "gru_forward/batch_sizes-increasing",
        "wm_lstm_backward/workspace-of-inference-forward",
    ]
    tests = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests)
    env = dict(
        os.environ,
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    script = SUBPROCESS_SCRIPT.format(tests=tests, names=names)
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, f"returncode {res.returncode}\n{res.stdout}\n{res.stderr}"
    for name in names:
        line = [ln for ln in res.stdout.splitlines() if f" {name} " in ln]
        assert len(line) == 1 and line[0].startswith("RAISED"), res.stdout
        assert "RuntimeError" in line[0] and re.search(CATALOGUE[name].match, line[0]), line[0]
    assert res.stdout.rstrip().endswith("DONE")


# ---- empty batch and empty sequence: whatever torch.nn does ----------------------------------


def _torch_like(cell):
    return nn.LSTM if cells.CELLS[cell].has_cell_state else nn.GRU


def _outcome(fn):
    """('ok', shapes of the result tensors) or ('raise', exception type)."""
    try:
        res = fn()
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return ("raise", type(exc))
    tensors = flatten_result(res)
    return ("ok", [tuple(t.shape) for t in tensors])


EMPTY_CASES = {
    # name: (input shape, module kwargs, state leading shape or None)
    "T=0": ((0, B, I), {}, None),
    "T=0-unbatched": ((0, I), {}, None),
    "T=0-with-state": ((0, B, I), {}, (1, B)),
    "B=0": ((T, 0, I), {}, None),
    "B=0-batch_first-bidirectional-2-layers": (
        (0, T, I),
        dict(batch_first=True, bidirectional=True, num_layers=2),
        None,
    ),
    "B=0-with-state": ((T, 0, I), dict(num_layers=2), (2, 0)),
}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_batch_and_sequence_like_torch(case, cell):
    """B = 0 and T = 0 through the modules: the same result shapes as torch.nn (the peephole and
    working-memory LSTMs as torch.nn.LSTM), or the same exception type where torch.nn raises.
    Where both compute, backward runs and gives gradients of the input's shape."""
    shape, kw, state = EMPTY_CASES[case]
    ref = _torch_like(cell)(I, H, dtype=F64, **kw)
    fused = FUSED_OF[cell](I, H, dtype=F64, **kw)
    x = _x(*shape)

    def args():
        if state is None:
            return (x,)
        h = _x(*state, H)
        return (x, (h, _x(*state, H)) if cells.CELLS[cell].has_cell_state else h)

    exp = _outcome(lambda: ref(*args()))
    got = _outcome(lambda: fused(*args()))
    assert got == exp, f"fused: {got}, torch.nn: {exp}"
    if exp[0] == "ok":
        xl = x.clone().requires_grad_()
        out = fused(xl, *args()[1:])
        total = sum(t.sum() for t in flatten_result(out))
        total.backward()
        assert xl.grad.shape == x.shape


@pytest.mark.parametrize("cell", CELLS)
def test_cell_empty_batch_like_torch(cell):
    """A (0, I) batch through the one-step cells: torch.nn.LSTMCell / GRUCell's shapes, and
    backward gives a (0, I) input gradient and zero weight gradients."""
    tcls = nn.LSTMCell if cells.CELLS[cell].has_cell_state else nn.GRUCell
    exp = tcls(I, H, dtype=F64)(_x(0, I))
    m = CELL_OF[cell](I, H, dtype=F64)
    x = _x(0, I).requires_grad_()
    got = m(x)
    exp = exp if isinstance(exp, tuple) else (exp,)
    got = got if isinstance(got, tuple) else (got,)
    assert [g.shape for g in got] == [e.shape for e in exp]
    sum(g.sum() for g in got).backward()
    assert x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


# ---- NaN and inf: propagate exactly as torch.nn ----------------------------------------------


@pytest.mark.parametrize("mode", NAN_MODES)
def test_nan_inf_propagate_like_torch(mode):
    """NaN, +-inf and huge finite values in the input and NaN in one row of the initial state of
    a two-layer bidirectional module: the NaN positions of the output, the final states, the
    input gradient and every weight gradient are torch.nn's, and the other values agree to the
    fp64 tolerance (design.md §4: 1e-10)."""
    cell, proj = mode.removesuffix("_proj"), mode.endswith("_proj")
    lstm_like = cells.CELLS[cell].has_cell_state
    kw = dict(num_layers=2, bidirectional=True)
    if proj:
        kw["proj_size"] = P
    tcls, fcls = (nn.LSTM if lstm_like else nn.GRU), FUSED_OF[cell]
    ref, fused = make_pair(tcls, fcls, I, H, **kw)
    Bn = 5
    x = _x(T, Bn, I)
    x[1, 0, 0] = float("nan")
    x[2, 1, 1] = float("inf")
    x[0, 2, 2] = float("-inf")
    x[3, 3, :] = 1e300
    Hout = P if proj else H
    h0 = _x(4, Bn, Hout)
    h0[1, 4, 0] = float("nan")  # layer 0, reverse direction, batch row 4
    hx = (h0, _x(4, Bn, H)) if lstm_like else h0
    results = []
    for m in (ref, fused):
        xl = x.clone().requires_grad_()
        res = m(xl, hx)
        tensors = flatten_result(res)
        gen = torch.Generator().manual_seed(7)
        sum((t * torch.randn(t.shape, generator=gen, dtype=F64)).sum() for t in tensors).backward()
        results.append(tensors + [xl.grad] + [p.grad for p in m.parameters()])
    names = ["output", "h_n", "c_n"][: len(results[0]) - 1 - len(list(ref.parameters()))]
    names += ["grad input"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    nan_seen = finite_seen = False
    for name, got, exp in zip(names, results[1], results[0]):
        assert torch.equal(got.isnan(), exp.isnan()), f"{name}: NaN positions differ"
        keep = ~exp.isnan()
        nan_seen |= bool(exp.isnan().any())
        finite_seen |= bool(keep.any())
        assert torch.equal(got[keep].isinf(), exp[keep].isinf()), f"{name}: inf positions differ"
        fin = keep & ~exp.isinf()
        torch.testing.assert_close(
            got[fin], exp[fin], atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}"
        )
    assert nan_seen and finite_seen  # the case exercises both


# ---- after the catalogue: nothing corrupted ---------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_zz_normal_forward_backward_after_catalogue(cell):
    """Runs after everything above (pytest keeps file order): a normal forward and backward of
    each cell still matches torch.nn (LSTM, GRU) or the reference (peephole, working memory),
    so no failed call left state behind (a cached buffer, a thread count, a dispatch entry)."""
    assert torch.get_num_threads() == 1  # conftest's setting survived
    x = _x(T, B, I)
    c = cells.CELLS[cell]
    if c.in_torch_nn:
        tcls = nn.LSTM if c.has_cell_state else nn.GRU
        ref, fused = make_pair(tcls, FUSED_OF[cell], I, H, num_layers=2, bidirectional=True)
        compare_modules(ref, fused, x, None, F64)
        return
    fused = FUSED_OF[cell](I, H, dtype=F64)
    params = [p.detach().clone().requires_grad_() for p in fused.parameters()]
    names = [n for n, _ in fused.named_parameters()]
    w = dict(zip([n[:-3] for n in names], params))  # weight_ih_l0 -> weight_ih
    xl, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, state_f = fused(xl)
    out_r, h_r, c_r = reference.layer(
        cell, xr, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], w.get("weight_ch")
    )
    pairs = [(out_f, out_r, "output")]
    if c.has_cell_state:
        pairs += [(state_f[0][0], h_r, "h_n"), (state_f[1][0], c_r, "c_n")]
    else:
        pairs += [(state_f[0], h_r, "h_n")]
    for a, b, n in pairs:
        assert_close(a, b, F64, n)
    gen = torch.Generator().manual_seed(3)
    go = torch.randn(out_f.shape, generator=gen, dtype=F64)
    (out_f * go).sum().backward()
    (out_r * go).sum().backward()
    assert_close(xl.grad, xr.grad, F64, "grad input")
    for n, p, r in zip(names, fused.parameters(), params):
        assert_close(p.grad, r.grad, F64, f"grad {n}")
