"""Drop-in modules: LSTM, GRU, PeepholeLSTM, WorkingMemoryLSTM and their one-step cells.

Parameter names, shapes, registration order, initialisation, arguments and return values are
torch.nn's, so a state_dict moves between torch.nn.LSTM/GRU and these modules unchanged. Two
keyword arguments torch.nn lacks: `dropconnect=p`, DropConnect on weight_hh (design.md §1.5), and
`zoneout=p`, zoneout of the states (§1.7). Every layer and direction runs as one call of a fused
whole-sequence op (see fusedrnn._layer.run); the Python here only routes tensors, with no work
proportional to the sequence length. Zoneout is fused in the ops of every cell, projected LSTMs
included.
"""

import functools
import math
import numbers
import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import _layer, _layer_norm, _ops, cells, reference
from .reference import LayerArgs

__all__ = [
    "LSTM",
    "GRU",
    "PeepholeLSTM",
    "WorkingMemoryLSTM",
    "LSTMCell",
    "GRUCell",
    "PeepholeLSTMCell",
    "WorkingMemoryLSTMCell",
    "LayerNormLSTM",
    "LayerNormGRU",
    "LayerNormLSTMCell",
    "LayerNormGRUCell",
]


def _check_positive_int(name: str, value, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if zero_ok and value < 0:
        raise ValueError(f"{name} must be greater than or equal to zero, got {value}")
    if not zero_ok and value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")


def _check_dropconnect(value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(
            "dropconnect should be a number in range [0, 1] representing the probability of "
            f"a recurrent weight (weight_hh) being zeroed, got {value!r}"
        )
    return float(value)


_ZONEOUT_RATE = (
    "zoneout should be a number in range [0, 1] representing the probability of a state element "
    "keeping its previous value"
)


def _check_zoneout(value, pair_ok: bool):
    """A zoneout argument: one rate, or (LSTM family, pair_ok) a pair (p_c, p_h) of the cell
    and the hidden state's rates. Returned as floats, in the form given."""

    def rate(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1

    if isinstance(value, (tuple, list)):
        if not pair_ok:
            raise ValueError(
                f"{_ZONEOUT_RATE}; a GRU has one state (h), so one rate, not a pair: got {value!r}"
            )
        if len(value) != 2 or not all(rate(v) for v in value):
            raise ValueError(
                f"{_ZONEOUT_RATE}, or a pair (p_c, p_h) of such numbers for the cell and the "
                f"hidden state, got {value!r}"
            )
        return (float(value[0]), float(value[1]))
    if not rate(value):
        pair = ", or a pair (p_c, p_h) of such numbers" if pair_ok else ""
        raise ValueError(f"{_ZONEOUT_RATE}{pair}, got {value!r}")
    return float(value)


def _zoneout_keep(zoneout, training: bool, rows: int, width_c: Optional[int], width_h: int, like):
    """What a layer call of `rows` output rows zones (design.md §1.7): (keep_c, keep_h) for
    fusedrnn.reference.layer_of, or None when neither state is zoned. In training one mask per
    zoned state, (rows, width), drawn with reference.zoneout_masks as 1 / 0 in like's dtype (the
    weights the fused ops take: no conversion), the cell state's first;
    in eval the rate (the expectation); None for a state at rate 0 (no random number drawn) or
    without a cell state (width_c None)."""
    p_c, p_h = zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)
    keeps = []
    for p, width in ((p_c, width_c), (p_h, width_h)):
        if p == 0 or width is None:
            keeps.append(None)
        elif training:
            dtype = like.dtype if like.is_floating_point() else None
            keeps.append(reference.zoneout_masks(rows, width, p, like, dtype))
        else:
            keeps.append(p)
    return None if keeps[0] is None and keeps[1] is None else tuple(keeps)


def _autocast_mixed_ok(a: Tensor, b: Tensor) -> bool:
    """Under autocast, a lower-precision tensor may meet float32 parameters or states: the
    fused ops' autocast kernels cast them all to the autocast dtype (see _ops), or the module
    runs them in the dtype torch.nn returns (_cpu_autocast_promoted)."""
    dev = a.device.type
    return (
        dev in ("cpu", "cuda")
        and torch.is_autocast_enabled(dev)
        and all(t.is_floating_point() and t.dtype != torch.float64 for t in (a, b))
    )


def _cpu_autocast_promoted(input: Tensor, state: Tensor) -> Optional[torch.dtype]:
    """Under CPU autocast (and a CPU input), the dtype torch.nn's CPU GRU, LSTMCell and
    GRUCell return when it is not the autocast dtype; None when it is, or without CPU autocast
    (the ops' autocast kernels then give the dtype torch.nn returns).

    torch's CPU autocast lists the oneDNN LSTM that torch.nn.LSTM runs (aten::mkldnn_rnn_layer)
    and the linear layers among its lower-precision ops, but not aten::gru, lstm_cell or
    gru_cell (CUDA's lists have the cells: there everything runs in the autocast dtype). These
    run their linear layers, the gates come out in the autocast dtype, and update the state
    pointwise, which promotes the gates with the state: the result is
    promote_types(autocast dtype, state dtype), the state being c in an LSTM cell, h in the GRU
    (zeros of the input's dtype when none is given); a float32 state gives float32 results.
    Each module follows the nearest torch.nn module: the GRU torch.nn.GRU, every LSTM-family
    cell torch.nn.LSTMCell, every LSTM-family sequence module torch.nn.LSTM (the autocast dtype;
    with a projection, which oneDNN's LSTM lacks, c_n in this dtype). Where this dtype is not
    the autocast dtype the layers run in it (_run_promoted): the state is carried in it, as in
    torch.nn, not rounded to the autocast dtype at every step."""
    # in a cell's every step: first the cheapest test, the one torch.nn.RNNBase.check_input makes
    # (half the cost of is_autocast_enabled("cpu"), a third of device.type)
    if not torch._C._is_any_autocast_enabled():
        return None
    if not torch.is_autocast_enabled("cpu") or not input.is_cpu:
        return None
    low = torch.get_autocast_dtype("cpu")
    promoted = torch.promote_types(low, state.dtype)
    return None if promoted == low else promoted


def _run_promoted(
    cell: str, a: LayerArgs, exposed: bool, dtype: torch.dtype, run=_layer.run, **kwargs
):
    """`run` (_layer.run, or _run_reference) with the floating-point tensors cast to `dtype` and
    CPU autocast off (the ops' autocast kernels would cast them to the autocast dtype)."""
    a = LayerArgs(
        *(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in a)
    )
    with torch.autocast("cpu", enabled=False):
        return run(cell, a, exposed=exposed, **kwargs)


def _run_reference(cell: str, a: LayerArgs, exposed: bool = False, ln=(), keep=None):
    """A layer call the fused ops do not serve, through the reference equations with autograd,
    in the dtype an op would give (under autocast, the op's autocast kernel casts its arguments
    to the autocast dtype): a layer of hidden size 0, which torch.nn's cells allow and the ops
    do not ((B, 0) states for no work), and a zoned layer (`keep`, see _zoneout_keep; `ln` the
    LayerNorm parameters of a layer-normalised one)."""
    dev = a.input.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        a = LayerArgs(*(t.to(low) if _ops._autocast_eligible(t, dev) else t for t in a))
        ln = tuple(t.to(low) if _ops._autocast_eligible(t, dev) else t for t in ln)
        with torch.autocast(dev, enabled=False):
            return reference.layer_of(cell, a, ln, keep)
    return reference.layer_of(cell, a, ln, keep)


def _layer_norm_run(cell: str, a: LayerArgs, exposed: bool = False, ln=(), keep=None):
    """_layer_norm.run in the signature of _layer.run."""
    return _layer_norm.run(cell, a, ln, keep)


def _fx_leaf(module: nn.Module, *args):
    """Under torch.fx.symbolic_trace, record the module as one call_module node (a leaf, as
    torch.fx does for torch.nn's RNNs) instead of tracing through the fused forward."""
    tracer = next(a.tracer for a in args if isinstance(a, torch.fx.Proxy))
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


def _is_proxy(*args) -> bool:
    return any(isinstance(a, torch.fx.Proxy) for a in args) or any(
        isinstance(a, (tuple, list)) and any(isinstance(t, torch.fx.Proxy) for t in a) for a in args
    )


def _init_depth(cls) -> int:
    """How many classes of cls's method resolution order before _RNNBase define __init__:
    the frames between a module's caller and _RNNBase.__init__."""
    depth = 0
    for c in cls.__mro__:
        if c is _RNNBase:
            break
        depth += "__init__" in c.__dict__
    return depth


class _NotScriptable:
    """torch.jit.script compiles a module's forward from its Python source; the fused modules'
    forward (PackedSequence routing, custom-op calls with optional arguments) is not
    TorchScript. Scripting raises a clear error instead of failing deep in the compiler."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fusedrnn.{type(self).__name__} does not support torch.jit.script. Use "
            "torch.jit.trace, torch.compile or torch.export (or torch.onnx.export(..., "
            "dynamo=True)) instead; to script a model, convert it back to torch.nn's module "
            "(torch.nn.LSTM / GRU / LSTMCell / GRUCell load the same state_dict)."
        )


class _RNNBase(_NotScriptable, nn.RNNBase):
    """Shared machinery of the sequence modules; `_cell` names the fused op family.

    A subclass of torch.nn.RNNBase (isinstance checks and `model.apply(init_fn)` reach it)
    whose torch.nn.RNNBase.__init__ is not run: parameters are created here (the extended
    cells have more), and the cuDNN flat-weight cache of torch.nn.RNNBase is replaced by the
    `_flat_weights` property, so its hooks (__setattr__, _apply, pickling, replication) are
    torch.nn.Module's. Not a subclass of torch.nn.LSTM / GRU: torch.compile (dynamo) refuses
    to trace those (it graph-breaks on every nn.LSTM / GRU instance).
    """

    _cell = "lstm"
    _layer_norm = False  # the layer-normalised cell of _cell's family (LayerNormLSTM / GRU)
    dropconnect = 0.0  # (a class default too: modules pickled before it existed load)
    zoneout = 0.0  # a rate, or (p_c, p_h) in the LSTM family; a class default as dropconnect

    @property
    def _zone_fused(self) -> bool:
        """Whether the fused ops zone this module's layers."""
        return self._cell in _layer.ZONED_CELLS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        dropconnect: float = 0.0,
        zoneout: Union[float, Tuple[float, float]] = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        _check_positive_int("input_size", input_size)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("num_layers", num_layers)
        dropconnect = _check_dropconnect(dropconnect)
        zoneout = _check_zoneout(zoneout, cells.CELLS[self._cell].has_cell_state)
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the "
                f"probability of an element being zeroed, got {dropout!r}"
            )
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral):
            raise TypeError(f"proj_size should be of type int, got: {type(proj_size).__name__}")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable "
                f"projections, got {proj_size}"
            )
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size has to be smaller than hidden_size, got proj_size="
                f"{proj_size} and hidden_size={hidden_size}"
            )
        if proj_size and not cells.CELLS[self._cell].has_cell_state:
            raise ValueError("proj_size argument is only supported for LSTM-family modules")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so "
                "non-zero dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                # the caller's line: one frame more per __init__ of a subclass in between
                stacklevel=2 + _init_depth(type(self)),
            )
        self.mode = type(self).__name__
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.dropconnect = dropconnect
        self.zoneout = zoneout
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        spec = cells.CELLS[self._cell]
        G = spec.gates
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            for direction in range(D):
                layer_input = input_size if layer == 0 else real_hidden * D
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                params = [
                    ("weight_ih" + sfx, (G * hidden_size, layer_input)),
                    ("weight_hh" + sfx, (G * hidden_size, real_hidden)),
                ]
                if bias:
                    params += [
                        ("bias_ih" + sfx, (G * hidden_size,)),
                        ("bias_hh" + sfx, (G * hidden_size,)),
                    ]
                if proj_size > 0:
                    params.append(("weight_hr" + sfx, (proj_size, hidden_size)))
                if spec.weight_ch is not None:
                    params.append(("weight_ch" + sfx, spec.weight_ch_shape(hidden_size)))
                for name, shape in params:
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names.extend(name for name, _ in params)
                self._all_weights.append([name for name, _ in params])
        self.reset_parameters()

    # torch.nn.RNNBase API ---------------------------------------------------------------------
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op: the fused ops read the parameters where they are (kept for torch.nn parity)."""

    # torch.nn.RNNBase keeps a cache of the weights for cuDNN; here there is none.
    def _init_flat_weights(self) -> None:
        pass

    def _update_flat_weights(self) -> None:
        pass

    def _weights_have_changed(self) -> bool:
        return False

    def __setattr__(self, attr, value) -> None:
        nn.Module.__setattr__(self, attr, value)

    def _apply(self, fn, recurse=True):
        return nn.Module._apply(self, fn, recurse)

    def __getstate__(self):
        return self.__dict__.copy()

    def __setstate__(self, state) -> None:
        nn.Module.__setstate__(self, state)

    def _replicate_for_data_parallel(self):
        replica = nn.Module._replicate_for_data_parallel(self)
        replica._flat_weights_names = replica._flat_weights_names[:]
        return replica

    @property
    def _flat_weights(self) -> List[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.dropconnect != 0:
            s += ", dropconnect={dropconnect}"
        if self.zoneout != 0:
            s += ", zoneout={zoneout}"
        return s.format(**self.__dict__)

    # forward ---------------------------------------------------------------------------------
    def _layer_weights(self, layer: int, direction: int):
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda n: getattr(self, n + sfx, None)  # noqa: E731
        return (
            get("weight_ih"),
            get("weight_hh"),
            get("bias_ih"),
            get("bias_hh"),
            get("weight_ch"),
            get("weight_hr"),
        )

    def _check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        """torch.nn.RNNBase.check_input: dtype, rank, input size, in its order, with its
        exceptions and messages (code may match on them); then the device."""
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{self.mode}: input must be a Tensor or PackedSequence, got {type(input).__name__}"
            )
        w = self.weight_ih_l0
        if not input.is_floating_point() or (
            input.dtype != w.dtype and not _autocast_mixed_ok(input, w)
        ):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})"
            )
        expected = 2 if batch_sizes is not None else 3
        if input.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {input.dim()}")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.shape[-1]}"
            )
        if input.device != w.device:
            raise RuntimeError(
                f"{self.mode}: input is on {input.device} but the parameters are on {w.device}"
            )

    def _check_state(
        self, name: str, label: str, state: Tensor, shape: Tuple[int, ...], input: Tensor
    ):
        """`name` h_0, c_0 or hx; `label` what torch.nn's message of a wrong size calls it:
        hidden[0], hidden[1] (an LSTM's h_0, c_0) or hidden (a GRU's)."""
        if not isinstance(state, Tensor):
            raise TypeError(f"{self.mode}: {name} must be a Tensor, got {type(state).__name__}")
        if tuple(state.shape) != shape:
            raise RuntimeError(f"Expected {label} size {shape}, got {list(state.shape)}")
        if state.dtype != input.dtype and not _autocast_mixed_ok(state, input):
            raise TypeError(
                f"{self.mode}: {name} dtype {state.dtype} does not match input dtype {input.dtype}"
            )
        if state.device != input.device:
            raise RuntimeError(
                f"{self.mode}: {name} is on {state.device} but input is on {input.device}"
            )

    def forward(self, input: Union[Tensor, PackedSequence], hx=None):
        if _is_proxy(input, hx):  # torch.fx.symbolic_trace: a leaf module
            return _fx_leaf(self, input, hx)
        is_lstm = cells.CELLS[self._cell].has_cell_state
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = batch_sizes = None
        unbatched = False
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
            self._check_input(input, batch_sizes)
            B = int(batch_sizes[0]) if batch_sizes.numel() > 0 else 0
        else:
            if isinstance(input, Tensor) and input.dim() == 2:
                unbatched = True
                input = input.unsqueeze(1)
            elif isinstance(input, Tensor) and input.dim() != 3:
                raise ValueError(
                    f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D tensor"
                )
            self._check_input(input, None)
            if self.batch_first and not unbatched:
                input = input.transpose(0, 1)
            if input.shape[0] == 0:
                raise RuntimeError(
                    f"{self.mode}: Expected sequence length to be larger than 0 "
                    f"in RNN, got input of shape {tuple(input.shape)}"
                )
            B = input.shape[1]

        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        H_out = self.proj_size if self.proj_size > 0 else H
        h_shape = (self.num_layers * D, B, H_out)
        c_shape = (self.num_layers * D, B, H)
        if hx is None:
            h0 = input.new_zeros(h_shape)
            c0 = input.new_zeros(c_shape) if is_lstm else None
        else:
            if is_lstm:
                if isinstance(hx, Tensor):  # torch.nn raises a RuntimeError here too
                    raise RuntimeError(
                        f"{self.mode}: hx must be a tuple (h_0, c_0) of "
                        f"Tensors, got a Tensor of shape {tuple(hx.shape)}"
                    )
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(
                        f"{self.mode}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}"
                    )
                h0, c0 = hx
            else:
                h0, c0 = hx, None
            states = (h0, c0) if is_lstm else (h0,)
            if not packed and all(isinstance(t, Tensor) for t in states):
                rank = 2 if unbatched else 3  # torch.nn's check and message
                if any(t.dim() != rank for t in states):
                    kind = "unbatched 2-D" if unbatched else "batched 3-D"
                    got = ", ".join(f"{t.dim()}-D" for t in states)
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {rank}-D but got ({got}) "
                        "tensors"
                        if is_lstm
                        else f"For {kind} input, hx should also be {rank}-D but got {got} tensor"
                    )
            if unbatched:
                h0 = h0.unsqueeze(1) if isinstance(h0, Tensor) else h0
                c0 = c0.unsqueeze(1) if isinstance(c0, Tensor) else c0
            if is_lstm:
                self._check_state("h_0", "hidden[0]", h0, h_shape, input)
                self._check_state("c_0", "hidden[1]", c0, c_shape, input)
            else:
                self._check_state("hx", "hidden", h0, h_shape, input)
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
                c0 = c0.index_select(1, sorted_indices) if c0 is not None else None

        # CPU autocast: the GRU family runs in the dtype torch.nn.GRU returns when that is not
        # the autocast dtype (_cpu_autocast_promoted); the LSTM family, and the layer-normalised
        # layers (which torch.nn lacks), run in the autocast dtype
        run = _layer.run
        promoted = None if is_lstm or self._layer_norm else _cpu_autocast_promoted(input, h0)
        if promoted is not None:
            run = functools.partial(_run_promoted, dtype=promoted)
        layer_input = input
        rows = input.shape[0] if packed else input.shape[0] * input.shape[1]
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(D):
                k = layer * D + direction
                w_ih, w_hh, b_ih, b_hh, w_ch, w_hr = self._layer_weights(layer, direction)
                # one mask per call, shared by every step of this layer and direction
                w_hh = reference.dropconnect(w_hh, self.dropconnect, self.training)
                args = LayerArgs(
                    layer_input,
                    w_ih,
                    w_hh,
                    b_ih,
                    b_hh,
                    w_ch,
                    w_hr,
                    h0[k],
                    c0[k] if c0 is not None else None,
                    batch_sizes,
                    direction == 1,
                )
                # zoneout's masks (training) or rates (eval), None when no state is zoned
                keep = None
                if self.zoneout != 0:
                    keep = _zoneout_keep(
                        self.zoneout, self.training, rows, H if is_lstm else None, H_out, input
                    )
                ln = self._ln_params(layer, direction) if self._layer_norm else ()
                exposed = D == 1 and layer == self.num_layers - 1
                if keep is not None and not self._zone_fused:
                    # zoneout the ops do not fuse: the reference equations
                    zoned = functools.partial(_run_reference, ln=ln, keep=keep)
                    if promoted is not None:
                        out, hy, cy = _run_promoted(self._cell, args, False, promoted, zoned)
                    else:
                        out, hy, cy = zoned(self._cell, args)
                elif self._layer_norm:
                    out, hy, cy = _layer_norm.run(self._cell, args, ln, keep)
                else:
                    out, hy, cy = run(self._cell, args, exposed=exposed, keep=keep)
                outputs.append(out)
                h_n.append(hy)
                c_n.append(cy)
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, -1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = nn.functional.dropout(layer_input, self.dropout, True)
        output = layer_input
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if is_lstm else None
        if is_lstm and self.proj_size > 0 and not self._layer_norm:
            # torch.nn's LSTM with a projection (not oneDNN's) returns c_n promoted with c_0
            # under CPU autocast, its output and h_n coming out of the projection's linear layer
            c_promoted = _cpu_autocast_promoted(input, c0)
            if c_promoted is not None:
                c_n = c_n.to(c_promoted)

        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            if unsorted_indices is not None:
                h_n = h_n.index_select(1, unsorted_indices)
                c_n = c_n.index_select(1, unsorted_indices) if c_n is not None else None
        else:
            if self.batch_first and not unbatched:
                output = output.transpose(0, 1)
            if unbatched:
                output = output.squeeze(1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
        return (output, (h_n, c_n)) if is_lstm else (output, h_n)


class LSTM(_RNNBase):
    """Drop-in for torch.nn.LSTM (same arguments, parameters and outputs), fused."""

    _cell = "lstm"


class PeepholeLSTM(_RNNBase):
    """LSTM with diagonal peephole connections; extra parameter weight_ch_l{k} (3, H)."""

    _cell = "peephole_lstm"


class WorkingMemoryLSTM(_RNNBase):
    """LSTM with working-memory connections (LSTM-WM); extra parameter weight_ch_l{k} (3H, H)."""

    _cell = "wm_lstm"


class _GRUArguments:
    """torch.nn.GRU's constructor: torch.nn.LSTM's arguments without proj_size, refused with
    torch.nn.GRU's error."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        dropconnect: float = 0.0,
        zoneout: float = 0.0,
        **kwargs,
    ) -> None:
        if "proj_size" in kwargs:  # torch.nn.GRU's error
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(
                f"{type(self).__name__}.__init__() got an unexpected keyword argument "
                f"{next(iter(kwargs))!r}"
            )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            dropconnect=dropconnect,
            zoneout=zoneout,
        )


class GRU(_GRUArguments, _RNNBase):
    """Drop-in for torch.nn.GRU (same arguments, parameters and outputs), fused."""

    _cell = "gru"


class _CellBase(_NotScriptable, nn.RNNCellBase):
    """One step of a cell, as torch.nn.LSTMCell / GRUCell, run through the fused ops (T = 1).
    A torch.nn.RNNCellBase (LSTMCell / GRUCell also subclass torch.nn's) whose
    torch.nn.RNNCellBase.__init__ is not run: the parameters are created here."""

    _cell = "lstm"
    _layer_norm = False  # the layer-normalised cell of _cell's family (LayerNormLSTMCell / GRU)
    dropconnect = 0.0  # (a class default too: modules pickled before it existed load)
    zoneout = 0.0  # a rate, or (p_c, p_h) in the LSTM family; a class default as dropconnect

    @property
    def _zone_fused(self) -> bool:
        """Whether the fused ops zone this module's layers."""
        return self._cell in _layer.ZONED_CELLS

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        dropconnect: float = 0.0,
        zoneout: Union[float, Tuple[float, float]] = 0.0,
    ) -> None:
        nn.Module.__init__(self)
        _check_positive_int("input_size", input_size)
        self.dropconnect = _check_dropconnect(dropconnect)
        self.zoneout = _check_zoneout(zoneout, cells.CELLS[self._cell].has_cell_state)
        # torch.nn's cells accept hidden_size 0: (B, 0) states (_run_empty)
        _check_positive_int("hidden_size", hidden_size, zero_ok=True)
        factory = {"device": device, "dtype": dtype}
        spec = cells.CELLS[self._cell]
        G = spec.gates
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty(G * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if spec.weight_ch is not None:
            self.weight_ch = nn.Parameter(torch.empty(spec.weight_ch_shape(hidden_size), **factory))
        else:
            self.register_parameter("weight_ch", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.dropconnect != 0:
            s += ", dropconnect={dropconnect}"
        if self.zoneout != 0:
            s += ", zoneout={zoneout}"
        return s.format(**self.__dict__)

    def _weights(self):
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_ch) as `self.<name>` gives them. A
        registered parameter (None included) is the module's _parameters entry, read without
        nn.Module.__getattr__ (~0.6 us a name, as much as a line of arithmetic per step); a name
        that is not (a parametrization's property, a tensor put in its place) is read as an
        attribute."""
        p = self._parameters
        try:
            return p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"], p["weight_ch"]
        except KeyError:
            return (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.weight_ch)

    def forward(self, input: Tensor, hx=None):
        # One call per step of a user's loop: every attribute is read once, and the checks are
        # those that decide the call (the op checks the rest and names the argument).
        if not isinstance(input, Tensor) or not (
            hx is None
            or isinstance(hx, Tensor)
            or (type(hx) is tuple and all(isinstance(t, Tensor) for t in hx))
        ):
            if _is_proxy(input, hx):  # torch.fx.symbolic_trace: a leaf module
                return _fx_leaf(self, input, hx)
        dim = input.dim() if isinstance(input, Tensor) else None
        if dim not in (1, 2):
            got = f"{dim}-D" if dim is not None else type(input).__name__
            raise ValueError(f"{type(self).__name__}: Expected input to be 1D or 2D, got {got}")
        if input.shape[-1] != self.input_size:  # torch.nn's message
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.shape[-1]} expected "
                f"{self.input_size}"
            )
        w_ih, w_hh, b_ih, b_hh, w_ch = self._weights()
        if self.dropconnect and self.training:  # a fresh mask per call: each call is a step
            w_hh = reference.dropconnect(w_hh, self.dropconnect, True)
        dtype, device = input.dtype, input.device
        if (dtype != w_ih.dtype and not _autocast_mixed_ok(input, w_ih)) or device != w_ih.device:
            raise TypeError(
                f"{type(self).__name__}: input ({dtype}, {device}) must match the "
                f"parameters ({w_ih.dtype}, {w_ih.device})"
            )
        unbatched = dim == 1
        if unbatched:
            input = input.unsqueeze(0)
        B, H = input.shape[0], self.hidden_size
        is_lstm = cells.CELLS[self._cell].has_cell_state
        if hx is None:
            h0 = input.new_zeros(B, H)
            c0 = input.new_zeros(B, H) if is_lstm else None
        else:
            if not is_lstm:
                h0, c0 = hx, None
            elif isinstance(hx, (tuple, list)) and len(hx) == 2:
                h0, c0 = hx
            elif isinstance(hx, (tuple, list)):
                raise RuntimeError("lstm_cell expects two hidden states")  # torch.nn's
            else:  # torch.nn raises a TypeError on a Tensor (not a tuple) too
                raise TypeError(
                    f"{type(self).__name__}: hx must be a tuple (h_0, c_0) of Tensors, "
                    f"got {type(hx).__name__}"
                )
            if unbatched:
                h0 = h0.unsqueeze(0)
                c0 = c0.unsqueeze(0) if c0 is not None else None
            for sname, t in (("hx", h0), ("cx", c0)):
                if t is None:
                    continue
                if t.shape != (B, H):
                    self._raise_state_shape_error(hx if is_lstm else (hx,), B, H, unbatched)
                if (t.dtype != dtype and not _autocast_mixed_ok(t, input)) or t.device != device:
                    raise TypeError(
                        f"{type(self).__name__}: {sname} ({t.dtype}, {t.device}) "
                        f"must match input ({dtype}, {device})"
                    )
        a = LayerArgs(input.unsqueeze(0), w_ih, w_hh, b_ih, b_hh, w_ch, None, h0, c0)
        run = _layer.run if H > 0 else _run_reference  # hidden_size 0, as torch.nn's cells allow
        keep = None
        if self.zoneout != 0:  # one call is one step: fresh masks (training) per call
            keep = _zoneout_keep(self.zoneout, self.training, B, H if is_lstm else None, H, input)
        if self._layer_norm:  # (hidden_size > 0)
            run = functools.partial(_layer_norm_run, ln=self._ln_params(), keep=keep)
        elif keep is not None and H > 0 and self._zone_fused:
            run = functools.partial(_layer.run, keep=keep)
        elif keep is not None:
            run = functools.partial(_run_reference, keep=keep)
        # CPU autocast: the dtype torch.nn.LSTMCell / GRUCell return, promoted with c / h (the
        # layer-normalised cells, which torch.nn lacks, run in the autocast dtype)
        state = c0 if is_lstm else h0
        promoted = None if self._layer_norm else _cpu_autocast_promoted(input, state)
        if promoted is None:
            _, hy, cy = run(self._cell, a, exposed=False)
        else:
            _, hy, cy = _run_promoted(self._cell, a, False, promoted, run)
        if unbatched:
            hy = hy.squeeze(0)
            cy = cy.squeeze(0) if cy is not None else None
        return (hy, cy) if is_lstm else hy

    def _raise_state_shape_error(self, states, B: int, H: int, unbatched: bool):
        """torch.nn.LSTMCell's / GRUCell's error on states of a wrong shape, with its exception
        and message: first the rank of each state as given, then ATen's check of each (an
        unbatched one with its batch dimension added): batch size, hidden size. A rank torch.nn
        lets through to a failure of its own gets a message here."""
        name = type(self).__name__
        lstm_like = len(states) == 2
        given = [(i, t) for i, t in enumerate(states) if isinstance(t, Tensor)]  # None: unchecked
        for i, t in given:
            if t.dim() not in (1, 2):
                what = f"hx[{i}]" if lstm_like else "hidden"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {t.dim()}D instead")
        for i, t in given:
            t = t.unsqueeze(0) if unbatched else t
            if t.shape[0] != B:
                raise RuntimeError(
                    f"Input batch size {B} doesn't match hidden{i} batch size {t.shape[0]}"
                )
            if t.dim() > 1 and t.shape[1] != H:
                raise RuntimeError(
                    f"hidden{i} has inconsistent hidden_size: got {t.shape[1]}, expected {H}"
                )
        rank = 1 if unbatched else 2
        raise RuntimeError(
            f"{name}: for {'unbatched' if unbatched else 'batched'} {rank}-D input, the states "
            f"should also be {rank}-D, got shapes {[tuple(t.shape) for _, t in given]}"
        )


class LSTMCell(_CellBase, nn.LSTMCell):
    """Drop-in for torch.nn.LSTMCell (and an instance of it)."""

    _cell = "lstm"


class GRUCell(_CellBase, nn.GRUCell):
    """Drop-in for torch.nn.GRUCell (and an instance of it)."""

    _cell = "gru"


class PeepholeLSTMCell(_CellBase):
    """One step of the peephole LSTM; parameter names as torch.nn.LSTMCell plus weight_ch."""

    _cell = "peephole_lstm"


class WorkingMemoryLSTMCell(_CellBase):
    """One step of the working-memory LSTM; parameter names as LSTMCell plus weight_ch."""

    _cell = "wm_lstm"


# ---- the layer-normalised cells (design.md §1.6) -------------------------------------------------

# Per family: the LayerNorm parameters of a layer, in the ops' order: (name, size in units of
# hidden_size, initial value). γ_ih and γ_hh scale the normalised products (no shift: the biases
# shift them); γ_c and β_c the LSTM's normalised cell state.
_LN_PARAMS = {
    "lstm": (("ln_weight_ih", 4, 1.0), ("ln_weight_hh", 4, 1.0), ("ln_weight_c", 1, 1.0),
             ("ln_bias_c", 1, 0.0)),
    "gru": (("ln_weight_ih", 3, 1.0), ("ln_weight_hh", 3, 1.0)),
}  # fmt: skip


class _LayerNormParams:
    """The LayerNorm parameters of a layer-normalised module: created after torch.nn's (whose
    names, shapes and initialisation stay torch.nn's), named like them with the layer and
    direction suffix, γ = 1 and β = 0 at initialisation."""

    def _make_ln_params(self, suffixes, factory) -> List[List[str]]:
        names = []
        for sfx in suffixes:
            group = []
            for name, units, _ in _LN_PARAMS[self._cell]:
                shape = (units * self.hidden_size,)
                setattr(self, name + sfx, nn.Parameter(torch.empty(shape, **factory)))
                group.append(name + sfx)
            names.append(group)
        self._reset_ln(suffixes)
        return names

    def _reset_ln(self, suffixes) -> None:
        with torch.no_grad():
            for sfx in suffixes:
                for name, _, value in _LN_PARAMS[self._cell]:
                    p = getattr(self, name + sfx, None)
                    if p is not None:
                        p.fill_(value)


class _LayerNormRNN(_LayerNormParams, _RNNBase):
    """A layer-normalised sequence module: torch.nn's arguments and parameters, plus the
    LayerNorm parameters of each layer and direction (ln_weight_ih_l{k}[_reverse], ...)."""

    _layer_norm = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        w = self.weight_ih_l0
        ln_names = self._make_ln_params(self._suffixes(), {"device": w.device, "dtype": w.dtype})
        for names, extra in zip(self._all_weights, ln_names):
            names.extend(extra)
        self._flat_weights_names = [n for names in self._all_weights for n in names]

    def _suffixes(self) -> List[str]:
        D = 2 if self.bidirectional else 1
        return [
            f"_l{layer}" + ("_reverse" if direction == 1 else "")
            for layer in range(self.num_layers)
            for direction in range(D)
        ]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_ln(self._suffixes())

    def _ln_params(self, layer: int, direction: int) -> Tuple[Tensor, ...]:
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        return tuple(getattr(self, name + sfx) for name, _, _ in _LN_PARAMS[self._cell])


class LayerNormLSTM(_LayerNormRNN):
    """Layer-normalised LSTM (Ba et al. 2016; design.md §1.6): torch.nn.LSTM's arguments and
    parameters, plus per layer and direction the LayerNorm gains ln_weight_ih, ln_weight_hh (4H)
    of the two gate products and ln_weight_c, ln_bias_c (H) of the cell state's normalisation.
    Fused on the CPU; other devices run the reference equations."""

    _cell = "lstm"


class LayerNormGRU(_GRUArguments, _LayerNormRNN):
    """Layer-normalised GRU (design.md §1.6): torch.nn.GRU's arguments and parameters, plus per
    layer and direction the LayerNorm gains ln_weight_ih, ln_weight_hh (3H) of the two gate
    products. Fused on the CPU; other devices run the reference equations."""

    _cell = "gru"


class _LayerNormCell(_LayerNormParams, _CellBase):
    """A layer-normalised one-step cell: torch.nn's cell parameters plus the LayerNorm ones
    (ln_weight_ih, ...). hidden_size must be positive: a normalisation over no feature is
    undefined."""

    _layer_norm = True

    def __init__(self, input_size: int, hidden_size: int, *args, **kwargs) -> None:
        _check_positive_int("hidden_size", hidden_size)
        super().__init__(input_size, hidden_size, *args, **kwargs)
        w = self.weight_ih
        self._make_ln_params([""], {"device": w.device, "dtype": w.dtype})

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self._reset_ln([""])

    def _ln_params(self) -> Tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name, _, _ in _LN_PARAMS[self._cell])


class LayerNormLSTMCell(_LayerNormCell):
    """One step of the layer-normalised LSTM; parameters as torch.nn.LSTMCell plus
    ln_weight_ih, ln_weight_hh (4H), ln_weight_c, ln_bias_c (H)."""

    _cell = "lstm"


class LayerNormGRUCell(_LayerNormCell):
    """One step of the layer-normalised GRU; parameters as torch.nn.GRUCell plus
    ln_weight_ih, ln_weight_hh (3H)."""

    _cell = "gru"


# The layer-normalised modules, keyed by their family's cell name.
LAYER_NORM_MODULES = {m._cell: m for m in (LayerNormLSTM, LayerNormGRU)}
LAYER_NORM_CELL_MODULES = {m._cell: m for m in (LayerNormLSTMCell, LayerNormGRUCell)}


# The modules of each cell of fusedrnn.cells, keyed by its name: the sequence module and the
# one-step cell (the tests, the benchmark and fusedrnn.convert look them up here).
SEQUENCE_MODULES = {m._cell: m for m in (LSTM, GRU, PeepholeLSTM, WorkingMemoryLSTM)}
CELL_MODULES = {m._cell: m for m in (LSTMCell, GRUCell, PeepholeLSTMCell, WorkingMemoryLSTMCell)}
assert set(SEQUENCE_MODULES) == set(CELL_MODULES) == set(cells.CELLS), (
    "every cell of fusedrnn.cells has a sequence module and a one-step cell"
)
