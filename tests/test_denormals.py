"""No step kernel computes a denormal from ordinary states, not even in vector lanes it then
discards: denormal arithmetic takes a microcode assist per vector on x86 (~100x the cost of the
instruction), so a kernel that forms one on every step runs several times slower whenever the
states are not 0, and nothing in its results shows it.

The cell math's clamps (csrc/cells/common.h) are selects; gcc vectorises a select by computing
both arms on every lane and blending. With exp clamped at its own range, the constant arm of the
sigmoid was f = 1 / (1 + exp(88)), a denormal, and the LSTM loops computed f * c_{t-1} on every
vector of every step: under AVX2 (which has no lane masks) the fp32 and fp64 step kernels ran 2-2.5x
slower on any state that was not 0. The arithmetic's own flags (on x86 MXCSR's denormal-operand
and underflow flags, which discarded lanes raise too; the calling thread's, and one torch thread
keeps the whole call on it) show whether any lane met a denormal."""

import pytest
import torch

import fusedrnn
from fusedrnn.cells import LSTM_FAMILY
from fusedrnn.modules import CELL_MODULES, SEQUENCE_MODULES
from fusedrnn.testing import CELLS

ops = torch.ops.fusedrnn


@pytest.fixture
def one_thread():
    """One torch thread (the call stays on this thread, whose flags are read), denormals kept
    (flush-to-zero would hide them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flush = getattr(torch, "is_flush_denormal_enabled", lambda: False)()
    torch.set_flush_denormal(False)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush)


def _underflows(fn):
    """Whether running fn() met a denormal on this thread."""
    ops._cpu_denormal_flags(True)
    fn()
    return ops._cpu_denormal_flags(True)


def test_the_flags_see_a_denormal(one_thread):
    """The check can fail: a denormal result or operand raises the flags, ordinary arithmetic
    does not."""
    tiny = torch.full((64,), 1e-300, dtype=torch.float64)
    assert _underflows(lambda: tiny * 1e-10)
    denormal = tiny * 1e-10
    assert _underflows(lambda: denormal * 1e10)
    assert not _underflows(lambda: tiny * 1e10)


# B = 3: the small GEMMs and the step kernel (GemmStep); B = 40: the fused tiles where the
# call takes them (fp32 / bf16 layer calls of enough steps and rows)
@pytest.mark.parametrize("batch", [3, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_layer_steps_compute_no_denormal(cell, dtype, batch, cpu_isa, one_thread):
    torch.manual_seed(0)
    module = SEQUENCE_MODULES[cell](24, 40).to(dtype)
    x = torch.randn(12, batch, 24, dtype=dtype, requires_grad=True)
    # states far from 0 (ordinary trained-model states), where the old kernels underflowed
    h0 = torch.randn(1, batch, 40, dtype=dtype)
    state = (h0, torch.randn(1, batch, 40, dtype=dtype)) if cell in LSTM_FAMILY else h0
    with torch.no_grad():
        assert not _underflows(lambda: module(x, state)), f"{cell} {cpu_isa} forward"
    out, _ = module(x, state)
    loss = out.square().sum()
    assert not _underflows(lambda: loss.backward()), f"{cell} {cpu_isa} backward"
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_cell_calls_compute_no_denormal(cell, dtype, cpu_isa, one_thread):
    torch.manual_seed(0)
    module = CELL_MODULES[cell](1, 51).to(dtype)
    x = torch.randn(97, 1, dtype=dtype)
    h = torch.randn(97, 51, dtype=dtype)
    state = (h, torch.randn(97, 51, dtype=dtype)) if cell in LSTM_FAMILY else h
    with torch.no_grad():
        assert not _underflows(lambda: module(x, state)), f"{cell} {cpu_isa}"


def test_fusedrnn_is_the_library_under_test():
    assert fusedrnn.build_info()["load_error"] is None
