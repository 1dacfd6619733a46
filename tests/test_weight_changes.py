"""A call sees the weights as they are now: nothing derived from the weights (packed panels,
summed biases, transposes) outlives a call, so an optimizer step, load_state_dict, .to(), a
replaced parameter, a parametrization and writes that bypass the version counter (.data, numpy)
all show in the next call. Each check compares the module after the change, bit for bit, with a
fresh module given the same weights: the same kernels on the same numbers, so any stale state
would show as a difference.

Also: a layer call allocates nothing per step (design.md §2, "No allocation per step").
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fusedrnn
from fusedrnn import modules

pytestmark = pytest.mark.skipif(
    fusedrnn.backend() != "fused", reason="the compiled operators did not load"
)

I, H = 20, 40
LAYERS = modules.SEQUENCE_MODULES
CELLS = modules.CELL_MODULES
# (T, B) of the calls: the tiled fused steps, whose weights are packed per call
# (kernels/cpu/fused_step.h: at least 4 steps and 32 rows, more than 4 rows a step; the cells'
# LSTM-family forwards at 33 rows too), and the small GEMMs of one row a step
SHAPES = {"tiles": (6, 33), "one_row": (6, 1)}


def _make(kind, cell):
    torch.manual_seed(0)
    return (LAYERS if kind == "layer" else CELLS)[cell](I, H)


def _input(kind, shape):
    T, B = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    return torch.randn(T, B, I, generator=g) if kind == "layer" else torch.randn(B, I, generator=g)


def _run(m, x):
    """The module's outputs on x as a flat list of tensors; a cell: two steps, so that the
    recurrent weights count (the first starts from a zero state)."""
    with torch.no_grad():
        if x.dim() == 3:
            out, state = m(x)
            return [out] + (list(state) if isinstance(state, tuple) else [state])
        out = m(x, m(x))
    return list(out) if isinstance(out, tuple) else [out]


def _fresh_like(m, kind, cell):
    """A new module of the same class and sizes holding m's current (effective) weights."""
    fresh = _make(kind, cell).to(next(m.parameters()).dtype)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            p.copy_(getattr(m, name))
    return fresh


def _assert_current(m, x, kind, cell):
    got, want = _run(m, x), _run(_fresh_like(m, kind, cell), x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w), (g - w).abs().max()


def _assert_changed(before, m, x):
    """The outputs differ from `before`: the change reached the weights at all."""
    assert not all(torch.equal(a, b) for a, b in zip(before, _run(m, x)))


KINDS = [("layer", c, s) for c in LAYERS for s in SHAPES] + [("cell", c, "tiles") for c in CELLS]
IDS = [f"{k}-{c}-{s}" for k, c, s in KINDS]


@pytest.mark.parametrize("kind,cell,shape", KINDS, ids=IDS)
@pytest.mark.parametrize("opt", ["sgd", "adam_foreach", "adam_fused"])
def test_optimizer_steps(kind, cell, shape, opt):
    m, x = _make(kind, cell), _input(kind, shape)
    optim = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=False),
        "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.05, foreach=True),
        "adam_fused": lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
    }[opt](m.parameters())
    for _ in range(3):
        before = _run(m, x)
        optim.zero_grad()
        out = m(x) if kind == "layer" else m(x, m(x))
        (out[0] if isinstance(out, tuple) else out).square().sum().backward()
        optim.step()
        _assert_changed(before, m, x)
        _assert_current(m, x, kind, cell)


@pytest.mark.parametrize("kind,cell,shape", KINDS, ids=IDS)
def test_load_state_dict(kind, cell, shape):
    m, x = _make(kind, cell), _input(kind, shape)
    before = _run(m, x)
    other = copy.deepcopy(m)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    m.load_state_dict(other.state_dict())
    _assert_changed(before, m, x)
    _assert_current(m, x, kind, cell)


@pytest.mark.parametrize("kind,cell,shape", KINDS, ids=IDS)
def test_to_and_back(kind, cell, shape):
    """.to() replaces each parameter's data (a new tensor): float64 and back to float32, with a
    change in between."""
    m, x = _make(kind, cell), _input(kind, shape)
    _run(m, x)
    m.to(torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0.75)
    _assert_current(m, x.double(), kind, cell)
    before = _run(m, x.double())
    m.to(torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    _assert_changed([b.float() for b in before], m, x)
    _assert_current(m, x, kind, cell)


@pytest.mark.parametrize("kind,cell,shape", KINDS, ids=IDS)
@pytest.mark.parametrize("how", ["data", "numpy", "replace"])
def test_writes_around_the_version_counter(kind, cell, shape, how):
    """Writes a cache keyed on version counters could not see: through .data (its own counter,
    the soft target-network update `target.data.copy_(...)`), through a numpy view, and a
    parameter replaced by another one."""
    m, x = _make(kind, cell), _input(kind, shape)
    for _ in range(2):
        before = _run(m, x)
        for name, p in list(m.named_parameters()):
            if how == "data":
                p.data.mul_(0.9).add_(0.01)
            elif how == "numpy":
                a = p.detach().numpy()
                np.multiply(a, 0.9, out=a)
                np.add(a, 0.01, out=a)
            else:
                setattr(m, name, nn.Parameter(p.detach() * 0.9 + 0.01))
        _assert_changed(before, m, x)
        _assert_current(m, x, kind, cell)


class _Scale(nn.Module):
    """weight -> s * weight for a learnable scalar s."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.0))

    def forward(self, w):
        return self.s * w


@pytest.mark.parametrize("kind,cell,shape", KINDS, ids=IDS)
def test_parametrization(kind, cell, shape):
    """A parametrized recurrent weight is recomputed on every access; changing the
    parametrization's own parameter (in place, as an optimizer does) shows in the next call."""
    m, x = _make(kind, cell), _input(kind, shape)
    name = "weight_hh_l0" if kind == "layer" else "weight_hh"
    parametrize.register_parametrization(m, name, _Scale())
    scale = getattr(m.parametrizations, name)[0].s
    for value in (0.5, -1.5):
        before = _run(m, x)
        with torch.no_grad():
            scale.fill_(value)
        _assert_changed(before, m, x)
        _assert_current(m, x, kind, cell)


# ---- no allocation per step -------------------------------------------------------------------


def _allocations(fn) -> int:
    """How many CPU allocations (through torch's allocator) fn makes, from the profiler's event
    tree (the same events torch.profiler's memory timeline reads)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    n, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.alloc_size > 0:
            n += 1
        stack.extend(e.children)
    return n


def _call(m, T, B, grad):
    x = torch.randn(T, B, I, requires_grad=grad)

    def fn():
        if grad:
            out, _ = m(x)
            out.sum().backward()
        else:
            with torch.no_grad():
                m(x)

    return fn


# B = 1, 3: the small GEMMs; B = 33: the tiled steps (forward), rows within one backward chunk
# (steps.h: the backward keeps its per-row gradients in chunks of 1024 rows, each with its own
# weight-gradient GEMMs)
@pytest.mark.parametrize("B,T_short,T_long", [(1, 5, 600), (3, 5, 300), (33, 5, 30)])
@pytest.mark.parametrize("cell", list(LAYERS))
def test_no_allocation_per_step(cell, B, T_short, T_long):
    m = _make("layer", cell)
    # first calls: lazy initialisation of the libraries, and the packed-weight buffers a thread
    # keeps for its next calls (kernels/cpu/fused_step.h, PanelBuffer: a long call packs W_ih
    # for the input product, a short one does not)
    _call(m, T_short, B, True)()
    _call(m, T_long, B, False)()
    assert _allocations(_call(m, T_long, B, False)) == _allocations(_call(m, T_short, B, False))
    short, long = _allocations(_call(m, T_short, B, True)), _allocations(_call(m, T_long, B, True))
    # Training may differ by one: once the weight-gradient GEMM of the whole call is large, the
    # GEMM library takes a scratch buffer for it (one per call, seen as an allocation in the
    # backward op itself); an allocation per step would add T_long - T_short >= 25.
    assert 0 <= long - short <= 1, (short, long)
