"""The autograd of the layer ops (csrc/ops/autograd.cpp): one C++ node per op family, the
kernel of each forward op at the Autograd key, which eager, compiled, exported and traced calls
all go through. Its gradients match the reference's in every call shape; create_graph=True
differentiates the reference equations (fusedrnn/_ops.py `_differentiable_backward`)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fusedrnn
from fusedrnn import _ops, cells, reference
from fusedrnn.reference import LayerArgs
from fusedrnn.testing import assert_close, make_weights

F64 = torch.float64
pytestmark = pytest.mark.skipif(not _ops.HAS_C, reason=f"no compiled ops: {_ops.LOAD_ERROR}")


class _AnyMode(TorchFunctionMode):
    """An active torch function mode: the call must still take the same node."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _args(cell, dtype=F64):
    w = make_weights(cell, 5, 6, 0, True, dtype=dtype, requires_grad=True)
    x = torch.randn(4, 3, 5, dtype=dtype, requires_grad=True)
    h = torch.randn(3, 6, dtype=dtype, requires_grad=True)
    c = (
        torch.randn(3, 6, dtype=dtype, requires_grad=True)
        if cells.CELLS[cell].has_cell_state
        else None
    )
    return LayerArgs(
        x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], w["weight_ch"], None, h, c
    )


def _node_name(out):
    return out.grad_fn.name()


@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_one_autograd_kernel_per_forward_op(cell):
    """The forward op's autograd is the C++ kernel at the Autograd key, no Python kernel beside
    it, and there is no second entry op."""
    name = f"fusedrnn::{cell}_forward"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward").default
    assert not any("Autograd" in str(k) for k in op.py_kernels)
    assert not hasattr(torch.ops.fusedrnn, f"_{cell}_eager")


@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_every_caller_records_the_same_node(cell):
    """Plain eager tensors, a torch function mode, autocast and a replayed torch.jit.trace all
    record the one C++ node, and its gradients are the same."""
    a = _args(cell)
    out, _, _ = _ops.forward(cell, a)
    node = _node_name(out)
    assert "FamilyFunction" in node  # the torch::autograd::Function of ops/autograd.cpp
    with _AnyMode():
        assert _node_name(_ops.forward(cell, a)[0]) == node
    a32 = _args(cell, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = _ops.forward(cell, a32)[0]
    assert out16.dtype == torch.bfloat16 and "FamilyFunction" in _node_name(out16)

    def f(*t):
        return _ops.forward(cell, LayerArgs(*t))[0]

    leaves = [t for t in a.tensors if t is not None]
    with torch.no_grad():  # a trace records the op, not the grad mode: the node is made on replay
        traced = torch.jit.trace(lambda *t: f(*_fill(a, t)), leaves, check_trace=False)
    out_t = traced(*leaves)
    assert _node_name(out_t) == node
    g_eager = torch.autograd.grad(out.sin().sum(), leaves)
    g_trace = torch.autograd.grad(out_t.sin().sum(), leaves)
    for e, t in zip(g_eager, g_trace):
        assert torch.equal(e, t)  # the same kernels on the same inputs: bitwise equal


def _fill(a, leaves):
    """LayerArgs `a` with its defined tensors replaced, in order, by `leaves`."""
    it = iter(leaves)
    return [next(it) if t is not None else None for t in a.tensors]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward(cell):
    """create_graph=True: a differentiable first-order backward (the reference equations)."""
    a = _args(cell)

    def f(*t):
        return _ops.forward(cell, LayerArgs(*t))[1]

    torch.autograd.gradcheck(f, a.tensors, atol=1e-7)  # fp64 finite differences
    torch.autograd.gradgradcheck(f, a.tensors, atol=1e-7)  # as above


def test_no_gradient_means_no_graph_and_no_workspace():
    a = _args("lstm")
    op = torch.ops.fusedrnn.lstm_forward.default
    with torch.no_grad():
        out, hy, cy, ws = op(*a, False)
        assert out.grad_fn is None and not out.requires_grad and ws.numel() == 0
        assert op(*a, True)[3].numel() > 0  # asked for without a node
    out, hy, cy, ws = op(*a, False)  # a node is recorded: the workspace is kept whatever asked
    assert out.grad_fn is not None and ws.numel() > 0 and not ws.requires_grad


def test_modules_train_through_the_node():
    m = fusedrnn.LSTMCell(4, 5)
    h, c = m(torch.randn(2, 4))
    (h.sum() + c.sum()).backward()
    assert all(p.grad is not None for p in m.parameters())


def _variant_args(cell, packed, reverse, proj, bias, with_state, grad_of):
    """Layer args of one call shape; `grad_of` names the arguments that require a gradient."""
    torch.manual_seed(1)
    P = 4 if proj and cells.CELLS[cell].has_cell_state else 0
    H_out = P or 6
    w = make_weights(cell, 5, 6, P, bias, dtype=F64)
    if packed:
        x = torch.randn(9, 5, dtype=F64)  # lengths 4, 3, 2: batch_sizes 3, 3, 2, 1
        bs = torch.tensor([3, 3, 2, 1])
    else:
        x, bs = torch.randn(4, 3, 5, dtype=F64), None
    h = torch.randn(3, H_out, dtype=F64) if with_state else None
    c = torch.randn(3, 6, dtype=F64) if with_state and cells.CELLS[cell].has_cell_state else None
    a = LayerArgs(
        x,
        w["weight_ih"],
        w["weight_hh"],
        w["bias_ih"],
        w["bias_hh"],
        w["weight_ch"],
        w["weight_hr"],
        h,
        c,
        bs,
        reverse,
    )
    return a._replace(
        **{n: getattr(a, n).requires_grad_() for n in grad_of if getattr(a, n) is not None}
    )


@pytest.mark.parametrize("cell", list(cells.CELLS))
@pytest.mark.parametrize(
    "packed,reverse,proj,bias,with_state,grad_of",
    [
        (True, False, False, True, True, ("input", "weight_ih", "hx")),
        (True, True, True, False, False, ("weight_hh", "weight_ch", "weight_hr")),
        (False, True, True, True, True, ("input", "cx")),
        (False, False, False, False, True, ("weight_ih", "bias_ih")),
    ],
)
def test_node_gradients_in_every_call_shape(cell, packed, reverse, proj, bias, with_state, grad_of):
    """Packed and reverse input, the projection, no bias, no initial state, and gradients of
    only some arguments: the node maps each argument to its gradient (absent optional arguments
    have no edge) and matches the reference's autograd at the fp64 tolerance."""
    a = _variant_args(cell, packed, reverse, proj, bias, with_state, grad_of)
    results = []
    for fn in (_ops.forward, reference.layer_of):
        out, hy, cy = fn(cell, a)
        loss = out.sin().sum() + hy.cos().sum() + (cy.sum() if cy is not None else 0)
        leaves = [t for t in a.tensors if t is not None and t.requires_grad]
        results.append([out, hy] + list(torch.autograd.grad(loss, leaves)))
    for got, ref in zip(*results):
        assert_close(got, ref, F64, f"{cell}")


def test_exposed_output_survives_in_place_use_and_weights_are_version_checked():
    """As torch.nn: an in-place operation on a layer's output does not break its backward (the
    output is a copy of what the node saves), and modifying a saved weight in place before the
    backward is an error rather than a wrong gradient."""
    m = fusedrnn.LSTM(4, 5)
    y, _ = m(torch.randn(3, 2, 4))
    y.relu_()
    y.sum().backward()
    assert m.weight_hh_l0.grad is not None
    y, _ = m(torch.randn(3, 2, 4))
    with torch.no_grad():
        m.weight_hh_l0.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
