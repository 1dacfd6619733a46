"""The implementations under test, built for one case (cell, shape):

- ``fused``: the fusedrnn module (``fusedrnn.LSTM`` / ``GRU`` / ``PeepholeLSTM`` /
  ``WorkingMemoryLSTM``).
- ``torch``: ``torch.nn.LSTM`` / ``torch.nn.GRU`` with the same weights (LSTM and GRU only);
  cuDNN on a GPU, oneDNN (or ATen) on a CPU. The kernel actually used is read from a profile of
  the first call and recorded.
- ``eager``: ``fusedrnn.reference.layer``, the step-by-step PyTorch loop of the same cell
  (for the layer-normalised rows, ``torch.nn.functional.layer_norm`` per step).

With DropConnect (the "lstm dropconnect" row) the fused module has ``dropconnect=p``; torch.nn's
LSTM and the eager loop get the recurrent weight dropped by ``fusedrnn.reference.dropconnect``
(torch's dropout) before each call, as a weight-drop wrapper does.
- ``compiled``: the *step* function of the same cell (``fusedrnn.reference.*_cell``) compiled
  with ``torch.compile(dynamic=False, fullgraph=True)`` and called from a Python loop over time
  (a "compiled step loop"; compiling the whole unrolled loop takes minutes on a CPU).

Every implementation of one case shares the parameter values, the input and the gradient of the
output. A forward (``fwd``) pass runs under ``torch.no_grad()``; a training pass (``fwd+bwd``)
runs ``output.backward(grad)`` with the parameters' (and, with ``input_grad``, the input's)
gradients set to ``None`` before every run, outside the timed region.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call

from fusedrnn import cells, reference

from .cases import (
    FUSED_MODULES,
    LAYER_NORM_MODULES,
    LAYER_NORM_STEP_FUNCTIONS,
    STEP_FUNCTIONS,
    TORCH_MODULES,
    Case,
    Settings,
)

COMPILE_MODE = "compiled step loop"
COMPILE_NOTE = (
    "torch.compile(dynamic=False, fullgraph=True) of the cell's step function "
    "(fusedrnn.reference.*_cell), called in a Python loop over time; the initial "
    "state requires grad in fwd+bwd so every step runs one graph; first_call_s "
    "includes compilation"
)


class Workload:
    """Module, input, output gradient and the forward function of each implementation."""

    def __init__(self, case: Case, settings: Settings):
        T, B, I, H = case.shape
        self.case, self.settings = case, settings
        dev, dt = settings.device, settings.dtype
        torch.manual_seed(settings.seed)
        D = 2 if case.bidirectional else 1
        modules = LAYER_NORM_MODULES if case.layer_norm else FUSED_MODULES
        self.module = modules[case.cell](
            I,
            H,
            num_layers=case.layers,
            bidirectional=case.bidirectional,
            device=dev,
            dtype=dt,
            dropconnect=case.dropconnect,
            zoneout=case.zoneout,
        )
        self.x = torch.randn(T, B, I, device=dev, dtype=dt).requires_grad_(
            case.needs_input_grad(settings)
        )
        self.grad = torch.randn(T, B, D * H, device=dev, dtype=dt)
        self._built: Dict[str, Tuple[Callable[[], Tensor], List[Tensor]]] = {}
        self.broken: Dict[str, str] = {}

    def get(self, impl: str) -> Tuple[Callable[[], Tensor], List[Tensor]]:
        if impl not in self._built:
            self._built[impl] = getattr(self, "_build_" + impl)()
        return self._built[impl]

    def _layer0(self) -> List[Optional[Tensor]]:
        m = self.module
        return [
            getattr(m, n + "_l0", None)
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch")
        ]

    def _ln0(self) -> Tuple[Tensor, ...]:
        """The LayerNorm parameters of layer 0 (layer-normalised rows), in the ops' order."""
        return self.module._ln_params(0, 0) if self.case.layer_norm else ()

    def _build_fused(self):
        m, x = self.module, self.x
        return (lambda: m(x)[0]), list(m.parameters())

    def _build_torch(self):
        c, (_, _, I, H) = self.case, self.case.shape
        t = TORCH_MODULES[c.cell](
            I,
            H,
            num_layers=c.layers,
            bidirectional=c.bidirectional,
            device=self.settings.device,
            dtype=self.settings.dtype,
        )
        t.load_state_dict(self.module.state_dict())
        x = self.x
        p = c.dropconnect
        if not p:
            return (lambda: t(x)[0]), list(t.parameters())
        params = dict(t.named_parameters())
        dropped = [n for n in params if n.startswith("weight_hh")]

        def forward():  # a weight-drop wrapper's work: the dropped weights, then the module
            weights = dict(params)
            for n in dropped:
                weights[n] = reference.dropconnect(params[n], p, True)
            return functional_call(t, weights, (x,))[0]

        return forward, list(t.parameters())

    def _build_eager(self):
        cell, x, w = self.case.cell, self.x, self._layer0()
        p = self.case.dropconnect

        ln = self._ln0()
        z = self.case.zoneout

        def forward():
            w_ih, w_hh, *rest = w
            w_hh = reference.dropconnect(w_hh, p, True)
            keep = None
            if z:  # the masks the module draws: the cell state's, then the hidden state's
                H = w_hh.shape[1]
                rows = x.shape[0] * x.shape[1]
                keep = tuple(reference.zoneout_masks(rows, H, z, x) for _ in range(2))
                keep = keep if cells.CELLS[cell].has_cell_state else (None, keep[0])
            a = reference.LayerArgs(x, w_ih, w_hh, *rest)
            return reference.layer_of(cell, a, ln, keep)[0]

        return forward, list(self.module.parameters())

    def _build_compiled(self):
        cell, x = self.case.cell, self.x
        T, B, _, H = self.case.shape
        w_ih, w_hh, b_ih, b_hh, w_ch = self._layer0()
        ln = self._ln0()
        steps = LAYER_NORM_STEP_FUNCTIONS if self.case.layer_norm else STEP_FUNCTIONS
        step = torch.compile(
            steps[cell],
            backend=self.settings.compile_backend,
            dynamic=False,
            fullgraph=True,
        )

        # The initial state requires grad when grad is on, so that every step (the first one
        # included) runs the same compiled graph; that adds one small GEMM (dh_0) to backward.
        def zeros():
            return x.new_zeros(B, H).requires_grad_(torch.is_grad_enabled())

        if not cells.CELLS[cell].has_cell_state:

            def forward():
                h, outs = zeros(), []
                for t in range(T):
                    h = step(x[t], h, w_ih, w_hh, b_ih, b_hh, *ln)
                    outs.append(h)
                return torch.stack(outs)
        else:
            extra = ln + (() if cells.CELLS[cell].weight_ch is None else (w_ch,))

            def forward():
                h, c, outs = zeros(), zeros(), []
                for t in range(T):
                    h, c = step(x[t], h, c, w_ih, w_hh, b_ih, b_hh, *extra)
                    outs.append(h)
                return torch.stack(outs)

        return forward, list(self.module.parameters())

    def clear_grads(self) -> None:
        """Sets every gradient the implementations built so far may hold to None."""
        for _, params in self._built.values():
            for p in params:
                p.grad = None
        self.x.grad = None

    def calls(self, impl: str, pass_: str):
        """(prepare, call): `prepare` resets the gradients (untimed), `call` is one timed run.
        The forward call returns the output; the training call returns None."""
        forward, params = self.get(impl)
        x, grad = self.x, self.grad
        if pass_ == "fwd":

            def prepare():
                pass

            def call():
                with torch.no_grad():
                    return forward()
        else:

            def prepare():
                for p in params:
                    p.grad = None
                x.grad = None

            def call():
                forward().backward(grad)

        return prepare, call
