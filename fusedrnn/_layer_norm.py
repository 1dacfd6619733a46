"""The layer-normalised LSTM and GRU (design.md §1.6): where a layer call runs, and the Python
side of their ops fusedrnn::layer_norm_{lstm,gru}_{forward,backward} (csrc/ops/schemas.cpp,
csrc/recurrence/layer_norm.cpp): fake kernels, autograd, autocast.

`run` is the one entry of fusedrnn.LayerNormLSTM / LayerNormGRU and their cells. CPU calls, and
CUDA calls where the extension has CUDA kernels, run the fused ops; calls on other devices,
inside a torch.func transform, with forward-mode dual tensors, during an ONNX export, or
without the compiled extension run the reference equations (fusedrnn.reference.layer_of with
the LayerNorm parameters): correct, not fused. (The CUDA kernels pass tests/test_cuda.py on an
H200, bench/results/nvidia-h200.)

Zoneout (design.md §1.7) is fused in these ops as in the plain cells': `run` takes the modules'
`keep` and passes the ops their zoneout_c / zoneout_h weights (with a projection, zoneout_h of
its width: the op zones h_t after the projection).

The ops' autograd is registered here with torch.library.register_autograd: one node per layer
call whose backward is the fused backward op; under create_graph=True (double backward) it
differentiates the reference equations instead, as the other cells' node does.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _layer, _ops, reference
from .reference import LayerArgs

# Per cell family: the op name, the number of LayerNorm tensors and the op's arguments after
# (input, weight_ih, weight_hh, bias_ih, bias_hh, *ln).
_OPS = {"lstm": "layer_norm_lstm", "gru": "layer_norm_gru"}
N_LN = {"lstm": 4, "gru": 2}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def workspace_row(cell: str, hidden_size: int, hidden_out: int, proj: bool) -> int:
    """Values per input row of the training workspace (recurrence/layer_norm.cpp's blocks)."""
    H = hidden_size
    if cell == "lstm":
        return 14 * H + hidden_out + (H if proj else 0) + 3
    return 10 * H + 2


def _rows(input: Tensor) -> int:
    return input.shape[0] * (input.shape[1] if input.dim() == 3 else 1)


def _register_fakes() -> None:
    @torch.library.register_fake("fusedrnn::layer_norm_lstm_forward")
    def _fake_lstm_forward(
        input, weight_ih, weight_hh, bias_ih, bias_hh, g_ih, g_hh, g_c, b_c, weight_hr, hx, cx,
        batch_sizes, reverse, need_workspace=True, zoneout_c=None, zoneout_h=None,
    ):  # fmt: skip
        _ops._check_fake_devices(
            "layer_norm_lstm_forward", input, batch_sizes, weight_ih=weight_ih,
            weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh, ln_weight_ih=g_ih,
            ln_weight_hh=g_hh, ln_weight_c=g_c, ln_bias_c=b_c, weight_hr=weight_hr, hx=hx, cx=cx,
            zoneout_c=zoneout_c, zoneout_h=zoneout_h,
        )  # fmt: skip
        H = weight_ih.shape[0] // 4
        H_out = weight_hr.shape[0] if weight_hr is not None else H
        B = _ops._batch(input, hx, batch_sizes)
        cols = workspace_row("lstm", H, H_out, weight_hr is not None)
        n = _rows(input) * cols if need_workspace else 0
        return (
            input.new_empty(*input.shape[:-1], H_out),
            input.new_empty(B, H_out),
            input.new_empty(B, H),
            input.new_empty(n, dtype=_acc_dtype(input.dtype)),
        )

    @torch.library.register_fake("fusedrnn::layer_norm_lstm_backward")
    def _fake_lstm_backward(
        grad_output, grad_hy, grad_cy, input, weight_ih, weight_hh, bias_ih, bias_hh, g_ih, g_hh,
        g_c, b_c, weight_hr, hx, cx, batch_sizes, reverse, workspace, output_mask, zoneout_c=None,
        zoneout_h=None,
    ):  # fmt: skip
        H = weight_ih.shape[0] // 4
        H_out = weight_hr.shape[0] if weight_hr is not None else H
        B = _ops._batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh, g_ih, g_hh, g_c, b_c, weight_hr]
        return (
            _ops._grad_like(input, output_mask[0], input),
            input.new_empty(B, H_out),
            input.new_empty(B, H),
            *(_ops._grad_like(w, output_mask[1], input) for w in weights),
        )

    @torch.library.register_fake("fusedrnn::layer_norm_gru_forward")
    def _fake_gru_forward(
        input, weight_ih, weight_hh, bias_ih, bias_hh, g_ih, g_hh, hx, batch_sizes, reverse,
        need_workspace=True, zoneout_h=None,
    ):  # fmt: skip
        _ops._check_fake_devices(
            "layer_norm_gru_forward", input, batch_sizes, weight_ih=weight_ih,
            weight_hh=weight_hh, bias_ih=bias_ih, bias_hh=bias_hh, ln_weight_ih=g_ih,
            ln_weight_hh=g_hh, hx=hx, zoneout_h=zoneout_h,
        )  # fmt: skip
        H = weight_ih.shape[0] // 3
        B = _ops._batch(input, hx, batch_sizes)
        n = _rows(input) * workspace_row("gru", H, H, False) if need_workspace else 0
        return (
            input.new_empty(*input.shape[:-1], H),
            input.new_empty(B, H),
            input.new_empty(n, dtype=_acc_dtype(input.dtype)),
        )

    @torch.library.register_fake("fusedrnn::layer_norm_gru_backward")
    def _fake_gru_backward(
        grad_output, grad_hy, input, weight_ih, weight_hh, bias_ih, bias_hh, g_ih, g_hh, hx,
        batch_sizes, reverse, workspace, output_mask, zoneout_h=None,
    ):  # fmt: skip
        H = weight_ih.shape[0] // 3
        B = _ops._batch(input, hx, batch_sizes)
        weights = [weight_ih, weight_hh, bias_ih, bias_hh, g_ih, g_hh]
        return (
            _ops._grad_like(input, output_mask[0], input),
            input.new_empty(B, H),
            *(_ops._grad_like(w, output_mask[1], input) for w in weights),
        )


# The forward ops' arguments, in order: the LSTM's and the GRU's tensors and where each sits in
# (LayerArgs' tensors + ln); batch_sizes, reverse and need_workspace follow, then zoneout's
# weights (zoneout_c, zoneout_h; the GRU zoneout_h).
_LSTM_TENSORS = 12  # input .. cx
_GRU_TENSORS = 8  # input .. hx
_ZONES = {"lstm": 2, "gru": 1}


def _op_args(cell: str, a: LayerArgs, ln: Tuple[Tensor, ...]) -> tuple:
    head = (a.input, a.weight_ih, a.weight_hh, a.bias_ih, a.bias_hh, *ln)
    if cell == "lstm":
        return (*head, a.weight_hr, a.hx, a.cx, a.batch_sizes, a.reverse)
    return (*head, a.hx, a.batch_sizes, a.reverse)


def _layer_args(cell: str, tensors) -> Tuple[LayerArgs, Tuple[Tensor, ...]]:
    """Inverse of _op_args over the op's tensor arguments (batch_sizes last, reverse apart)."""
    input, w_ih, w_hh, b_ih, b_hh = tensors[:5]
    if cell == "lstm":
        ln = tuple(tensors[5:9])
        w_hr, hx, cx = tensors[9:12]
        return LayerArgs(input, w_ih, w_hh, b_ih, b_hh, None, w_hr, hx, cx), ln
    ln = tuple(tensors[5:7])
    return LayerArgs(input, w_ih, w_hh, b_ih, b_hh, None, None, tensors[7]), ln


def _make_autograd(cell: str) -> None:
    n = _LSTM_TENSORS if cell == "lstm" else _GRU_TENSORS
    n_out = 3 if cell == "lstm" else 2  # differentiable outputs: output, hy[, cy]
    backward_op = getattr(torch.ops.fusedrnn, f"{_OPS[cell]}_backward").default

    n_zones = _ZONES[cell]

    def setup_context(ctx, inputs, output):
        tensors, batch_sizes, reverse = inputs[:n], inputs[n], inputs[n + 1]
        zones = (*inputs[n + 3 :], *(None,) * n_zones)[:n_zones]  # absent: None
        ctx.save_for_backward(*tensors, batch_sizes, output[-1], *zones)
        ctx.reverse = reverse
        ctx.mark_non_differentiable(output[-1])
        # An output with no gradient reaches the backward as None (the op takes each as optional),
        # not as zeros: materialised, the workspace's alone was a zero fill of its whole size,
        # ~100 MB at T=100, B=64, H=256, a tenth of the training pass.
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        tensors, batch_sizes, workspace = saved[:n], saved[n], saved[n + 1]
        zones = saved[n + 2 :]
        needs = ctx.needs_input_grad[:n]
        grads = grads[:n_out]
        none = (None,) * (3 + n_zones)  # batch_sizes, reverse, need_workspace, zoneout weights
        if torch.is_grad_enabled():  # create_graph=True: a differentiable graph
            return (*_differentiable_backward(cell, grads, tensors, batch_sizes, ctx.reverse,
                                              needs, zones), *none)  # fmt: skip
        if workspace.numel() == 0 and tensors[0].numel() > 0:
            raise RuntimeError(
                f"fusedrnn::{_OPS[cell]}_forward: the backward needs the workspace; call the op "
                "with need_workspace=True when a gradient is recorded"
            )
        mask = [bool(needs[0]), any(needs[1:])]
        out = backward_op(*grads, *tensors, batch_sizes, ctx.reverse, workspace, mask, *zones)
        if cell == "lstm":
            # out: grad_input, grad_hx, grad_cx, w_ih, w_hh, b_ih, b_hh, 4 ln, w_hr
            by_arg = (*out[:1], *out[3:11], out[11], out[1], out[2])
        else:
            # out: grad_input, grad_hx, w_ih, w_hh, b_ih, b_hh, 2 ln
            by_arg = (out[0], *out[2:8], out[1])
        result = tuple(g if need and t is not None else None
                       for g, need, t in zip(by_arg, needs, tensors))  # fmt: skip
        return (*result, *none)

    torch.library.register_autograd(
        f"fusedrnn::{_OPS[cell]}_forward", backward, setup_context=setup_context
    )


def _differentiable_backward(cell, grads, tensors, batch_sizes, reverse, needs, zones):
    """The first-order gradients as a differentiable graph (create_graph=True): the reference
    equations recomputed from the saved arguments (zoneout's weights `zones` included) and
    differentiated with create_graph=True."""
    wanted = [i for i, t in enumerate(tensors) if needs[i] and t is not None]
    result = [None] * len(tensors)
    if not wanted:
        return result
    a, ln = _layer_args(cell, tensors)
    a = a._replace(batch_sizes=batch_sizes, reverse=reverse)
    keep = None
    if zones[-1] is not None:
        keep = tuple(zones) if cell == "lstm" else (None, zones[0])
    outs = reference.layer_of(cell, a, ln, keep)
    _ops.reference_grads(outs, grads, tensors, wanted, result)
    return result


_FORWARD = {}
# The devices whose calls run the fused ops: the CPU, and CUDA where the extension has its kernels.
_DEVICES = ("cpu",)
if _ops.HAS_C:
    if torch._C._dispatch_has_kernel_for_dispatch_key("fusedrnn::layer_norm_lstm_forward", "CUDA"):
        _DEVICES = ("cpu", "cuda")
    _register_fakes()
    for _cell, _name in _OPS.items():
        _FORWARD[_cell] = getattr(torch.ops.fusedrnn, f"{_name}_forward").default
        _make_autograd(_cell)
        _ops._register_autocast(_ops._LIB, f"{_name}_forward")


def _reference(cell: str, a: LayerArgs, ln: Tuple[Tensor, ...], keep=None):
    if torch.onnx.is_in_onnx_export() and a.batch_sizes is not None:
        raise NotImplementedError(
            "fusedrnn: torch.onnx.export of a PackedSequence input is not supported; export "
            "the model with a padded (T, B, I) / (B, T, I) tensor input instead"
        )
    return reference.layer_of(cell, a, ln, keep)


def run(
    cell: str, a: LayerArgs, ln: Tuple[Tensor, ...], keep=None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer-normalised layer, one direction: (output, h_n, c_n), c_n None for the GRU.
    `cell` is the family ("lstm" or "gru"), `ln` its LayerNorm parameters in the op's order;
    `keep` zoneout's (keep_c, keep_h) as reference.layer_of takes them, or None."""
    if not _ops.HAS_C:
        _layer._warn_fallback()
        return reference.layer_of(cell, a, ln, keep)
    if a.input.device.type not in _DEVICES:
        return reference.layer_of(cell, a, ln, keep)
    staged = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if staged:
        if torch.onnx.is_in_onnx_export():
            return _reference(cell, a, ln, keep)
    elif _layer._needs_reference((*a.tensors, *ln)):
        return reference.layer_of(cell, a, ln, keep)
    need_workspace = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (*a.tensors, *ln)
    )
    zone_c = zone_h = None
    if keep is not None:
        zone_c, zone_h = _layer._zone_weights(cell, a, keep)
    zones = (zone_c, zone_h) if cell == "lstm" else (zone_h,)
    res = _FORWARD[cell](*_op_args(cell, a, ln), need_workspace, *zones)
    if cell == "lstm":
        return res[0], res[1], res[2]
    return res[0], res[1], None
