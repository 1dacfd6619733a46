"""The eager call path of the ops (fusedrnn/_ops.py `forward`): in eager grad mode an
autograd.Function over the op's own setup_context and backward, calling the op below the
Autograd key; without a gradient, the op below the Autograd key. It must compute exactly what
the op's registered autograd computes, and step aside wherever that one is needed."""
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
        assert type(fn_eager).__name__ == f"_{cell}_forward_functionBackward"
        assert "_forward_function" not in type(fn_reg).__name__  # the op's registered autograd
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
    assert _ops._eager_ok(a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ops._eager_ok(a)
    with _AnyMode():
        assert not _ops._eager_ok(a)

    class Sub(torch.Tensor):
        pass

    assert not _ops._eager_ok(a._replace(input=a.input.detach().as_subclass(Sub)))


def test_modules_train_through_the_eager_path():
    m = fusedrnn.LSTMCell(4, 5)
    h, c = m(torch.randn(2, 4))
    assert type(h.grad_fn).__name__ == "_lstm_forward_functionBackward"
    (h.sum() + c.sum()).backward()
    assert all(p.grad is not None for p in m.parameters())
