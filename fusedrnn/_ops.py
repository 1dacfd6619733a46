"""Loading of the compiled operators, their fake (meta) implementations and their autograd.

`layer()` is the single entry of the modules and of `fusedrnn.functional`: it runs one layer in
one direction through the fused ops when `fusedrnn._C` is loaded, or through
`fusedrnn.reference` otherwise (after one warning naming why the extension is missing).
"""
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference

LOAD_ERROR: Optional[str] = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.fusedrnn.*)
except Exception as exc:  # any failure to load means: use the reference path
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

HAS_C = LOAD_ERROR is None
if HAS_C:
    # The CPU kernels' instruction set is chosen now, so that a FUSEDRNN_CPU_ISA this CPU lacks
    # (or a misspelt one) is a ValueError at import, not a fallback or a crash later.
    torch.ops.fusedrnn.cpu_isa()
_warned = False

LSTM_FAMILY = ("lstm", "peephole_lstm", "wm_lstm")


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "fusedrnn: the compiled extension fusedrnn._C could not be loaded "
            f"({LOAD_ERROR}); using the pure-PyTorch reference implementation, which is slower. "
            "Reinstall with `pip install --no-build-isolation .` against the installed torch.",
            RuntimeWarning, stacklevel=3)


def backend() -> str:
    """'fused' when the compiled operators are in use, 'reference' otherwise."""
    return "fused" if HAS_C else "reference"


def _lstm_dims(input, weight_ih, weight_ch, weight_hr, cell):
    H = weight_ih.shape[0] // 4
    H_out = weight_hr.shape[0] if weight_hr is not None else H
    cols = 5 * H + (H if weight_hr is not None else 0) + (3 * H if cell == "wm_lstm" else 0)
    return H, H_out, cols


def _check_fake_devices(op: str, input: Tensor, batch_sizes: Optional[Tensor], **tensors):
    """The real kernels reject arguments on another device than `input`; the fake (meta)
    implementations must too, or a meta argument would make the dispatcher run the fake kernel
    on real tensors and return uninitialised memory."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"fusedrnn::{op}: {name} must be on the device of input "
                               f"({input.device}), got {t.device}")
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError(f"fusedrnn::{op}: batch_sizes must be a CPU tensor, got "
                           f"{batch_sizes.device}")


def _batch(input: Tensor, hx: Optional[Tensor], batch_sizes: Optional[Tensor]):
    if hx is not None:
        return hx.shape[0]
    if batch_sizes is None:
        return input.shape[1]
    return torch.library.get_ctx().new_dynamic_size()


def _grad_like(t: Optional[Tensor], computed: bool, like: Tensor) -> Tensor:
    """Fake gradient of `t`: its shape when computed and `t` is given, else empty (0,) with the
    dtype and device of `like` (the op's input), as the real op returns."""
    if t is None or not computed:
        return like.new_empty(0)
    return torch.empty_like(t)


def _differentiable_grads(cell, tensors, batch_sizes, reverse, grad_outputs, needs):
    """First-order gradients as a differentiable graph, for double backward (create_graph=True).

    The fused backward op has no derivative of its own; here the layer is recomputed with the
    reference equations from the saved inputs and differentiated with create_graph=True, so
    that gradients of gradients (gradgradcheck, gradient penalties) work. `tensors` are the
    layer's (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx, cx).
    """
    wanted = [i for i, (t, n) in enumerate(zip(tensors, needs)) if n and t is not None]
    with torch.enable_grad():
        outs = reference.layer(cell, *tensors, batch_sizes, reverse)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o is not None and g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], [tensors[i] for i in wanted],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
    result = [None] * len(tensors)
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(tensors[i])
    return result


def _register(cell: str) -> None:
    fwd = f"fusedrnn::{cell}_forward"
    bwd_op = getattr(torch.ops.fusedrnn, f"{cell}_backward")

    @torch.library.register_fake(fwd)
    def _fake_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx,
                      cx, batch_sizes, reverse, need_workspace=True):
        _check_fake_devices(f"{cell}_forward", input, batch_sizes, weight_ih=weight_ih,
                            weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                            weight_ch=weight_ch, weight_hr=weight_hr, hx=hx, cx=cx)
        H, H_out, cols = _lstm_dims(input, weight_ih, weight_ch, weight_hr, cell)
        B = _batch(input, hx, batch_sizes)
        N = input.numel() // input.shape[-1] if input.shape[-1] != 0 else (
            input.shape[0] * (input.shape[1] if input.dim() == 3 else 1))
        output = input.new_empty(*input.shape[:-1], H_out)
        return (output, input.new_empty(B, H_out), input.new_empty(B, H),
                input.new_empty(N * cols if need_workspace else 0))

    @torch.library.register_fake(f"fusedrnn::{cell}_backward")
    def _fake_backward(grad_output, grad_hy, grad_cy, input, weight_ih, weight_hh, bias_ih,
                       bias_hh, weight_ch, weight_hr, hx, cx, batch_sizes, reverse, output,
                       workspace, output_mask):
        _check_fake_devices(f"{cell}_backward", input, batch_sizes, grad_output=grad_output,
                            grad_hy=grad_hy, grad_cy=grad_cy, weight_ih=weight_ih,
                            weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh,
                            weight_ch=weight_ch, weight_hr=weight_hr, hx=hx, cx=cx,
                            output=output, workspace=workspace)
        H, H_out, _ = _lstm_dims(input, weight_ih, weight_ch, weight_hr, cell)
        B = _batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr]
        return (_grad_like(input, output_mask[0], input), input.new_empty(B, H_out),
                input.new_empty(B, H), *(_grad_like(w, output_mask[1], input) for w in weights))

    def setup_context(ctx, inputs, output):
        (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx, cx,
         batch_sizes, reverse, *_) = inputs
        out, _, _, workspace = output
        ctx.save_for_backward(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                              weight_hr, hx, cx, batch_sizes, out, workspace)
        ctx.reverse = reverse
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_output, grad_hy, grad_cy, _grad_workspace):
        (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx, cx,
         batch_sizes, out, workspace) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            g = _differentiable_grads(
                cell, (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx,
                       cx), batch_sizes, ctx.reverse, (grad_output, grad_hy, grad_cy),
                ctx.needs_input_grad[:9])
            return (*g, None, None, None)
        mask = [ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:7])]
        (g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_ch, g_w_hr) = bwd_op(
            grad_output, grad_hy, grad_cy, input, weight_ih, weight_hh, bias_ih, bias_hh,
            weight_ch, weight_hr, hx, cx, batch_sizes, ctx.reverse, out, workspace, mask)
        n = ctx.needs_input_grad
        return (g_input if n[0] else None, g_w_ih if n[1] else None, g_w_hh if n[2] else None,
                g_b_ih if n[3] else None, g_b_hh if n[4] else None, g_w_ch if n[5] else None,
                g_w_hr if n[6] else None, g_hx if n[7] else None, g_cx if n[8] else None,
                None, None, None)

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _register_gru() -> None:
    bwd_op = torch.ops.fusedrnn.gru_backward

    @torch.library.register_fake("fusedrnn::gru_forward")
    def _fake_forward(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes, reverse,
                      need_workspace=True):
        _check_fake_devices("gru_forward", input, batch_sizes, weight_ih=weight_ih,
                            weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh, hx=hx)
        H = weight_ih.shape[0] // 3
        B = _batch(input, hx, batch_sizes)
        N = input.shape[0] * (input.shape[1] if input.dim() == 3 else 1)
        return (input.new_empty(*input.shape[:-1], H), input.new_empty(B, H),
                input.new_empty(N if need_workspace else 0, 4 * H))

    @torch.library.register_fake("fusedrnn::gru_backward")
    def _fake_backward(grad_output, grad_hy, input, weight_ih, weight_hh, bias_ih, bias_hh, hx,
                       batch_sizes, reverse, output, workspace, output_mask):
        _check_fake_devices("gru_backward", input, batch_sizes, grad_output=grad_output,
                            grad_hy=grad_hy, weight_ih=weight_ih, weight_hh=weight_hh,
                            bias_ih=bias_ih, bias_hh=bias_hh, hx=hx, output=output,
                            workspace=workspace)
        H = weight_ih.shape[0] // 3
        B = _batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh]
        return (_grad_like(input, output_mask[0], input), input.new_empty(B, H),
                *(_grad_like(w, output_mask[1], input) for w in weights))

    def setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes, reverse, *_ = inputs
        out, _, workspace = output
        ctx.save_for_backward(input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes, out,
                              workspace)
        ctx.reverse = reverse
        ctx.mark_non_differentiable(workspace)
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_output, grad_hy, _grad_workspace):
        (input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes, out,
         workspace) = ctx.saved_tensors
        n = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            g = _differentiable_grads(
                "gru", (input, weight_ih, weight_hh, bias_ih, bias_hh, None, None, hx, None),
                batch_sizes, ctx.reverse, (grad_output, grad_hy, None),
                (*n[:5], False, False, n[5], False))
            return (*g[:5], g[7], None, None, None)
        mask = [n[0], any(n[1:5])]
        g_input, g_hx, g_w_ih, g_w_hh, g_b_ih, g_b_hh = bwd_op(
            grad_output, grad_hy, input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes,
            ctx.reverse, out, workspace, mask)
        return (g_input if n[0] else None, g_w_ih if n[1] else None, g_w_hh if n[2] else None,
                g_b_ih if n[3] else None, g_b_hh if n[4] else None, g_hx if n[5] else None,
                None, None, None)

    torch.library.register_autograd("fusedrnn::gru_forward", backward,
                                    setup_context=setup_context)


if HAS_C:
    for _cell in LSTM_FAMILY:
        _register(_cell)
    _register_gru()


def layer(cell: str, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
          bias_ih: Optional[Tensor] = None, bias_hh: Optional[Tensor] = None,
          weight_ch: Optional[Tensor] = None, weight_hr: Optional[Tensor] = None,
          hx: Optional[Tensor] = None, cx: Optional[Tensor] = None,
          batch_sizes: Optional[Tensor] = None, reverse: bool = False
          ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction: (output, h_n, c_n), c_n None for the GRU (see reference.layer)."""
    if not HAS_C:
        _warn_fallback()
        return reference.layer(cell, input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch,
                               weight_hr, hx, cx, batch_sizes, reverse)
    # The workspace (what backward reads) is only kept when a gradient can be asked for.
    need_workspace = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx, cx))
    if cell == "gru":
        out, hy, _ = torch.ops.fusedrnn.gru_forward(input, weight_ih, weight_hh, bias_ih,
                                                    bias_hh, hx, batch_sizes, reverse,
                                                    need_workspace)
        return out, hy, None
    op = getattr(torch.ops.fusedrnn, f"{cell}_forward")
    out, hy, cy, _ = op(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx,
                        cx, batch_sizes, reverse, need_workspace)
    return out, hy, cy
