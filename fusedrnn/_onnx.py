"""What one fused layer becomes under torch.onnx.export(..., dynamo=True).

`_layer.run` calls `layer` here while torch.onnx exports (torch.onnx.is_in_onnx_export()):
the LSTM (without projection), the peephole LSTM and the GRU become ONNX's own LSTM / GRU
operators (torch.onnx.ops.symbolic_multi_out records them in the exported graph), with the
weights rearranged into ONNX's layout; the working-memory LSTM and the LSTM with a projection,
which ONNX's LSTM cannot express, are recorded as the reference equations, i.e. standard
operators, one step after the other (the sequence length is then fixed at export).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import cells, reference


def _reorder(t: Optional[Tensor], order) -> Optional[Tensor]:
    """Gate blocks of a (G*H, ...) weight or (G*H,) bias in another order."""
    if t is None:
        return None
    blocks = t.chunk(len(order), 0)
    return torch.cat([blocks[i] for i in order], 0)


def _onnx_bias(b_ih, b_hh, order, like: Tensor, rows: int) -> Optional[Tensor]:
    if b_ih is None and b_hh is None:
        return None  # ONNX's default: zeros
    b_ih = _reorder(b_ih, order) if b_ih is not None else like.new_zeros(rows)
    b_hh = _reorder(b_hh, order) if b_hh is not None else like.new_zeros(rows)
    return torch.cat([b_ih, b_hh]).unsqueeze(0)  # (1, 2*G*H): [Wb, Rb]


def layer(cell: str, a: reference.LayerArgs) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    (
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
    ) = a
    if batch_sizes is not None:
        raise NotImplementedError(
            "fusedrnn: torch.onnx.export of a PackedSequence input is not supported; export "
            "the model with a padded (T, B, I) / (B, T, I) tensor input instead"
        )
    spec = cells.CELLS[cell]
    # ONNX's LSTM / GRU operators express the cells whose table entry names them (without a
    # projection); every other cell is exported as its reference equations.
    if spec.onnx is None or weight_hr is not None:
        return reference.layer_of(cell, a)
    T, B = input.shape[0], input.shape[1]
    direction = "reverse" if reverse else "forward"
    dtype = input.dtype
    if spec.onnx == "GRU":
        H = weight_ih.shape[0] // 3
        order = (1, 0, 2)  # torch r, z, n -> ONNX z, r, h
        inputs = [
            input,
            _reorder(weight_ih, order).unsqueeze(0),
            _reorder(weight_hh, order).unsqueeze(0),
            _onnx_bias(bias_ih, bias_hh, order, input, 3 * H),
            None,
            hx.unsqueeze(0) if hx is not None else None,
        ]
        # linear_before_reset=1: r multiplies (W_hn h + b_hn), torch.nn.GRU's equation
        y, y_h = torch.onnx.ops.symbolic_multi_out(
            "::GRU",
            inputs,
            dict(hidden_size=H, direction=direction, linear_before_reset=1),
            dtypes=(dtype, dtype),
            shapes=((T, 1, B, H), (1, B, H)),
        )
        return y.reshape(T, B, H), y_h.reshape(B, H), None
    H = weight_ih.shape[0] // 4
    order = (0, 3, 1, 2)  # torch i, f, g, o -> ONNX i, o, f, c
    peephole = None
    if spec.weight_ch == "diagonal":  # weight_ch rows w_ci, w_cf, w_co -> ONNX P = [p_i, p_o, p_f]
        peephole = torch.cat([weight_ch[0], weight_ch[2], weight_ch[1]]).unsqueeze(0)
    inputs = [
        input,
        _reorder(weight_ih, order).unsqueeze(0),
        _reorder(weight_hh, order).unsqueeze(0),
        _onnx_bias(bias_ih, bias_hh, order, input, 4 * H),
        None,
        hx.unsqueeze(0) if hx is not None else None,
        cx.unsqueeze(0) if cx is not None else None,
        peephole,
    ]
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "::LSTM",
        inputs,
        dict(hidden_size=H, direction=direction),
        dtypes=(dtype, dtype, dtype),
        shapes=((T, 1, B, H), (1, B, H), (1, B, H)),
    )
    return y.reshape(T, B, H), y_h.reshape(B, H), y_c.reshape(B, H)
