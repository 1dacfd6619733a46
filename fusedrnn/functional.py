"""The fused computations as functions over explicit weights.

`rnn_layer` is one layer in one direction (whole sequence); the `*_cell` functions are one step
with torch.nn.LSTMCell / GRUCell semantics. All run through the fused ops (or the reference
implementation when the compiled extension is unavailable).
"""

from typing import Optional, Tuple

from torch import Tensor

from . import _layer
from .reference import LayerArgs, layer_signature

__all__ = ["rnn_layer", "lstm_cell", "gru_cell", "peephole_lstm_cell", "wm_lstm_cell"]


def rnn_layer(cell: str, *args, **kwargs) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One recurrent layer over a whole sequence, arguments as fusedrnn.reference.LayerArgs.

    cell: "lstm", "gru", "peephole_lstm" or "wm_lstm" (fusedrnn.cells). input: (T, B, I)
    time-major, or packed (sum(batch_sizes), I) with batch_sizes (T,) int64 on the CPU,
    non-increasing. Returns (output (T, B, H_out) or (sum(batch_sizes), H_out), h_n (B, H_out),
    c_n (B, H) or None).
    """
    return _layer.run(cell, LayerArgs(*args, **kwargs))


rnn_layer.__signature__ = layer_signature()


def _step(cell, input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch):
    _, hy, cy = _layer.run(
        cell,
        LayerArgs(
            input.unsqueeze(0), weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, None, hx, cx
        ),
        exposed=False,
    )
    return hy, cy


def lstm_cell(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One LSTM step on (B, I) input: returns (h_1, c_1)."""
    return _step("lstm", input, hx[0], hx[1], weight_ih, weight_hh, bias_ih, bias_hh, None)


def peephole_lstm_cell(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    weight_ch: Tensor,
) -> Tuple[Tensor, Tensor]:
    """One peephole-LSTM step; weight_ch (3, H)."""
    return _step(
        "peephole_lstm", input, hx[0], hx[1], weight_ih, weight_hh, bias_ih, bias_hh, weight_ch
    )


def wm_lstm_cell(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    weight_ch: Tensor,
) -> Tuple[Tensor, Tensor]:
    """One working-memory-LSTM step; weight_ch (3H, H)."""
    return _step("wm_lstm", input, hx[0], hx[1], weight_ih, weight_hh, bias_ih, bias_hh, weight_ch)


def gru_cell(
    input: Tensor,
    hx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Optional[Tensor] = None,
    bias_hh: Optional[Tensor] = None,
) -> Tensor:
    """One GRU step on (B, I) input: returns h_1."""
    return _step("gru", input, hx, None, weight_ih, weight_hh, bias_ih, bias_hh, None)[0]
