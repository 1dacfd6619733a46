"""The Python side of the compiled operators, the mirror of csrc/ops.cpp: loading
`fusedrnn._C` (which registers torch.ops.fusedrnn.*), the ops' fake (meta) kernels, their
autograd and autocast kernels, and `forward`, the call of a cell's forward op. Which calls take
the ops and which the reference is decided in fusedrnn._layer.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cells, reference

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
LSTM_FAMILY = cells.LSTM_FAMILY


def _lstm_dims(weight_ih, weight_hr, cell):
    """(H, H_out, workspace values per input row) of an LSTM-family op call."""
    H = weight_ih.shape[0] // cells.CELLS[cell].gates
    H_out = weight_hr.shape[0] if weight_hr is not None else H
    return H, H_out, cells.CELLS[cell].workspace_row(H, weight_hr is not None)


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
    dtype and device of `like` (the op's input), as the real op returns. The real kernels
    return contiguous gradients whatever the strides of `t` (a batch_first input is a
    transposed view), so the fake ones are contiguous too: inductor checks the strides."""
    if t is None or not computed:
        return like.new_empty(0)
    return like.new_empty(t.shape)


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
        H, H_out, cols = _lstm_dims(weight_ih, weight_hr, cell)
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
        H, H_out, _ = _lstm_dims(weight_ih, weight_hr, cell)
        B = _batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr]
        return (_grad_like(input, output_mask[0], input), input.new_empty(B, H_out),
                input.new_empty(B, H), *(_grad_like(w, output_mask[1], input) for w in weights))

    def setup_context(ctx, inputs, output):
        (input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx, cx,
         batch_sizes, reverse, *rest) = inputs
        out, _, _, workspace = output
        ctx.recompute = bool(rest) and not rest[0]  # need_workspace=False: see backward
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
        if ctx.recompute:
            # The forward ran without a workspace although a gradient is asked for (e.g. a
            # torch.jit.trace recorded under no_grad, replayed with grad): recompute it.
            out, _, _, workspace = getattr(torch.ops.fusedrnn, f"{cell}_forward")(
                input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx, cx,
                batch_sizes, ctx.reverse, True)
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
        H = weight_ih.shape[0] // cells.CELLS["gru"].gates
        B = _batch(input, hx, batch_sizes)
        N = input.shape[0] * (input.shape[1] if input.dim() == 3 else 1)
        return (input.new_empty(*input.shape[:-1], H), input.new_empty(B, H),
                input.new_empty(N if need_workspace else 0,
                                cells.CELLS["gru"].workspace_row(H, False)))

    @torch.library.register_fake("fusedrnn::gru_backward")
    def _fake_backward(grad_output, grad_hy, input, weight_ih, weight_hh, bias_ih, bias_hh, hx,
                       batch_sizes, reverse, output, workspace, output_mask):
        _check_fake_devices("gru_backward", input, batch_sizes, grad_output=grad_output,
                            grad_hy=grad_hy, weight_ih=weight_ih, weight_hh=weight_hh,
                            bias_ih=bias_ih, bias_hh=bias_hh, hx=hx, output=output,
                            workspace=workspace)
        H = weight_ih.shape[0] // cells.CELLS["gru"].gates
        B = _batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh]
        return (_grad_like(input, output_mask[0], input), input.new_empty(B, H),
                *(_grad_like(w, output_mask[1], input) for w in weights))

    def setup_context(ctx, inputs, output):
        input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes, reverse, *rest = inputs
        out, _, workspace = output
        ctx.recompute = bool(rest) and not rest[0]  # need_workspace=False: see backward
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
        if ctx.recompute:  # no workspace kept by the forward (see the LSTM family's backward)
            out, _, workspace = torch.ops.fusedrnn.gru_forward(
                input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes, ctx.reverse, True)
        mask = [n[0], any(n[1:5])]
        g_input, g_hx, g_w_ih, g_w_hh, g_b_ih, g_b_hh = bwd_op(
            grad_output, grad_hy, input, weight_ih, weight_hh, bias_ih, bias_hh, hx, batch_sizes,
            ctx.reverse, out, workspace, mask)
        return (g_input if n[0] else None, g_w_ih if n[1] else None, g_w_hh if n[2] else None,
                g_b_ih if n[3] else None, g_b_hh if n[4] else None, g_hx if n[5] else None,
                None, None, None)

    torch.library.register_autograd("fusedrnn::gru_forward", backward,
                                    setup_context=setup_context)


def _autocast_eligible(t, device_type: str) -> bool:
    # torch.autocast's own rule: floating-point tensors on the autocast device, float64 excluded
    return (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.device.type == device_type)


def _register_autocast(lib, opname: str) -> None:
    """Autocast kernels of a forward op on CPU and CUDA: the floating-point tensor arguments
    are cast to the autocast dtype of the device (CPU: bfloat16 by default, CUDA: float16 or
    bfloat16), so that the op runs in that dtype as torch.nn's RNNs do under autocast; the
    casts are differentiable, so the float32 parameters get float32 gradients."""
    op = getattr(torch.ops.fusedrnn, opname).default
    for device_type in ("cpu", "cuda"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def _py_impl(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            args = tuple(a.to(dtype) if _autocast_eligible(a, _device_type) else a
                         for a in args)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(_py_impl)  # the Python dispatcher (torch.compile's tracing)
        lib.impl(opname, lambda _keyset, *args, _f=_py_impl: _f(*args), key_name,
                 with_keyset=True)


_LIB = None
_FORWARD_OPS = {}  # cell name -> its forward op, looked up once
_EAGER_OPS = {}  # cell name -> its eager op (csrc/driver/eager.cpp)
if HAS_C:
    _FORWARD_OPS = {name: getattr(torch.ops.fusedrnn, f"{name}_forward") for name in cells.CELLS}
    _EAGER_OPS = {name: getattr(torch.ops.fusedrnn, f"_{name}_eager").default
                  for name in cells.CELLS}
    for _cell in LSTM_FAMILY:
        _register(_cell)
    _register_gru()
    _LIB = torch.library.Library("fusedrnn", "IMPL")
    for _cell in LSTM_FAMILY + ("gru",):
        _register_autocast(_LIB, f"{_cell}_forward")


_PLAIN = (type(None), Tensor, torch.nn.Parameter)


def eager_ok(a: reference.LayerArgs) -> bool:
    """Whether an eager call (not under torch.compile / export or torch.jit.trace: the caller
    knows) may take the eager op, whose autograd is a C++ node (csrc/driver/eager.cpp) rather
    than the forward op's registered (Python) autograd kernel: plain tensors, no autocast (its
    kernels run above autograd and cast the arguments the op then saves), no torch function
    mode. Tensor subclasses (FakeTensor, DTensor, ...) call the op as registered."""
    return (not torch._C._is_torch_function_mode_enabled()
            and not torch._C._is_any_autocast_enabled()
            and all(type(t) in _PLAIN for t in a.tensors))


def eager_forward(cell: str, a: reference.LayerArgs, exposed: bool
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(output, h_n, c_n) of an eager call (eager_ok) through the eager op of `cell`: one op
    call; it records a C++ autograd node when a gradient can be asked for, and then, if
    `exposed`, returns the output as a copy of what the backward saves (fusedrnn._layer.run)."""
    if cell == "gru":
        out, hy = _EAGER_OPS[cell](a.input, a.weight_ih, a.weight_hh, a.bias_ih, a.bias_hh, a.hx,
                                   a.batch_sizes, a.reverse, exposed)
        return out, hy, None
    return _EAGER_OPS[cell](*a, exposed)


def forward(cell: str, a: reference.LayerArgs, need_workspace: bool, eager: bool = False
            ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(output, h_n, c_n) of the forward op of `cell` (c_n None for the GRU).

    `need_workspace` is True exactly when a gradient can be asked for (fusedrnn._layer.run).
    `eager`: the call is not staged (torch.compile / export, torch.jit.trace); then, where
    eager_ok allows, it runs through the eager op (which applies the same rule for the
    workspace itself); elsewhere through the op as registered."""
    if eager and eager_ok(a):
        return eager_forward(cell, a, exposed=False)
    op = _FORWARD_OPS[cell]
    args = ((a.input, a.weight_ih, a.weight_hh, a.bias_ih, a.bias_hh, a.hx, a.batch_sizes,
             a.reverse, need_workspace) if cell == "gru" else (*a, need_workspace))
    result = op(*args)
    if cell == "gru":
        return result[0], result[1], None
    return result[0], result[1], result[2]
