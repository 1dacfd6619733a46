"""Where a layer call runs: the one place that chooses between the fused ops and the reference.

`run` is the single entry of the modules and of `fusedrnn.functional`. It runs one layer in
one direction through the fused ops (`fusedrnn._ops`) when the compiled extension is loaded,
and through the differentiable reference equations (`fusedrnn.reference`) where the fused ops
cannot serve the call: no compiled extension (after one warning naming why), inside a
torch.func transform or with forward-mode AD dual tensors (the ops have a reverse-mode
derivative only), and while torch.onnx exports (`fusedrnn._onnx`).
"""

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _ops, reference
from . import cells as _cells
from .reference import LayerArgs

_warned = False


def backend() -> str:
    """'fused' when the compiled operators are in use, 'reference' otherwise."""
    return "fused" if _ops.HAS_C else "reference"


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "fusedrnn: the compiled extension fusedrnn._C could not be loaded "
            f"({_ops.LOAD_ERROR}); using the pure-PyTorch reference implementation, which is "
            "slower. Reinstall with `pip install --no-build-isolation .` against the installed "
            "torch.",
            RuntimeWarning,
            stacklevel=3,
        )


def _needs_reference(tensors) -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, jacfwd, ...) or when an argument is
    a forward-mode AD dual tensor. The fused ops have a reverse-mode derivative only; these
    run the differentiable reference equations instead (correct, not fused)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        from torch.autograd.forward_ad import unpack_dual

        return any(t is not None and unpack_dual(t).tangent is not None for t in tensors)
    return False


# The cells whose ops zone their states: every one, projected LSTMs included (their h_t is zoned
# after the projection, design.md §1.7).
ZONED_CELLS = ("lstm", "peephole_lstm", "wm_lstm", "gru")


def _zone_weights(cell: str, a: LayerArgs, keep) -> Tuple[Optional[Tensor], Tensor]:
    """The ops' zoneout arguments (zoneout_c, zoneout_h) from `keep` (see
    reference.layer_of): a mask as weights of the input's dtype, a rate as one row of it, an
    unzoned state of an LSTM-family cell as a row of zeros; zoneout_c None for the GRU. The
    hidden state's row has the projection's width where there is one."""
    spec = _cells.get(cell)
    H = a.weight_ih.shape[0] // spec.gates
    H_out = a.weight_hr.shape[0] if a.weight_hr is not None else H

    def weights(k, width: int) -> Tensor:
        if isinstance(k, Tensor):
            return k.to(a.input.dtype)
        return a.input.new_full((1, width), float(k or 0.0))

    return (weights(keep[0], H) if spec.has_cell_state else None), weights(keep[1], H_out)


def run(
    cell: str, a: LayerArgs, exposed: bool = True, keep=None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction: (output, h_n, c_n), c_n None for a cell without a cell state.

    `exposed`: the output is handed to the caller as it is (not only to another layer): when
    the op recorded an autograd node, the output is then a copy of the tensor the backward
    saves, so that an in-place operation on it (relu_) does not invalidate the backward, as
    with torch.nn.

    `keep`: zoneout's (keep_c, keep_h) as reference.layer_of takes them, for a cell of
    ZONED_CELLS; None without zoneout."""
    if not _ops.HAS_C:
        _warn_fallback()
        return reference.layer_of(cell, a, keep=keep)
    tracing = torch.jit.is_tracing()
    # An ONNX export runs under torch.jit.trace (the TorchScript exporter) or torch.export
    # (dynamo=True, where torch.compiler.is_compiling() holds): eager calls skip the check.
    staged = tracing or torch.compiler.is_compiling()
    if staged:
        if torch.onnx.is_in_onnx_export():
            if keep is not None:  # the ONNX RNN operators have no zoneout
                return reference.layer_of(cell, a, keep=keep)
            from . import _onnx

            return _onnx.layer(cell, a)
    elif _needs_reference(a.tensors):
        return reference.layer_of(cell, a, keep=keep)
    # One op call, eager or staged: its autograd (a C++ node, csrc/ops/autograd.cpp) keeps
    # the workspace the backward reads exactly when it records a node.
    zone = _zone_weights(cell, a, keep) if keep is not None else None
    out, hy, cy = _ops.forward(cell, a, zone=zone)
    if exposed:
        if tracing:
            # A trace is one graph for every grad mode (torch.jit.trace checks it under
            # no_grad, and the op decides again on every replay): the output is always a copy.
            out = out.clone()
        elif staged:
            if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in a.tensors
            ):
                out = out.clone()
        elif out.requires_grad:
            out = out.clone()
    return out, hy, cy
