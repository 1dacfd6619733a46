"""The Python side of the compiled operators, the mirror of csrc/ops/schemas.cpp: loading
`fusedrnn._C` (which registers torch.ops.fusedrnn.*), the ops' fake (meta) kernels, their
autocast kernels, the kernel of `_differentiable_backward` (double backward) and `forward`, the
call of a cell's forward op. The ops' autograd is a C++ node (csrc/ops/autograd.cpp), the
same for eager, compiled, exported and traced calls. Which calls take the ops and which the
reference is decided in fusedrnn._layer.
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
    reference.MASK_OP = torch.ops.fusedrnn.zoneout_mask.default

    @torch.library.register_fake("fusedrnn::zoneout_mask")
    def _fake_zoneout_mask(rows, width, p, seed, dtype=None):
        return seed.new_empty((rows, width), dtype=dtype if dtype is not None else torch.bool)


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
            raise RuntimeError(
                f"fusedrnn::{op}: {name} must be on the device of input "
                f"({input.device}), got {t.device}"
            )
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError(
            f"fusedrnn::{op}: batch_sizes must be a CPU tensor, got {batch_sizes.device}"
        )


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


def _differentiable_backward(cell: str, grads, args, reverse: bool, needs):
    """Kernel of fusedrnn::_differentiable_backward (CompositeImplicitAutograd): the first-order
    gradients of a layer as a differentiable graph, for a backward with create_graph=True
    (gradients of gradients, gradgradcheck, gradient penalties).

    The fused backward op has no derivative of its own; the node of csrc/ops/autograd.cpp
    calls this op instead when grad mode is on during its backward. The layer is recomputed
    with the reference equations from the saved arguments (`args`: the forward op's tensor
    arguments, batch_sizes and then its zoneout weights last) and differentiated with
    create_graph=True against `grads` (the gradients of its differentiable outputs). One
    gradient per entry of `needs`: zeros for an argument the outputs do not depend on, as the
    fused backward gives; empty where `needs` is false."""
    if cells.CELLS[cell].has_cell_state:
        position = list(range(9))  # the op's arguments are LayerArgs' first nine
        keep = (*args[10:12], None, None)[:2]  # zoneout_c, zoneout_h (absent: None)
    else:  # (input, weight_ih, weight_hh, bias_ih, bias_hh, hx): no weight_ch, weight_hr, cx
        position = [0, 1, 2, 3, 4, 7]
        keep = (None, args[7] if len(args) > 7 else None)  # zoneout_h
    tensors = [None] * 9
    for i, p in enumerate(position):
        tensors[p] = args[i]
    wanted = [i for i, n in enumerate(needs) if n and args[i] is not None]
    result = [args[0].new_empty(0) for _ in needs]
    if not wanted:
        return result
    batch_sizes = args[len(position)]
    with torch.enable_grad():
        a = reference.LayerArgs(*tensors, batch_sizes, reverse)
        outs = reference.layer_of(cell, a, keep=keep if keep[1] is not None else None)
        reference_grads(outs, grads, args, wanted, result)
    return result


def reference_grads(outs, grads, args, wanted, result) -> None:
    """result[i] = d(outs · grads)/d args[i] for i in `wanted`, as a differentiable graph
    (create_graph=True): zeros for an argument the outputs do not depend on, as the fused
    backward gives. The double backward of every op family: `outs` are its layer recomputed
    with the reference equations."""
    pairs = [(o, g) for o, g in zip(outs, grads) if o is not None and g is not None]
    got = torch.autograd.grad(
        [o for o, _ in pairs],
        [args[i] for i in wanted],
        [g for _, g in pairs],
        create_graph=True,
        allow_unused=True,
    )
    for i, g in zip(wanted, got):
        result[i] = g if g is not None else torch.zeros_like(args[i])


def _register_fakes(cell: str) -> None:
    """The fake (meta) kernels of the forward and backward ops of an LSTM-family cell."""
    fwd = f"fusedrnn::{cell}_forward"

    @torch.library.register_fake(fwd)
    def _fake_forward(
        input,
        weight_ih,
        weight_hh,
        bias_ih,
        bias_hh,
        weight_ch,
        weight_hr,
        hx,
        cx,
        batch_sizes,
        reverse,
        need_workspace=True,
        zoneout_c=None,
        zoneout_h=None,
    ):
        _check_fake_devices(
            f"{cell}_forward",
            input,
            batch_sizes,
            weight_ih=weight_ih,
            weight_hh=weight_hh,
            bias_ih=bias_ih,
            bias_hh=bias_hh,
            weight_ch=weight_ch,
            weight_hr=weight_hr,
            hx=hx,
            cx=cx,
            zoneout_c=zoneout_c,
            zoneout_h=zoneout_h,
        )
        H, H_out, cols = _lstm_dims(weight_ih, weight_hr, cell)
        B = _batch(input, hx, batch_sizes)
        N = (
            input.numel() // input.shape[-1]
            if input.shape[-1] != 0
            else (input.shape[0] * (input.shape[1] if input.dim() == 3 else 1))
        )
        output = input.new_empty(*input.shape[:-1], H_out)
        return (
            output,
            input.new_empty(B, H_out),
            input.new_empty(B, H),
            input.new_empty(N * cols if need_workspace else 0),
        )

    @torch.library.register_fake(f"fusedrnn::{cell}_backward")
    def _fake_backward(
        grad_output,
        grad_hy,
        grad_cy,
        input,
        weight_ih,
        weight_hh,
        bias_ih,
        bias_hh,
        weight_ch,
        weight_hr,
        hx,
        cx,
        batch_sizes,
        reverse,
        output,
        workspace,
        output_mask,
        zoneout_c=None,
        zoneout_h=None,
    ):
        _check_fake_devices(
            f"{cell}_backward",
            input,
            batch_sizes,
            zoneout_c=zoneout_c,
            zoneout_h=zoneout_h,
            grad_output=grad_output,
            grad_hy=grad_hy,
            grad_cy=grad_cy,
            weight_ih=weight_ih,
            weight_hh=weight_hh,
            bias_ih=bias_ih,
            bias_hh=bias_hh,
            weight_ch=weight_ch,
            weight_hr=weight_hr,
            hx=hx,
            cx=cx,
            output=output,
            workspace=workspace,
        )
        H, H_out, _ = _lstm_dims(weight_ih, weight_hr, cell)
        B = _batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr]
        return (
            _grad_like(input, output_mask[0], input),
            input.new_empty(B, H_out),
            input.new_empty(B, H),
            *(_grad_like(w, output_mask[1], input) for w in weights),
        )


def _register_fakes_hidden_only(cell: str) -> None:
    """The fake (meta) kernels of the forward and backward ops of a cell without a cell state
    (the GRU family)."""

    @torch.library.register_fake(f"fusedrnn::{cell}_forward")
    def _fake_forward(
        input,
        weight_ih,
        weight_hh,
        bias_ih,
        bias_hh,
        hx,
        batch_sizes,
        reverse,
        need_workspace=True,
        zoneout_h=None,
    ):
        _check_fake_devices(
            f"{cell}_forward",
            input,
            batch_sizes,
            zoneout_h=zoneout_h,
            weight_ih=weight_ih,
            weight_hh=weight_hh,
            bias_ih=bias_ih,
            bias_hh=bias_hh,
            hx=hx,
        )
        H = weight_ih.shape[0] // cells.CELLS[cell].gates
        B = _batch(input, hx, batch_sizes)
        N = input.shape[0] * (input.shape[1] if input.dim() == 3 else 1)
        return (
            input.new_empty(*input.shape[:-1], H),
            input.new_empty(B, H),
            input.new_empty(N if need_workspace else 0, cells.CELLS[cell].workspace_row(H, False)),
        )

    @torch.library.register_fake(f"fusedrnn::{cell}_backward")
    def _fake_backward(
        grad_output,
        grad_hy,
        input,
        weight_ih,
        weight_hh,
        bias_ih,
        bias_hh,
        hx,
        batch_sizes,
        reverse,
        output,
        workspace,
        output_mask,
        zoneout_h=None,
    ):
        _check_fake_devices(
            f"{cell}_backward",
            input,
            batch_sizes,
            zoneout_h=zoneout_h,
            grad_output=grad_output,
            grad_hy=grad_hy,
            weight_ih=weight_ih,
            weight_hh=weight_hh,
            bias_ih=bias_ih,
            bias_hh=bias_hh,
            hx=hx,
            output=output,
            workspace=workspace,
        )
        H = weight_ih.shape[0] // cells.CELLS[cell].gates
        B = _batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh]
        return (
            _grad_like(input, output_mask[0], input),
            input.new_empty(B, H),
            *(_grad_like(w, output_mask[1], input) for w in weights),
        )


def _autocast_eligible(t, device_type: str) -> bool:
    # torch.autocast's own rule: floating-point tensors on the autocast device, float64 excluded
    return (
        isinstance(t, Tensor)
        and t.is_floating_point()
        and t.dtype != torch.float64
        and t.device.type == device_type
    )


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
            args = tuple(a.to(dtype) if _autocast_eligible(a, _device_type) else a for a in args)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(_py_impl)  # the Python dispatcher (torch.compile's tracing)
        lib.impl(opname, lambda _keyset, *args, _f=_py_impl: _f(*args), key_name, with_keyset=True)


_LIB = None
_FORWARD_OPS = {}  # cell name -> its forward op (the default overload), looked up once
_HAS_CELL_STATE = {name: c.has_cell_state for name, c in cells.CELLS.items()}
if HAS_C:
    _FORWARD_OPS = {
        name: getattr(torch.ops.fusedrnn, f"{name}_forward").default for name in cells.CELLS
    }
    for _name, _c in cells.CELLS.items():
        (_register_fakes if _c.has_cell_state else _register_fakes_hidden_only)(_name)
    _LIB = torch.library.Library("fusedrnn", "IMPL")
    _LIB.impl("_differentiable_backward", _differentiable_backward, "CompositeImplicitAutograd")
    for _name in cells.CELLS:
        _register_autocast(_LIB, f"{_name}_forward")


def forward(
    cell: str, a: reference.LayerArgs, need_workspace: bool = False, zone=None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(output, h_n, c_n) of the forward op of `cell` (c_n None for a cell without a cell
    state). Its autograd (csrc/ops/autograd.cpp) records a node, and keeps the workspace the
    backward reads, when grad mode is on and an argument requires a gradient; `need_workspace`
    asks for the workspace without a node too (the tests of the ops). `zone`: the op's zoneout
    weights (zoneout_c, zoneout_h), zoneout_c None for a cell without a cell state."""
    zone_c, zone_h = zone if zone is not None else (None, None)
    if _HAS_CELL_STATE[cell]:
        out, hy, cy, _ = _FORWARD_OPS[cell](*a, need_workspace, zone_c, zone_h)
        return out, hy, cy
    out, hy, _ = _FORWARD_OPS[cell](
        a.input,
        a.weight_ih,
        a.weight_hh,
        a.bias_ih,
        a.bias_hh,
        a.hx,
        a.batch_sizes,
        a.reverse,
        need_workspace,
        zone_h,
    )
    return out, hy, None
