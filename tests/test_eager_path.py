"""The eager call path of the ops (fusedrnn/_ops.py `eager_forward`, csrc/driver/eager.cpp):
one op call whose autograd is a C++ node running the same forward and backward ops as the
forward op's registered autograd; without a gradient, the forward op below the Autograd key. It
must compute exactly what the registered autograd computes, and step aside wherever that one is
needed."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import fusedrnn
from fusedrnn import _ops, cells
from fusedrnn.reference import LayerArgs
from fusedrnn.testing import make_weights

F64 = torch.float64


class _AnyMode(TorchFunctionMode):
    """An active torch function mode: the eager path must not be taken under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _args(cell):
    w = make_weights(cell, 5, 6, 0, True, dtype=F64, requires_grad=True)
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    h = torch.randn(3, 6, dtype=F64, requires_grad=True)
    c = torch.randn(3, 6, dtype=F64, requires_grad=True) if cells.CELLS[cell].has_cell_state \
        else None
    return LayerArgs(x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"],
                     w["weight_ch"], None, h, c)


def _grads(cell, a, eager, mode=None):
    if mode is None:
        out, hy, cy = _ops.forward(cell, a, True, eager=eager)
    else:
        with mode:
            out, hy, cy = _ops.forward(cell, a, True, eager=eager)
    loss = out.sin().sum() + hy.sum() + (cy.cos().sum() if cy is not None else 0)
    leaves = [t for t in a.tensors if t is not None]
    return out.grad_fn, [out, hy] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("cell", list(cells.CELLS))
def test_eager_function_equals_the_registered_autograd(cell):
    a = _args(cell)
    fn_eager, eager = _grads(cell, a, True)
    for fn_reg, registered in (_grads(cell, a, False),  # a staged call (compile, trace)
                               _grads(cell, a, True, _AnyMode())):  # eager, under a mode
        assert "Eager" in fn_eager.name()  # the C++ node of csrc/driver/eager.cpp
        assert "Eager" not in fn_reg.name()  # the op's registered autograd
        for e, r in zip(eager, registered):
            assert torch.equal(e, r)  # the same kernels on the same inputs: bitwise equal


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_eager_function_double_backward(cell):
    """create_graph=True runs the same differentiable backward as the registered autograd."""
    a = _args(cell)
    def f(*t):
        return _ops.forward(cell, LayerArgs(*t), True, eager=True)[1]
    torch.autograd.gradcheck(f, a.tensors, atol=1e-7)  # fp64 finite differences
    torch.autograd.gradgradcheck(f, a.tensors, atol=1e-7)  # as above


def test_no_gradient_means_no_graph():
    a = _args("lstm")
    with torch.no_grad():
        out, hy, cy = _ops.forward("lstm", a, False, eager=True)
    assert out.grad_fn is None and not out.requires_grad and not hy.requires_grad


def test_steps_aside_under_autocast_and_subclasses():
    a = _args("lstm")
    assert _ops.eager_ok(a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ops.eager_ok(a)
    with _AnyMode():
        assert not _ops.eager_ok(a)

    class Sub(torch.Tensor):
        pass

    assert not _ops.eager_ok(a._replace(input=a.input.detach().as_subclass(Sub)))


def test_modules_train_through_the_eager_path():
    m = fusedrnn.LSTMCell(4, 5)
    h, c = m(torch.randn(2, 4))
    assert "EagerLSTMFamily" in h.grad_fn.name()
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
    c = (torch.randn(3, 6, dtype=F64) if with_state and cells.CELLS[cell].has_cell_state
         else None)
    a = LayerArgs(x, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"],
                  w["weight_ch"], w["weight_hr"], h, c, bs, reverse)
    return a._replace(**{n: getattr(a, n).requires_grad_() for n in grad_of
                         if getattr(a, n) is not None})


@pytest.mark.parametrize("cell", list(cells.CELLS))
@pytest.mark.parametrize("packed,reverse,proj,bias,with_state,grad_of", [
    (True, False, False, True, True, ("input", "weight_ih", "hx")),
    (True, True, True, False, False, ("weight_hh", "weight_ch", "weight_hr")),
    (False, True, True, True, True, ("input", "cx")),
    (False, False, False, False, True, ("weight_ih", "bias_ih")),
])
def test_eager_op_equals_the_registered_autograd_in_every_call_shape(
        cell, packed, reverse, proj, bias, with_state, grad_of):
    """Packed and reverse input, the projection, no bias, no initial state, and gradients of
    only some arguments: the C++ node maps each argument to its gradient as the registered
    autograd does (absent optional arguments have no edge)."""
    a = _variant_args(cell, packed, reverse, proj, bias, with_state, grad_of)
    results = []
    for eager in (True, False):
        out, hy, cy = _ops.forward(cell, a, True, eager=eager)
        loss = out.sin().sum() + hy.cos().sum() + (cy.sum() if cy is not None else 0)
        leaves = [t for t in a.tensors if t is not None and t.requires_grad]
        results.append([out, hy] + list(torch.autograd.grad(loss, leaves)))
        assert ("Eager" in out.grad_fn.name()) == eager
    for e, r in zip(*results):
        assert torch.equal(e, r)  # the same kernels on the same inputs: bitwise equal


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
