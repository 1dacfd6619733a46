"""Plain PyTorch implementations of the four cells and of one recurrent layer.

These are the equations of design.md §1 written once, step by step, with autograd doing the
backward. They are the oracle of the tests, the "eager loop" baseline of the benchmarks and the
fallback when the compiled extension cannot be loaded. One layer call has the meaning of the
fused ops: time-major (T, B, I) input, or packed (sum(batch_sizes), I) input with per-step batch
sizes, optional initial states, optional reverse direction.
"""

import inspect
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import cells as _cells

CELLS = tuple(_cells.CELLS)


class LayerArgs(NamedTuple):
    """The arguments of one layer call, in the order of every layer function of the package
    (`reference.layer`, `functional.rnn_layer`, the ops' `<cell>_forward` schemas): written
    here once. input (T, B, I) time-major, or packed (sum(batch_sizes), I) with batch_sizes
    (T,) int64 on the CPU, non-increasing; weights as torch.nn's (weight_ch: see
    fusedrnn.cells; weight_hr (proj_size, H) the LSTM family's projection); hx (B, H_out),
    cx (B, H) the initial states (zeros when None); reverse runs the steps last to first."""

    input: Tensor
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Optional[Tensor] = None
    bias_hh: Optional[Tensor] = None
    weight_ch: Optional[Tensor] = None
    weight_hr: Optional[Tensor] = None
    hx: Optional[Tensor] = None
    cx: Optional[Tensor] = None
    batch_sizes: Optional[Tensor] = None
    reverse: bool = False

    @property
    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        """(input, weight_ih, weight_hh, bias_ih, bias_hh, weight_ch, weight_hr, hx, cx)."""
        return self[:9]


def layer_signature(*extra: inspect.Parameter) -> inspect.Signature:
    """`(cell, <LayerArgs' fields>, *extra)`: the signature a layer function shows to help()
    and inspect, for functions that take `cell, *args, **kwargs` and bind them to LayerArgs."""
    params = [inspect.Parameter("cell", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    for name in LayerArgs._fields:
        default = LayerArgs._field_defaults.get(name, inspect.Parameter.empty)
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=default,
                annotation=LayerArgs.__annotations__[name],
            )
        )
    return inspect.Signature(
        params + list(extra), return_annotation=Tuple[Tensor, Tensor, Optional[Tensor]]
    )


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    y = x @ w.t()
    return y if b is None else y + b


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """torch.nn.LSTM's step: gates i, f, g, o; returns (h_t, c_t)."""
    a = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    a_i, a_f, a_g, a_o = a.chunk(4, 1)
    i, f, g, o = a_i.sigmoid(), a_f.sigmoid(), a_g.tanh(), a_o.sigmoid()
    c = f * c + i * g
    h = o * c.tanh()
    return (h if w_hr is None else h @ w_hr.t()), c


def peephole_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr=None):
    """Diagonal peepholes w_ch = [w_ci; w_cf; w_co] (3, H); o sees the new cell state."""
    a = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    a_i, a_f, a_g, a_o = a.chunk(4, 1)
    w_ci, w_cf, w_co = w_ch[0], w_ch[1], w_ch[2]
    i = (a_i + w_ci * c).sigmoid()
    f = (a_f + w_cf * c).sigmoid()
    g = a_g.tanh()
    c = f * c + i * g
    o = (a_o + w_co * c).sigmoid()
    h = o * c.tanh()
    return (h if w_hr is None else h @ w_hr.t()), c


def wm_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_ch, w_hr=None):
    """Working-memory connections w_ch = [W_ci; W_cf; W_co] (3H, H), bounded by tanh."""
    a = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    a_i, a_f, a_g, a_o = a.chunk(4, 1)
    w_ci, w_cf, w_co = w_ch.chunk(3, 0)
    i = (a_i + (c @ w_ci.t()).tanh()).sigmoid()
    f = (a_f + (c @ w_cf.t()).tanh()).sigmoid()
    g = a_g.tanh()
    c = f * c + i * g
    o = (a_o + (c @ w_co.t()).tanh()).sigmoid()
    h = o * c.tanh()
    return (h if w_hr is None else h @ w_hr.t()), c


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """torch.nn.GRU's step: gates r, z, n, reset applied after the recurrent matmul."""
    x_r, x_z, x_n = _linear(x, w_ih, b_ih).chunk(3, 1)
    h_r, h_z, h_n = _linear(h, w_hh, b_hh).chunk(3, 1)
    r = (x_r + h_r).sigmoid()
    z = (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    return (1 - z) * n + z * h


# The reference step of each cell of fusedrnn.cells: (x, h, [c,] w_ih, w_hh, b_ih, b_hh,
# [w_ch,] [w_hr]) -> h_new or (h_new, c_new); c with a cell state, w_ch with a weight_ch.
STEPS = {
    "lstm": lstm_cell,
    "gru": gru_cell,
    "peephole_lstm": peephole_lstm_cell,
    "wm_lstm": wm_lstm_cell,
}
assert set(STEPS) == set(_cells.CELLS), "every cell of fusedrnn.cells has a reference step"


def _steps(input: Tensor, batch_sizes: Optional[Tensor]):
    """(time index, first row, rows) of every step, as the fused ops lay them out."""
    if batch_sizes is None:
        T, B = input.shape[0], input.shape[1]
        return [(t, t * B, B) for t in range(T)], B
    sizes = [int(b) for b in batch_sizes.tolist()]
    out, off = [], 0
    for t, n in enumerate(sizes):
        out.append((t, off, n))
        off += n
    return out, (sizes[0] if sizes else 0)


def layer(cell: str, *args, **kwargs) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction, arguments as LayerArgs. Returns (output, h_n, c_n); c_n is
    None for the GRU."""
    return layer_of(cell, LayerArgs(*args, **kwargs))


layer.__signature__ = layer_signature()


def layer_of(
    cell: str, a: LayerArgs, ln: Tuple[Tensor, ...] = (), keep: Optional[tuple] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """`layer` over arguments already bound. With `ln`, the layer-normalised cell of `cell`'s
    family (LAYER_NORM_STEPS): ln is its gains and shifts, (ln_weight_ih, ln_weight_hh,
    ln_weight_c, ln_bias_c) for the LSTM, (ln_weight_ih, ln_weight_hh) for the GRU.

    With `keep` = (keep_c, keep_h), zoneout (design.md §1.7) of the cell state and of the
    hidden state after every step: each None (that state is not zoned), a rate p (eval: the
    expectation), a bool mask (rows, width) with one row per output row, as `zoneout_masks`
    draws it (training: True keeps the previous value), or the fused ops' form of either: a
    floating-point (rows, width) or (1, width) tensor of weights d of the previous value.
    keep_c is ignored by a cell without a cell state. The output at t is the zoned h_t."""
    spec = _cells.get(cell)
    step = LAYER_NORM_STEPS[cell] if ln else STEPS[cell]
    input, batch_sizes = a.input, a.batch_sizes
    H = a.weight_ih.shape[0] // spec.gates
    H_out = a.weight_hr.shape[0] if a.weight_hr is not None else H
    steps, B = _steps(input, batch_sizes)
    x2 = input.reshape(-1, input.shape[-1])
    h = a.hx if a.hx is not None else input.new_zeros(B, H_out)
    c = None
    if spec.has_cell_state:
        c = a.cx if a.cx is not None else input.new_zeros(B, H)
    weights = (a.weight_ih, a.weight_hh, a.bias_ih, a.bias_hh, *ln)
    keep_c, keep_h = keep if keep is not None else (None, None)

    def zoned(prev: Tensor, new: Tensor, d, r0: int, n: int) -> Tensor:
        if d is None:
            return new
        if isinstance(d, Tensor) and d.shape[0] != 1:  # (1, width): one row for every row
            d = d[r0 : r0 + n]
        return zoneout(prev, new, d)

    outs = [None] * len(steps)
    for t, r0, n in reversed(steps) if a.reverse else steps:
        x = x2[r0 : r0 + n]
        if not spec.has_cell_state:
            h_new = step(x, h[:n], *weights)
        else:
            extra = (a.weight_hr,) if spec.weight_ch is None else (a.weight_ch, a.weight_hr)
            h_new, c_new = step(x, h[:n], c[:n], *weights, *extra)
            c_new = zoned(c[:n], c_new, keep_c, r0, n)
            c = torch.cat([c_new, c[n:]]) if n < c.shape[0] else c_new
        h_new = zoned(h[:n], h_new, keep_h, r0, n)
        h = torch.cat([h_new, h[n:]]) if n < h.shape[0] else h_new
        outs[t] = h_new
    if outs:
        output = torch.cat(outs, 0)
    else:
        output = input.new_zeros(0, H_out)
    if batch_sizes is None:
        output = output.reshape(input.shape[0], input.shape[1], H_out)
    return output, h, c


def dropconnect(weight_hh: Tensor, p: float, training: bool) -> Tensor:
    """DropConnect on the recurrent weight (design.md §1.5): in training, weight_hh ⊙ m / (1 − p)
    with one Bernoulli(1 − p) mask m per call, which every step of that call shares (AWD-LSTM's
    weight drop); the weight itself in eval or at p = 0 (no random number drawn). The gradient
    reaches weight_hh through the mask."""
    if not training or p == 0:
        return weight_hh
    return torch.nn.functional.dropout(weight_hh, p, True)


# Layer normalisation and zoneout (design.md §1.6, §1.7), step by step: the oracle of the fused
# layer-normalised ops (fusedrnn.LayerNormLSTM / LayerNormGRU run them through `layer_of` with
# `ln`) and of zoneout (`layer_of` with `keep`).


def layer_norm(v: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None) -> Tensor:
    """LN(v; γ, β): each row of v normalised over its features (mean and biased variance,
    eps 1e-5), then scaled by γ and shifted by β (either may be None: 1 and 0)."""
    return torch.nn.functional.layer_norm(v, v.shape[-1:], weight, bias, 1e-5)


def layer_norm_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c, w_hr=None):
    """The layer-normalised LSTM step (Ba et al. 2016): the two products normalised apart over
    all 4H gate columns of a row (gains g_ih, g_hh (4H,), no shift: the biases are the shift),
    h_t = o ⊙ tanh(LN(c_t; g_c, b_c)); c_t itself, not normalised, is the carried state.
    Returns (h_t, c_t)."""
    a = layer_norm(x @ w_ih.t(), g_ih) + layer_norm(h @ w_hh.t(), g_hh)
    if b_ih is not None:
        a = a + b_ih + b_hh
    a_i, a_f, a_g, a_o = a.chunk(4, 1)
    i, f, g, o = a_i.sigmoid(), a_f.sigmoid(), a_g.tanh(), a_o.sigmoid()
    c = f * c + i * g
    h = o * layer_norm(c, g_c, b_c).tanh()
    return (h if w_hr is None else h @ w_hr.t()), c


def layer_norm_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh):
    """The layer-normalised GRU step: each product normalised over its 3H columns (gains g_ih,
    g_hh (3H,)), the biases added after; then torch.nn.GRU's step (the reset multiplies the
    normalised h_n). Returns h_t."""
    xs, hs = layer_norm(x @ w_ih.t(), g_ih), layer_norm(h @ w_hh.t(), g_hh)
    if b_ih is not None:
        xs, hs = xs + b_ih, hs + b_hh
    x_r, x_z, x_n = xs.chunk(3, 1)
    h_r, h_z, h_n = hs.chunk(3, 1)
    r = (x_r + h_r).sigmoid()
    z = (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    return (1 - z) * n + z * h


def zoneout(prev: Tensor, new: Tensor, keep) -> Tensor:
    """Zoneout of one state (Krueger et al. 2016): `keep` is the step's mask d (a bool tensor
    shaped like the state: True keeps the previous value) in training, or the rate p (a float)
    in eval, which mixes the expectation p ⊙ prev + (1 − p) ⊙ new; a floating-point tensor
    is the weights d themselves (the fused ops' form, 0 / 1 or p), d ⊙ prev + (1 − d) ⊙ new,
    taken in the state's dtype (the state keeps its dtype, as with a bool mask)."""
    if isinstance(keep, Tensor) and keep.dtype == torch.bool:
        return torch.where(keep, prev, new)
    if isinstance(keep, Tensor):
        keep = keep.to(new.dtype)
        return keep * prev + (1 - keep) * new
    return new if keep == 0 else keep * prev + (1 - keep) * new


# fusedrnn::zoneout_mask (csrc/ops/zoneout_mask.cpp), set by fusedrnn._ops when the compiled
# extension loads; None without it.
MASK_OP = None


def zoneout_masks(
    rows: int, hidden: int, p: float, like: Tensor, dtype: Optional[torch.dtype] = None
) -> Tensor:
    """The training masks of one state over a layer call: (rows, hidden) bool, True with
    probability p, one per row of the call's output (T * B, or sum(batch_sizes) packed), from
    torch's generator, so that a seed fixes them. With a floating `dtype`, the same masks as
    1 / 0 of that dtype (the weights the fused ops take; `zoneout` takes either form).

    On the CPU with the compiled extension: torch's generator draws one seed, and the op
    fusedrnn::zoneout_mask computes each element from it and the element's index (several
    times faster than torch.rand, and the same for every thread count; P(True) is p rounded
    down to a multiple of 2^-32). Elsewhere `torch.rand(rows, hidden) < p` on like's device."""
    if MASK_OP is not None and like.device.type == "cpu":
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        return MASK_OP(rows, hidden, float(p), seed, dtype)
    keep = torch.rand(rows, hidden, device=like.device) < p
    return keep if dtype is None else keep.to(dtype)


# The layer-normalised step of each cell family that has one, keyed by the plain cell's name:
# (x, h, [c,] w_ih, w_hh, b_ih, b_hh, *ln, [w_hr]) as `layer_of` calls it.
LAYER_NORM_STEPS = {"lstm": layer_norm_lstm_cell, "gru": layer_norm_gru_cell}
